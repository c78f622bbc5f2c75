"""saddle.py -- the saddle picture of trained models: λ_min, λ_max and λ_min / λ_max of the Hessians
of L_head and L_tail at each run's final weights (saddle_analysis below).

    python scripts/saddle.py results/resnet32                 # every finished run under it
    python scripts/saddle.py results/resnet32/sgd-seed0 --images 200 --steps 10   # one run, quicker

A ratio near 0 says a minimum; a clearly negative one, a saddle (the paper: SAM leaves the tail near
a saddle, SSE-SAM escapes on both groups). Each run's model.pt is loaded with the network, data
and loss of its summary.json and evaluated in fp32, in eval mode, on un-augmented training images:
for each group, a fixed random subset of --images of its images (seeded by --seed, the same subset
for every run), and --steps Lanczos steps from a seeded start. The training images are read from
--data_dir [./datasets]. Writes saddle.json (the settings; per run the numbers, the seconds, the
commit, CPU and threads) and saddle.png into --out [the runs' folder]. Runs are added to an existing
saddle.json one at a time, each saved as it finishes, so a long analysis can be made in pieces; a
run it holds is skipped (--redo: made again), and a file made with other settings is refused.
saddle.png: per optimizer, the mean over its seeds with each seed's value. Printed (tables()): the
mean ± std table, each seed's numbers and which of the paper's claims they support, the markdown
results/README.md holds. Exit codes: 0, 2 bad input (one line, nothing written).
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repo root (ssesam_minimal.py), curves.py's
import ssesam_minimal as sm  # noqa: E402
from curves import save_png  # noqa: E402
from results_table import NAMES, evidence, in_table_order, mean_std, signed  # noqa: E402

PROG = "saddle.py"


# =============================================================================================
# Saddle analysis: extreme Hessian eigenvalues of the head-class and the tail-class loss
# =============================================================================================
#
# The paper's claim is about saddle points: SAM escapes those of the overall loss but not those of
# the tail-class loss. At a saddle the Hessian H = ∇²L(w) has eigenvalues of both signs, so the
# indicator (Rangwani et al., NeurIPS 2022) is λ_min / λ_max of a group's loss at the trained w:
# about 0 near a minimum, clearly negative near a saddle. H (P x P) is never formed: Lanczos needs
# only products with it, H v = ∇_w <∇_w L(w), v>. The model is in eval mode
# and the images are not augmented, so that every product applies the same H.

def hvp(model, criterion, x, y, v, batch_size=250):
    """H v, H the Hessian of L(w) = (1 / N) Σ_i ℓ_i(w) over uint8 images x (N, 3, H, W), in the
    trainable parameters; v flat (P,). L is a sum of one term per batch, and so is H v. Forward over
    reverse: the directional derivative of ∇L along v (torch.func.jvp of torch.func.grad), in
    channels_last, measured 1.5x faster than double backward on a CPU at batch 250; the model's
    buffers (BatchNorm's running statistics, in eval mode) are read, never written."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    w = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {**{n: p.detach() for n, p in model.named_parameters() if not p.requires_grad},
             **dict(model.named_buffers())}
    # convolution weights in channels_last, the layout the CPU's kernels are fastest in
    w = {n: p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p for n, p in w.items()}
    v_w = dict(zip(names, (vi.view(w[n].shape) for vi, n in zip(v.split([w[n].numel() for n in names]), names))))
    Hv = torch.zeros_like(v)
    for i in range(0, len(y), batch_size):  # one batch's graph in memory at a time
        xb = sm.normalize(x[i:i + batch_size].to(v.device)).to(v.dtype)  # no augmentation
        xb, yb = xb.contiguous(memory_format=torch.channels_last), y[i:i + batch_size].to(v.device)

        def L_b(params):  # this batch's part of L
            return criterion(torch.func.functional_call(model, ({**params, **fixed},), (xb,)), yb).sum() / len(y)

        _, Hv_b = torch.func.jvp(torch.func.grad(L_b), (w,), (v_w,))  # H_b v = d/dt ∇L_b(w + t v)
        Hv += torch.cat([Hv_b[n].reshape(-1) for n in names])
    return Hv


