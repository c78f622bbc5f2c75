"""saddle.py -- the saddle picture of trained models: λ_min, λ_max and λ_min / λ_max of the Hessians
of L_head and L_tail at each run's final weights (saddle_analysis below).

    python scripts/saddle.py results/resnet32                 # every finished run under it
    python scripts/saddle.py results/resnet32/sgd-seed0 --images 200 --steps 10   # one run, quicker

A ratio near 0 says a minimum; a clearly negative one, a saddle (the paper: SAM leaves the tail near
a saddle, SSE-SAM escapes on both groups). Each run's model.pt is loaded with the network, data
and loss of its summary.json and evaluated in fp32, in eval mode, on un-augmented training images:
for each group, a fixed random subset of --images of its images (seeded by --seed, the same subset
for every run), and --steps Lanczos steps from a seeded start. The training images are read from
--data_dir [./datasets]. Writes saddle.json (the numbers, the settings, the seconds per run) and
saddle.png into --out [the runs' folder]. Exit codes: 0, 2 bad input (one line, nothing written).
"""

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repo root (ssesam_minimal.py), curves.py's
import ssesam_minimal as sm  # noqa: E402
from curves import save_png  # noqa: E402

PROG = "saddle.py"


# =============================================================================================
# Saddle analysis: extreme Hessian eigenvalues of the head-class and the tail-class loss
# =============================================================================================
#
# The paper's claim is about saddle points: SAM escapes those of the overall loss but not those of
# the tail-class loss. At a saddle the Hessian H = ∇²L(w) has eigenvalues of both signs, so the
# indicator (Rangwani et al., NeurIPS 2022) is λ_min / λ_max of a group's loss at the trained w:
# about 0 near a minimum, clearly negative near a saddle. H (P x P) is never formed: Lanczos needs
# only products with it, by double backprop, H v = ∇_w <∇_w L(w), v>. The model is in eval mode
# and the images are not augmented, so that every product applies the same H.

@torch.enable_grad()
def hvp(model, criterion, x, y, v, batch_size=250):
    """H v, H the Hessian of L(w) = (1 / N) Σ_i ℓ_i(w) over uint8 images x (N, 3, H, W), in the
    trainable parameters; v flat (P,). L is a sum of one term per batch, and so is H v."""
    params = [p for p in model.parameters() if p.requires_grad]
    vs = [vi.view_as(p) for vi, p in zip(v.split([p.numel() for p in params]), params)]
    Hv = torch.zeros_like(v)
    for i in range(0, len(y), batch_size):  # one batch's graph in memory at a time
        xb = sm.normalize(x[i:i + batch_size].to(v.device)).to(v.dtype)  # no augmentation
        L_b = criterion(model(xb), y[i:i + batch_size].to(v.device)).sum() / len(y)
        g = torch.autograd.grad(L_b, params, create_graph=True)     # g = ∇L_b, differentiable
        g_dot_v = sum((gi * vi).sum() for gi, vi in zip(g, vs))     # H_b v = ∇_w (g · v)
        Hv_b = torch.autograd.grad(g_dot_v, params, allow_unused=True, materialize_grads=True)
        Hv += torch.cat([h.reshape(-1) for h in Hv_b])
    return Hv


def lanczos(H, v0, k=30):
    """Ritz values (ascending) of k Lanczos steps on a symmetric operator H (a function v -> H v)
    from v0, with full re-orthogonalisation. The extreme ones approach λ_min and λ_max from inside,
    faster than power iteration would with as many products."""
    n = min(k, v0.numel())
    Q = torch.zeros(n, v0.numel(), dtype=v0.dtype, device=v0.device)  # rows: orthonormal q_1..q_n
    Q[0] = v0 / v0.norm()
    alpha, beta = [], []
    for j in range(n):
        w = H(Q[j])
        alpha.append(torch.dot(Q[j], w).item())  # α_j = q_jᵀ H q_j
        if j == n - 1:
            break
        # r = (I - Q Qᵀ) H q_j, twice: one pass leaves the q_i slightly non-orthogonal in floating
        # point, and the Ritz values would then repeat (ghost eigenvalues)
        r = w - Q[:j + 1].T @ (Q[:j + 1] @ w)
        r = r - Q[:j + 1].T @ (Q[:j + 1] @ r)
        b = r.norm().item()
        if b <= 1e-6 * w.norm().item():  # span{q_1..q_j} is invariant under H: Ritz values exact
            break
        beta.append(b)  # β_j = ‖r‖, q_{j+1} = r / β_j
        Q[j + 1] = r / b
    # T = Qᵀ H Q is tridiagonal, α on the diagonal and β beside it; eig(T) = the Ritz values
    a, b = torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
    return torch.linalg.eigvalsh(torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1))


