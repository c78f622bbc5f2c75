"""saddle.py -- the saddle picture of trained models: λ_min, λ_max and λ_min / λ_max of the Hessians
of L_head and L_tail at each run's final weights (ssesam_minimal.saddle_analysis).

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
    result = sm.saddle_analysis(model, criterion, x, y, counts, cfg.eta, max_images=images, seed=seed, k=steps)
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