def lanczos(H, v0, k=30, tol=None):
    """k Lanczos steps on a symmetric operator H (a function v -> H v) from v0, with full
    re-orthogonalisation; with tol, fewer once both extreme Ritz values have settled (residual bound
    < tol·|θ|). Returns (θ, τ, r): the Ritz values (ascending), their weights (the squared first
    components of T's eigenvectors, summing to 1: the spectral density seen from v0, the stochastic
    Lanczos quadrature of Ubaru et al.) and each one's residual bound β_m·|s_mi|, the distance
    within which an eigenvalue of H lies. The extreme θ approach λ_min and λ_max from inside."""
    n = min(k, v0.numel())
    Q = torch.zeros(n + 1, v0.numel(), dtype=v0.dtype, device=v0.device)  # rows: orthonormal q_1..q_n
    Q[0] = v0 / v0.norm()
    alpha, beta = [], []
    for j in range(n):
        w = H(Q[j])
        alpha.append(torch.dot(Q[j], w).item())  # α_j = q_jᵀ H q_j
        # r = (I - Q Qᵀ) H q_j, twice: one pass leaves the q_i slightly non-orthogonal in floating
        # point, and the Ritz values would then repeat (ghost eigenvalues)
        r = w - Q[:j + 1].T @ (Q[:j + 1] @ w)
        r = r - Q[:j + 1].T @ (Q[:j + 1] @ r)
        beta.append(r.norm().item())  # β_j = ‖r‖, q_{j+1} = r / β_j
        if beta[-1] <= 1e-6 * w.norm().item():  # span{q_1..q_j} is invariant under H: θ exact
            beta[-1] = 0.0
            break
        Q[j + 1] = r / beta[-1]
        if tol is not None and j >= 1:
            theta, _, res = _ritz(alpha, beta)
            if res[0] < tol * abs(theta[0]) and res[-1] < tol * abs(theta[-1]):
                break
    return _ritz(alpha, beta)


def _ritz(alpha, beta):
    """θ, τ, r of the tridiagonal T (α on the diagonal, β_1..β_{m-1} beside it, β_m after it)."""
    a, b = torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta[:len(alpha) - 1], dtype=torch.float64)
    theta, S = torch.linalg.eigh(torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1))
    return theta, S[0] ** 2, beta[len(alpha) - 1] * S[-1].abs()


