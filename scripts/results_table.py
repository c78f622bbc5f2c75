"""Print the results tables (markdown) for one network's runs: results_table.py results/<arch>.

Reads <folder>/<opt>-seed<k>[suffix]/summary.json as ssesam_minimal.py writes it. A row is an
optimizer in one precision, so a control run in another precision (sgd-seed0-fp32 beside the bf16
sgd-seed0) is its own row, never a second seed. Two tables, mean ± std over seeds (sample std; a
single seed shows no ±):
  * last epoch, no test-time augmentation: the headline;
  * best of the test evaluations by Avg (chosen on the test set), re-scored with flip TTA: what
    the official code reports.
Each beside the seed README's row, with the hours per run; where one optimizer has rows in two
precisions, a row below gives their difference. The first line says where the runs were made.
Exit codes: 0, 2 no finished run or a damaged summary.json (one line).
"""

import glob
import json
import os
import statistics
import sys

ROWS = [("sgd", "CE (SGD)"), ("sam", "+SAM"), ("imbsam", "+ImbSAM"), ("ssesam", "+SSE-SAM")]
SEED_TABLE = {"sgd": (74.3, 43.1, 11.6, 44.6), "sam": (75.3, 45.6, 12.9, 46.2),   # Many Med Few Avg
              "imbsam": (72.3, 50.4, 16.6, 47.9), "ssesam": (71.7, 54.5, 17.1, 49.3)}
KEYS = ("many", "med", "few", "avg")


def mean_std(values):
    if any(v is None for v in values):  # a group with no class in it (Few on CIFAR-10 IF 10)
        return "--"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def precision_of(s):
    """The run's precision; summaries written before it was recorded ran bf16 on CUDA only."""
    if "precision" in s:
        return s["precision"]
    return "bf16" if s["device"].startswith("cuda") and s["config"].get("bf16", True) else "fp32"


def where(s):
    """Where a run was made: the GPU, or the CPU with its family, model and thread count."""
    if s.get("device", "cpu").startswith("cuda"):
        return s["device_name"]
    cpu = s.get("cpu")
    if cpu is None:
        return "cpu"
    return f"{cpu['name']} (family {cpu['family']} model {cpu['model']}), {s['threads']} threads"


def load_runs(folder):
    """{(opt, precision): [summary, ...]} of the finished runs under folder."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*-seed*", "summary.json"))):
        try:
            with open(path) as fh:
                s = json.load(fh)
            key = (s["config"]["opt"], precision_of(s))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a summary.json of ssesam_minimal.py ({type(e).__name__})")
        runs.setdefault(key, []).append(s)
    return runs


def table(runs, part, suffix):
    """One table's markdown lines: part "final" or "best", suffix "" or "_tta"."""
    lines = ["| row | precision | seeds | Many | Med | Few | Avg | seed README Avg | hours per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for opt, name in ROWS:
        keys = sorted(k for k in runs if k[0] == opt)
        for key in keys:
            rs = runs[key]
            cells = [mean_std([r[part][k + suffix] for r in rs]) for k in KEYS]
            hours = mean_std([r["seconds"] / 3600 for r in rs])
            lines.append(f"| {name} | {key[1]} | {len(rs)} | {' | '.join(cells)} | {SEED_TABLE[opt][3]} | "
                         f"{hours} |")
        if len(keys) == 2:  # the same optimizer in two precisions: the second minus the first
            (a, b), diffs = keys, []
            for k in KEYS:
                va, vb = ([r[part][k + suffix] for r in runs[key]] for key in keys)
                diffs.append("--" if None in va + vb else f"{statistics.mean(vb) - statistics.mean(va):+.1f}")
            lines.append(f"| {name}: {b[1]} − {a[1]} | | | {' | '.join(diffs)} | | |")
    return lines


def main(folder):
    try:
        runs = load_runs(folder)
    except ValueError as e:
        print(f"results_table.py: error: {e}", file=sys.stderr)
        return 2
    if not runs:
        print(f"results_table.py: no */summary.json under {folder}", file=sys.stderr)
        return 2
    every = [r for rs in runs.values() for r in rs]
    made = "; ".join(sorted({where(r) for r in every}))
    torches = ", ".join(sorted({r["torch"] for r in every}))
    print(f"{every[0]['config']['arch']}, {every[0]['params'] / 1e6:.2f} M parameters, "
          f"{every[0]['config']['epochs']} epochs; made on {made}; torch {torches}\n")
    for title, part, suffix in (("Last epoch (headline)", "final", ""),
                                ("Best test evaluation by Avg, re-scored with flip TTA "
                                 "(chosen on the test set, as the official code reports)", "best", "_tta")):
        print(f"{title}\n")
        print("\n".join(table(runs, part, suffix)))
        print()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python scripts/results_table.py results/<arch>", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
