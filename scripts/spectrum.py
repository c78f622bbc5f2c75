"""spectrum.py -- the Hessian spectrum of trained models, group by group and class by class, added
to spectrum.json one model at a time, and drawn into spectrum.png.

    python scripts/spectrum.py results/resnet32/sgd-seed0          # one run: about 20-30 min on 2 threads
    python scripts/spectrum.py results/resnet32/*-seed0            # several, each saved as it finishes
    python scripts/spectrum.py results/resnet32/sgd-seed0 --images 100 --steps 20 --rare 2   # quicker

Rangwani et al. (NeurIPS 2022) read a saddle off the spectrum of one class's loss: an isolated
negative eigenvalue well away from the rest. For each run's final weights (model.pt, in fp32, eval
mode, un-augmented training images) this computes, with saddle.py's Lanczos (one seeded start per
Hessian, up to --steps Hessian-vector products, fewer once both extremes have settled to --tol of
their size), the spectrum of:
  * L_head and L_tail: --images images of each group, the seeded subset saddle.py takes;
  * single classes: the --rare rarest classes with all their images, and --head_classes head
    classes spread over the head's counts, each with a seeded subset of --class_images images.
Each Hessian gives λ_min, λ_max, their ratio and residual bounds, the Ritz nodes and weights (the
spectral density) and whether λ_min is an outlier (saddle.hessian_extremes). spectrum.json keeps
every run added so far, each with its settings, commit, CPU, threads and seconds; a run already
there with the same settings is skipped. Printed (tables()): the groups' Hessians, the classes side
by side and what they show, the markdown results/README.md holds. spectrum.png draws the densities
on an asinh axis, broadened by a Gaussian of width --sigma in asinh(λ) (about --sigma·|λ| for
|λ| > 1). saddle.json and saddle.png are never touched. Exit codes: 0, 2 bad input (one line, nothing written).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import ssesam_minimal as sm  # noqa: E402
from curves import save_png  # noqa: E402
from results_table import in_table_order  # noqa: E402
from saddle import (build_net, density, finished_runs, hessian_extremes, load_run, read_report,  # noqa: E402
                    saddle_analysis)

PROG = "spectrum.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise sm.UsageError(message)


def chosen_classes(counts, eta, rare, head):
    """The `rare` classes with the fewest training images (the later index first on a tie, as
    CIFAR-LT orders them) and `head` head classes (n ≥ η) spread evenly over the head's counts."""
    order = sorted(range(len(counts)), key=lambda c: (counts[c], -c))
    heads = [c for c in reversed(order) if counts[c] >= eta]  # most images first
    picks = [heads[round(i * (len(heads) - 1) / max(head - 1, 1))] for i in range(head)] if heads else []
    return order[:rare], sorted(set(picks))


def class_analysis(model, criterion, x, y, classes, max_images=None, seed=0, **kw):
    """{c: hessian_extremes (kw: k, tol, batch_size) of the mean loss over class c's training
    images}: all of them, or a seeded subset of max_images."""
    out = {}
    for c in classes:
        idx = torch.nonzero(y.cpu() == c).flatten()
        if max_images is not None and len(idx) > max_images:
            idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:max_images]]
        out[c] = hessian_extremes(model, criterion, x[idx], y[idx], seed=seed, **kw)
        out[c]["images"] = len(idx)
    return out


def analyse(cfg, state, data, args, name):
    """The spectra of one run: its groups and its chosen classes; the seconds each part took."""
    x, y, _, _, counts, _ = data
    model = build_net(cfg, state, len(counts), name).eval()
    criterion = sm.LongTailLoss(cfg.loss, counts, cfg.tau, cfg.vs_gamma, cfg.ldam_max_m, cfg.ldam_s)
    kw = {"k": args.steps, "tol": args.tol}
    rare, head = chosen_classes(counts, cfg.eta, args.rare, args.head_classes)
    t0 = time.time()
    groups = saddle_analysis(model, criterion, x, y, counts, cfg.eta, max_images=args.images, seed=args.seed, **kw)
    t1 = time.time()
    classes = class_analysis(model, criterion, x, y, rare + head, max_images=args.class_images,
                             seed=args.seed, **kw)
    for c, r in classes.items():
        r.update(count=counts[c], group="tail" if counts[c] < cfg.eta else "head")
    return {"groups": groups, "classes": {str(c): r for c, r in classes.items()},
            "seconds": {"groups": t1 - t0, "classes": time.time() - t1}}


def summary_line(name, r):
    """One line per Hessian: λ_min (± its bound), λ_max, the ratio, the steps, an outlier."""
    def one(label, s):
        return (f"  {label:>16s}: λ_min {s['lambda_min']:+.4g} (±{s['residual_min']:.2g}) λ_max "
                f"{s['lambda_max']:.4g} ratio {s['ratio']:+.4f}, {s['steps']} steps"
                + (", OUTLIER" if s["outlier"] else ""))
    lines = [f"{name}: groups {r['seconds']['groups']:.0f} s, classes {r['seconds']['classes']:.0f} s"]
    lines += [one(g, s) for g, s in r["groups"].items() if s]
    lines += [one(f"class {c} (n={s['count']})", s) for c, s in r["classes"].items()]
    return "\n".join(lines)