def hessian_extremes(model, criterion, x, y, k=30, seed=0, batch_size=250, tol=None):
    """The Hessian of L(w) = (1 / N) Σ_i ℓ_i(w) over (x, y), in eval mode (the mode is restored),
    seen by k Lanczos steps (fewer with tol, as in lanczos) from a seeded random start:
    λ_min, λ_max (the extreme Ritz values), λ_min / λ_max, L(w), each extreme's residual bound, the
    spectral density (the Ritz values as nodes and their weights), the steps taken, and whether
    λ_min is a negative outlier: settled (residual bound < 5 % of |λ_min|) and standing apart from
    the next Ritz value by more than half its size (θ_2 - θ_1 > |θ_1| / 2)."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        P = sum(q.numel() for q in model.parameters() if q.requires_grad)
        v0 = torch.randn(P, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)
        theta, tau, res = lanczos(lambda v: hvp(model, criterion, x, y, v, batch_size), v0, k, tol)
        # L(w) itself: the CE Hessian shrinks as the softmax saturates, so a small spectrum can mean
        # no more than images fit to near-zero loss; compare λ between models beside L
        with torch.no_grad():
            L = sum(criterion(model(sm.normalize(x[i:i + batch_size].to(p.device)).to(p.dtype)),
                              y[i:i + batch_size].to(p.device)).sum().item()
                    for i in range(0, len(y), batch_size)) / len(y)
    finally:
        model.train(was_training)
    lam_min, lam_max = theta[0].item(), theta[-1].item()
    settled = res[0].item() < 0.05 * abs(lam_min)
    apart = len(theta) > 1 and theta[1].item() - lam_min > abs(lam_min) / 2
    return {"lambda_max": lam_max, "lambda_min": lam_min, "ratio": lam_min / lam_max, "loss": L,
            "residual_min": res[0].item(), "residual_max": res[-1].item(), "steps": len(theta),
            "outlier": bool(lam_min < 0 and settled and apart),
            "nodes": theta.tolist(), "weights": tau.tolist()}


def density(nodes, weights, grid, sigma):
    """The spectral density Σ_i τ_i N(t; θ_i, σ²) at each t of grid: the nodes broadened by a
    Gaussian of width sigma (the drawing's choice: Lanczos gives a discrete measure)."""
    t, th, tau = (torch.as_tensor(a, dtype=torch.float64) for a in (grid, nodes, weights))
    return (tau * torch.exp(-0.5 * ((t[:, None] - th) / sigma) ** 2)).sum(1) / (sigma * math.sqrt(2 * math.pi))


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
    """Per optimizer (runs grouped by folder name without the seed: a control keeps its suffix), the
    ratio λ_min / λ_max of head and tail: a bar at the mean over the seeds, ± the sample standard
    deviation from two seeds on, each seed's own value a dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    for name, r in runs.items():
        rows.setdefault(row_and_seed(name)[0], []).append(r)
    names = in_table_order(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    for ax, key, title in zip(axes, ("ratio", "lambda_min", "lambda_max"),
                              ("λ_min / λ_max (< 0: a saddle)", "λ_min", "λ_max")):
        for j, (group, colour) in enumerate((("head", "tab:blue"), ("tail", "tab:red"))):
            for i, n in enumerate(names):
                values = [r[group][key] for r in rows[n] if r.get(group)]
                if not values:
                    continue
                x = i + (j - 0.5) * 0.38
                ax.bar(x, statistics.mean(values), 0.38, color=colour, alpha=0.5,
                       yerr=statistics.stdev(values) if len(values) > 1 else None, capsize=3,
                       label=f"L_{group}" if i == 0 else None)
                ax.plot([x] * len(values), values, "o", color=colour, ms=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), [f"{n} (n={len(rows[n])})" for n in names], rotation=20, fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.suptitle("bars: mean over seeds (± sample std from two seeds on); dots: each seed", fontsize=9)
    save_png(fig, path)


def row_and_seed(name):
    """A run's row, its folder name without the seed (so that a control keeps its suffix), and its
    seed; a folder named otherwise is a row of its own, seed 0."""
    m = re.search(r"-seed(\d+)", name)
    return (name[:m.start()] + name[m.end():], int(m.group(1))) if m else (name, 0)


# The paper's saddle claims, each read as a paired difference of λ_min / λ_max over the seeds two
# rows share (a higher ratio: further from a saddle): (claim, row a, row b, group, the sign it needs).
CLAIMS = [("SAM leaves the tail near a saddle: SAM's tail ratio below SGD's", "sam", "sgd", "tail", -1),
          ("ImbSAM takes the tail away from it: ImbSAM's tail ratio above SAM's", "imbsam", "sam", "tail", 1),
          ("SSE-SAM escapes on the tail: its tail ratio above SAM's", "ssesam", "sam", "tail", 1),
          ("SSE-SAM escapes on the head too: its head ratio above ImbSAM's", "ssesam", "imbsam", "head", 1)]
# each number, its column and its decimals: L(w), the group's mean training loss, beside its Hessian,
# since the CE Hessian shrinks as the loss goes to 0 (a flat group may only be a group fit to near-zero loss)
SHOWN = (("loss", "L", 4), ("lambda_min", "λ_min", 3), ("lambda_max", "λ_max", 1), ("ratio", "ratio", 4))


def tables(report):
    """The markdown blocks a reader gets of a saddle.json: per row the mean ± sample std over its
    seeds of each group's L(w), λ_min, λ_max and ratio ("--" for a group without images, and for
    L where a run predates it), each seed's numbers (once a row has two), and which of the paper's
    claims the ratios, paired seed by seed, support (results_table.evidence's rule)."""
    def cells(runs):
        return " | ".join("--" if not runs[0].get(g) or k == "loss" and any("loss" not in r[g] for r in runs)
                          else mean_std([r[g][k] for r in runs], d)  # --: no images; L not yet recorded
                          for g in ("head", "tail") for k, _, d in SHOWN)

    rows = {}
    for name, r in report["runs"].items():
        row, seed = row_and_seed(name)
        rows.setdefault(row, {})[seed] = r
    top = " | ".join(f"{g} {column}" for g in ("head", "tail") for _, column, _ in SHOWN)
    rule = "|---" * (2 + 2 * len(SHOWN)) + "|"
    mean, each = [f"| row | seeds | {top} |", rule], [f"| row | seed | {top} |", rule]
    for n in in_table_order(rows):
        opt, _, rest = n.partition("-")
        label = NAMES.get(opt, opt) + (f" ({rest})" if rest else "")
        mean.append(f"| {label} | {len(rows[n])} | {cells(list(rows[n].values()))} |")
        each += [f"| {label} | {seed} | {cells([r])} |" for seed, r in sorted(rows[n].items())]
    reading = []
    for claim, a, b, group, sign in CLAIMS:
        seeds = [k for k in sorted(set(rows.get(a, {})) & set(rows.get(b, {})))
                 if rows[a][k].get(group) and rows[b][k].get(group)]
        d = [rows[a][k][group]["ratio"] - rows[b][k][group]["ratio"] for k in seeds]
        if not d:
            continue
        if len(d) < 2:
            verdict = "one seed, no spread: leaves it open"
        elif evidence(d):
            verdict = "supports it" if (statistics.mean(d) > 0) == (sign > 0) else "contradicts it"
        else:
            verdict = "not one sign in every seed with a mean over twice its std: leaves it open"
        per_seed = ", ".join(f"{x:+.4f}" for x in d)
        reading.append(f"- {claim}. {NAMES[a]} − {NAMES[b]}, {group} ratio {signed(d, 4)} "
                       + (f"(seed {seeds[0]})" if len(d) == 1 else f"(seeds {', '.join(map(str, seeds))}: {per_seed})")
                       + f": {verdict}.")
    blocks = [mean, each, reading] if any(len(seeds) > 1 for seeds in rows.values()) else [mean, reading]
    return ["\n".join(lines) for lines in blocks]  # each seed's table only where a row has several


def read_report(path, tables):
    """The report (saddle.json, spectrum.json) at path, {"runs": {}} if there is none, or one line on
    what is wrong with it: it must be JSON whose runs its tables (saddle's or spectrum's) can print."""
    if not os.path.isfile(path):
        return {"runs": {}}
    try:
        with open(path) as fh:
            report = json.load(fh)
        if not isinstance(report, dict) or not isinstance(report.get("runs"), dict):
            raise TypeError("no runs")
        if report["runs"]:
            tables(report)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise sm.UsageError(f"{path} is damaged ({type(e).__name__}); move it away to start afresh")
    return report


def main(argv=None):
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="finished run folders, or folders holding them")
    p.add_argument("--images", type=int, default=1000, help="images per group (its subset)")
    p.add_argument("--steps", type=int, default=30, help="Lanczos steps (Hessian-vector products) per group")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and of the Lanczos start")
    p.add_argument("--data_dir", default="./datasets", help="folder holding the CIFAR python files")
    p.add_argument("--out", help="folder for saddle.json and saddle.png (default: the runs' folder)")
    p.add_argument("--redo", action="store_true", help="analyse runs that saddle.json already holds")
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
        path = os.path.join(out, "saddle.json")
        report = read_report(path, tables)
        cfg = next(iter(loaded.values()))[0]
        counts = sm.data_counts(cfg.dataset, cfg.imb_factor)[0]
        settings = {"arch": cfg.arch, "dataset": cfg.dataset, "imb_factor": cfg.imb_factor, "eta": cfg.eta,
                    "images_per_group": {g: min(args.images, sum(n for n in counts if (n < cfg.eta) == (g == "tail")))
                                         for g in ("head", "tail")},
                    "lanczos_steps": args.steps, "seed": args.seed, "precision": "fp32"}
        held = {k: report[k] for k in settings if k in report}
        if report["runs"] and held != settings:  # the runs of one file are comparable
            raise sm.UsageError(f"{path} holds runs made with other settings ({held}); use another --out")
        todo = {n: v for n, v in loaded.items() if args.redo or n not in report["runs"]}
        for name in sorted(set(loaded) - set(todo)):
            print(f"{name}: already in {path}")
        data = sm.load_data(cfg.dataset, args.data_dir, cfg.imb_factor, cfg.subset_seed) if todo else None
        report.update(settings)
        for name, (c, state, _) in todo.items():
            r, seconds = analyse(c, state, data, args.images, args.steps, args.seed, name)
            print(f"{name}: " + "; ".join(
                f"{g} λ_min {r[g]['lambda_min']:.4g} λ_max {r[g]['lambda_max']:.4g} ratio {r[g]['ratio']:.4f}"
                if r[g] else f"{g}: no image" for g in ("head", "tail")) + f" ({seconds:.0f} s)", flush=True)
            report["runs"][name] = {**r, "seconds": seconds, "commit": sm.git_commit(), "cpu": sm.cpu_info(),
                                    "threads": torch.get_num_threads(), "torch": str(torch.__version__)}
            report["runs"] = dict(sorted(report["runs"].items()))
            sm._atomic_write(path, json.dumps(report, indent=2))  # each run kept as soon as it is done
    except (sm.UsageError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    draw(report["runs"], os.path.join(out, "saddle.png"))
    print(f"{path}: {len(report['runs'])} runs; drew saddle.png\n")
    print("\n\n".join(tables(report)))
    return report


if __name__ == "__main__":
    main()