def hessian_extremes(model, criterion, x, y, k=30, seed=0, batch_size=250):
    """λ_min and λ_max (the extreme Ritz values of k Lanczos steps) and λ_min / λ_max for the
    Hessian of L(w) = (1 / N) Σ_i ℓ_i(w) over (x, y), in eval mode; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        P = sum(q.numel() for q in model.parameters() if q.requires_grad)
        v0 = torch.randn(P, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)
        ritz = lanczos(lambda v: hvp(model, criterion, x, y, v, batch_size), v0, k)
    finally:
        model.train(was_training)
    lam_min, lam_max = ritz[0].item(), ritz[-1].item()
    return {"lambda_max": lam_max, "lambda_min": lam_min, "ratio": lam_min / lam_max}


def saddle_analysis(model, criterion, x, y, counts, eta, max_images=None, seed=0, **kw):
    """{"head": ..., "tail": ...}: hessian_extremes (kw: k, batch_size) of L_head and L_tail, the
    mean loss over the training images of the classes with n_c ≥ η (head) or n_c < η (tail), or
    over a fixed random subset of max_images of them. None for an empty group."""
    is_tail = torch.tensor([n < eta for n in counts])[y.cpu()]
    out = {}
    for name, mask in (("head", ~is_tail), ("tail", is_tail)):
        idx = torch.nonzero(mask).flatten()
        if max_images is not None:  # the subset's Hessian is an unbiased estimate of the group's
            pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))
            idx = idx[pick[:max_images]]
        out[name] = (hessian_extremes(model, criterion, x[idx], y[idx], seed=seed, **kw)
                     if len(idx) else None)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise sm.UsageError(message)


def finished_runs(paths):
    """Run folders with a summary.json: those named, or one level down in the folders named."""
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise sm.UsageError(f"{path} is not a folder")
        if os.path.isfile(os.path.join(path, "summary.json")):
            runs.append(path)
            continue
        inside = sorted(os.path.join(path, d) for d in os.listdir(path)
                        if os.path.isfile(os.path.join(path, d, "summary.json")))
        if not inside:
            raise sm.UsageError(f"{path} holds no finished run (no summary.json)")
        runs += inside
    return runs


def load_run(folder):
    """(config, state dict of model.pt, summary.json as read) of a finished run, or one line on what
    is wrong."""
    path = os.path.join(folder, "summary.json")
    try:
        with open(path) as fh:
            summary = json.load(fh)
        cfg = sm.Config(**summary["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise sm.UsageError(f"{path} is not a summary.json of ssesam_minimal.py ({type(e).__name__})")
    path = os.path.join(folder, "model.pt")
    if not os.path.isfile(path):
        raise sm.UsageError(f"{folder} has no model.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, not a torch file
        raise sm.UsageError(f"{path} is not a readable model.pt ({type(e).__name__})")
    return cfg, state, summary


def build_net(cfg, state, num_classes, name):
    """The run's network holding the weights of its model.pt, or one line on why they do not fit."""
    model = sm.build_model(cfg.arch, num_classes, normed=cfg.loss == "LDAM")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise sm.UsageError(f"{name}/model.pt is not the weights of a {cfg.arch} for {num_classes} classes "
                            f"({type(e).__name__})")
    return model