def tables(report):
    """The markdown blocks a reader gets of a spectrum.json: the groups' Hessians run by run, the
    single classes side by side (rows: classes, columns: runs), and what they show."""
    names = in_table_order(report["runs"])
    res = {n: report["runs"][n]["result"] for n in names}
    tol = {n: report["runs"][n]["settings"]["tol"] for n in names}
    groups = ["| run | group | steps | λ_min (± bound) | λ_max | ratio | outlier |", "|---" * 7 + "|"]
    for n in names:
        groups += [f"| {n} | {g} | {s['steps']} | {s['lambda_min']:.3f} (± {s['residual_min']:.2g}) "
                   f"| {s['lambda_max']:.1f} | {s['ratio']:.4f} | {'yes' if s['outlier'] else 'no'} |"
                   for g, s in res[n]["groups"].items() if s]
    info = {}  # class -> (its training images, head or tail), as the runs saw them
    for n in names:
        info.update({int(c): (s["count"], s["group"]) for c, s in res[n]["classes"].items()})
    order = sorted(info, key=lambda c: (info[c][1] == "head", info[c][0], -c))  # the tail's rarest first
    classes = ["| class | n | group | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for c in order:
        cells = [res[n]["classes"].get(str(c)) for n in names]
        classes.append(f"| {c} | {info[c][0]} | {info[c][1]} | " + " | ".join(
            "--" if s is None else f"{s['ratio']:.4f} ({s['lambda_min']:.2f} / {s['lambda_max']:.0f})"
            + (" ▼" if s["outlier"] else "") for s in cells) + " |")
    every = [(n, g, s) for n in names for g, s in res[n]["groups"].items() if s] + \
            [(n, f"class {c}", s) for n in names for c, s in res[n]["classes"].items()]
    unsettled = [(n, w) for n, w, s in every if not (s["residual_min"] < tol[n] * abs(s["lambda_min"])
                                                     and s["residual_max"] < tol[n] * abs(s["lambda_max"]))]
    steps = sorted(s["steps"] for _, _, s in every)
    outliers = [f"{n} {w} ({s['lambda_min']:.2f}, next {s['nodes'][1]:.2f})" for n, w, s in every if s["outlier"]]
    low = min(every, key=lambda e: e[2]["lambda_min"])
    settled = (f"{len(unsettled)} did not settle to the tolerance: " + ", ".join(f"{n} {w}" for n, w in unsettled)
               + "." if unsettled else "every extreme settled to the tolerance (residual bound below it).")
    reading = [f"Steps: {steps[0]} to {steps[-1]} Lanczos steps (median {statistics.median(steps):g}) per Hessian, "
               f"{len(every)} Hessians; {settled}"]
    reading.append("Negative outliers (λ_min settled and apart from the next Ritz value by over half its size): "
                   + (", ".join(outliers) if outliers else "none") + ".")
    reading.append(f"The most negative λ_min: {low[2]['lambda_min']:.2f} ({low[0]}, {low[1]}, λ_max "
                   f"{low[2]['lambda_max']:.1f}). Rangwani et al.'s CIFAR-10-LT tail class: -59.0, head class -1.7.")
    for n in names:
        by = {g: [s["ratio"] for s in res[n]["classes"].values() if s["group"] == g] for g in ("tail", "head")}
        reading.append(f"{n}: " + "; ".join(f"{g} classes' ratios {min(r):.4f} to {max(r):.4f}"
                                             for g, r in by.items() if r)
                       + "; groups: " + ", ".join(f"{g} {s['ratio']:.4f}" for g, s in res[n]["groups"].items() if s)
                       + ".")
    return ["\n".join(groups), "\n".join(classes), "\n".join(f"- {line}" for line in reading)]


def draw(runs, sigma, path):
    """Per run a column: the head and tail densities above, the single classes below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = in_table_order(runs)
    nodes = [x for n in names for part in ("groups", "classes") for s in runs[n]["result"][part].values()
             if s for x in s["nodes"]]
    a, b = math.asinh(min(nodes + [0])) - 0.5, math.asinh(max(nodes + [0])) + 0.5  # every node on the axis
    u = torch.linspace(a, b, 2001, dtype=torch.float64)  # asinh(λ)
    ticks = [t for t in sorted({0} | {s * 10 ** k for k in range(6) for s in (-1, 1)}) if a <= math.asinh(t) <= b]
    fig, axes = plt.subplots(2, len(names), figsize=(max(4 * len(names), 8), 6.5), squeeze=False,
                             sharex=True, sharey=True, constrained_layout=True)

    def curve(ax, s, **kw):
        d = density([math.asinh(t) for t in s["nodes"]], s["weights"], u, sigma)
        ax.plot(u, d.clamp(min=1e-7), **kw)
        ax.plot(math.asinh(s["lambda_min"]), 2e-7, "v" if s["outlier"] else "|", color=kw["color"], ms=8)

    for j, name in enumerate(names):
        r = runs[name]["result"]
        for g, colour in (("head", "tab:blue"), ("tail", "tab:red")):
            if r["groups"].get(g):
                curve(axes[0, j], r["groups"][g], color=colour, lw=1.2, label=f"L_{g}")
        for s in r["classes"].values():
            curve(axes[1, j], s, color="tab:red" if s["group"] == "tail" else "tab:blue", lw=0.8, alpha=0.6)
        axes[0, j].set_title(name, fontsize=10)
    for ax in axes.flat:
        ax.set_yscale("log")
        ax.set_ylim(1e-7, 10)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xticks([math.asinh(t) for t in ticks], [str(t) for t in ticks], fontsize=8)
        ax.set_xlim(a, b)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("density (groups)")
    axes[1, 0].set_ylabel("density (single classes:\nred tail, blue head)")
    for ax in axes[1]:
        ax.set_xlabel("Hessian eigenvalue λ (asinh axis)")
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend([plt.Line2D([], [], color=c) for c in ("tab:red", "tab:blue")],
                      ["a tail class", "a head class"], fontsize=8)
    fig.suptitle("Hessian spectra at the final weights; λ_min marked at the bottom (▼: a negative outlier)\n"
                 f"Lanczos nodes broadened by a Gaussian of width {sigma} in asinh(λ)", fontsize=10)
    save_png(fig, path)


def settings_of(args):
    return {"images": args.images, "steps": args.steps, "tol": args.tol, "rare": args.rare,
            "head_classes": args.head_classes, "class_images": args.class_images, "seed": args.seed,
            "precision": "fp32"}


def main(argv=None):
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="finished run folders, or folders holding them")
    p.add_argument("--images", type=int, default=1000, help="images per group (saddle.py's subset)")
    p.add_argument("--steps", type=int, default=100, help="most Lanczos steps per Hessian")
    p.add_argument("--tol", type=float, default=0.05, help="stop once both extremes' residual bounds are "
                                                            "below this fraction of their size")
    p.add_argument("--rare", type=int, default=10, help="the rarest classes, each with all its images")
    p.add_argument("--head_classes", type=int, default=3, help="head classes spread over the head's counts")
    p.add_argument("--class_images", type=int, default=100, help="images per head class (a seeded subset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and of each Lanczos start")
    p.add_argument("--sigma", type=float, default=0.05, help="the drawing's broadening, in asinh(λ)")
    p.add_argument("--data_dir", default="./datasets", help="folder holding the CIFAR python files")
    p.add_argument("--out", help="folder of spectrum.json and spectrum.png (default: the runs' folder)")
    p.add_argument("--redo", action="store_true", help="analyse runs that spectrum.json already holds")
    try:
        args = p.parse_args(argv)
        if min(args.images, args.rare + args.head_classes, args.class_images) < 1 or args.steps < 2 \
                or not 0 < args.tol < 1 or not args.sigma > 0:
            raise sm.UsageError("need --images, --class_images, --rare + --head_classes >= 1, --steps >= 2, "
                                "0 < --tol < 1 and --sigma > 0")
        folders = finished_runs(args.folders)
        loaded = {os.path.basename(os.path.normpath(f)): load_run(f) for f in folders}  # every check first
        out = args.out or os.path.dirname(os.path.normpath(folders[0]))
        if not os.path.isdir(out):
            raise sm.UsageError(f"--out {out} is not a folder")
        path = os.path.join(out, "spectrum.json")
        report = read_report(path, tables)
        settings, data = settings_of(args), {}
        for name, (cfg, state, _) in loaded.items():
            old = report["runs"].get(name)
            if old and old["settings"] == settings and not args.redo:
                print(f"{name}: already in {path} with these settings")
                continue
            key = (cfg.dataset, cfg.imb_factor, cfg.subset_seed)
            if key not in data:
                data[key] = sm.load_data(cfg.dataset, args.data_dir, cfg.imb_factor, cfg.subset_seed)
            result = analyse(cfg, state, data[key], args, name)
            print(summary_line(name, result), flush=True)
            report["runs"][name] = {"settings": settings, "result": result, "commit": sm.git_commit(),
                                    "cpu": sm.cpu_info(), "threads": torch.get_num_threads(),
                                    "torch": str(torch.__version__), "arch": cfg.arch, "eta": cfg.eta}
            report["runs"] = dict(sorted(report["runs"].items()))
            sm._atomic_write(path, json.dumps(report, indent=1))  # each run kept as soon as it is done
    except (sm.UsageError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if report["runs"]:
        draw(report["runs"], args.sigma, os.path.join(out, "spectrum.png"))
        print(f"{path}: {len(report['runs'])} runs; drew {os.path.join(out, 'spectrum.png')}\n")
        print("\n\n".join(tables(report)))
    return report


if __name__ == "__main__":
    main()
