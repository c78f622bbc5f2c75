"""Print the results tables (markdown) for one network's runs: results_table.py results/<arch>.

Reads <folder>/<opt>-seed<k>/summary.json as ssesam_minimal.py writes it. Two tables, mean ± std
over seeds (sample std; a single seed shows no ±):
  * last epoch, no test-time augmentation: the headline;
  * best of the test evaluations by Avg (chosen on the test set), re-scored with flip TTA: what
    the official code reports.
Each beside the seed README's row.
"""

import glob
import json
import os
import statistics
import sys

ROWS = [("sgd", "CE (SGD)"), ("sam", "+SAM"), ("imbsam", "+ImbSAM"), ("ssesam", "+SSE-SAM")]
SEED_TABLE = {"sgd": (74.3, 43.1, 11.6, 44.6), "sam": (75.3, 45.6, 12.9, 46.2),   # Many Med Few Avg
              "imbsam": (72.3, 50.4, 16.6, 47.9), "ssesam": (71.7, 54.5, 17.1, 49.3)}


def mean_std(values):
    if any(v is None for v in values):  # a group with no class in it (Few on CIFAR-10 IF 10)
        return "--"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(folder):
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*-seed*", "summary.json"))):
        with open(path) as fh:
            s = json.load(fh)
        runs.setdefault(s["config"]["opt"], []).append(s)
    if not runs:
        print(f"results_table.py: no */summary.json under {folder}", file=sys.stderr)
        return 2
    any_run = next(iter(runs.values()))[0]
    print(f"{any_run['config']['arch']}, {any_run['params'] / 1e6:.2f} M parameters, "
          f"{any_run['config']['epochs']} epochs; {any_run['device_name']}, torch {any_run['torch']}\n")
    for title, part, suffix in (("Last epoch (headline)", "final", ""),
                                ("Best test evaluation by Avg, re-scored with flip TTA "
                                 "(chosen on the test set, as the official code reports)", "best", "_tta")):
        print(f"{title}\n")
        print("| row | seeds | Many | Med | Few | Avg | seed README Avg | minutes per run |")
        print("|---|---|---|---|---|---|---|---|")
        for opt, name in ROWS:
            if opt not in runs:
                continue
            rs = runs[opt]
            cells = [mean_std([r[part][k + suffix] for r in rs]) for k in ("many", "med", "few", "avg")]
            minutes = mean_std([r["seconds"] / 60 for r in rs])
            print(f"| {name} | {len(rs)} | {' | '.join(cells)} | {SEED_TABLE[opt][3]} | {minutes} |")
        print()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python scripts/results_table.py results/<arch>", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