def analyse(cfg, state, data, images, steps, seed, name):
    """saddle_analysis of one run's weights, in fp32 and eval mode; the seconds it took."""
    x, y, _, _, counts, _ = data
    model = build_net(cfg, state, len(counts), name).eval()
    criterion = sm.LongTailLoss(cfg.loss, counts, cfg.tau, cfg.vs_gamma, cfg.ldam_max_m, cfg.ldam_s)
    t0 = time.time()
    result = saddle_analysis(model, criterion, x, y, counts, cfg.eta, max_images=images, seed=seed, k=steps)
    return result, time.time() - t0


def draw(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    for ax, key, title in zip(axes, ("ratio", "lambda_min", "lambda_max"),
                              ("λ_min / λ_max (< 0: a saddle)", "λ_min", "λ_max")):
        for j, group in enumerate(("head", "tail")):
            values = [runs[n][group][key] if runs[n][group] else 0.0 for n in names]
            ax.bar([i + (j - 0.5) * 0.38 for i in range(len(names))], values, 0.38, label=f"L_{group}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=9)
    save_png(fig, path)


def main(argv=None):
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="finished run folders, or folders holding them")
    p.add_argument("--images", type=int, default=1000, help="images per group (its subset)")
    p.add_argument("--steps", type=int, default=30, help="Lanczos steps (Hessian-vector products) per group")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and of the Lanczos start")
    p.add_argument("--data_dir", default="./datasets", help="folder holding the CIFAR python files")
    p.add_argument("--out", help="folder for saddle.json and saddle.png (default: the runs' folder)")
    try:
        args = p.parse_args(argv)
        if args.images < 1 or args.steps < 2:
            raise sm.UsageError(f"need --images >= 1 and --steps >= 2, got {args.images}, {args.steps}")
        folders = finished_runs(args.folders)
        loaded = {os.path.basename(os.path.normpath(f)): load_run(f) for f in folders}  # every check first
        shapes = {(c.arch, c.dataset, c.imb_factor, c.subset_seed, c.eta) for c, *_ in loaded.values()}
        if len(shapes) > 1:
            raise sm.UsageError("the runs differ in network, data or eta: "
                                + ", ".join(f"{n} {c.arch} {c.dataset} IF {c.imb_factor:g} eta {c.eta}"
                                            for n, (c, *_) in loaded.items()))
        out = args.out or os.path.dirname(os.path.normpath(folders[0]))
        if not os.path.isdir(out):
            raise sm.UsageError(f"--out {out} is not a folder")
        cfg = next(iter(loaded.values()))[0]
        data = sm.load_data(cfg.dataset, args.data_dir, cfg.imb_factor, cfg.subset_seed)
        results, seconds = {}, {}
        for name, (c, state, _) in loaded.items():
            results[name], seconds[name] = analyse(c, state, data, args.images, args.steps, args.seed, name)
            r = results[name]
            print(f"{name}: " + "; ".join(
                f"{g} λ_min {r[g]['lambda_min']:.4g} λ_max {r[g]['lambda_max']:.4g} ratio {r[g]['ratio']:.4f}"
                if r[g] else f"{g}: no image" for g in ("head", "tail")) + f" ({seconds[name]:.0f} s)")
    except (sm.UsageError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    counts = data[4]
    report = {"arch": cfg.arch, "dataset": cfg.dataset, "imb_factor": cfg.imb_factor, "eta": cfg.eta,
              "images_per_group": {g: min(args.images, sum(n for n in counts if (n < cfg.eta) == (g == "tail")))
                                   for g in ("head", "tail")},
              "lanczos_steps": args.steps, "seed": args.seed, "precision": "fp32",
              "threads": torch.get_num_threads(), "cpu": sm.cpu_info(), "torch": str(torch.__version__),
              "runs": {n: {**results[n], "seconds": seconds[n]} for n in results}}
    draw(results, os.path.join(out, "saddle.png"))  # the picture first: saddle.json says it is all done
    sm._atomic_write(os.path.join(out, "saddle.json"), json.dumps(report, indent=2))
    print(f"wrote {os.path.join(out, 'saddle.json')} and saddle.png")
    return report


if __name__ == "__main__":
    main()
