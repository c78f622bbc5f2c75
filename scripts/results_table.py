"""Print the results tables (markdown) for one network's runs: results_table.py results/<arch>.

Reads <folder>/<opt>-seed<k>[suffix]/summary.json as ssesam_minimal.py writes it. A row is one
protocol: an optimizer with every setting that changes what is computed (all of the config but the
seed and where or how often a run reports), in one precision, on a CPU or a GPU. So a control (the
SGD row again in fp32, a run made on a GPU, a run with other settings) is its own row beside its
optimizer's main row (the one with the most seeds), never a second seed of it. Printed:
  * two tables, mean ± sample standard deviation (n − 1) over the row's seeds (one seed: no ±),
    beside the seed README's row, with the hours per run: the last epoch, no test-time
    augmentation (the headline); and the best of the test evaluations by Avg (chosen on the test
    set), re-scored with flip TTA (what the official code reports). Under a control, its
    difference to its main row, paired over the seeds both have;
  * each seed's own last-epoch numbers;
  * the paired differences of the main rows at the last epoch (to SGD, and between the SAM
    variants), per seed and as mean ± std;
  * what they show: whether the paper's order of the Avg appears; the controls' largest Avg
    difference as the noise floor; each paired difference weighed by the rule (every seed outside
    the floor with one sign, the mean over twice its std) and the groups where its seeds agree.
The first line says where the runs were made. Exit codes: 0, 2 no finished run or a damaged
summary.json (one line).
"""

import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import ssesam_minimal as sm  # noqa: E402

ROWS = [("sgd", "CE (SGD)"), ("sam", "+SAM"), ("imbsam", "+ImbSAM"), ("ssesam", "+SSE-SAM")]
OPTS = tuple(opt for opt, _ in ROWS)
NAMES = {"sgd": "SGD", "sam": "SAM", "imbsam": "ImbSAM", "ssesam": "SSE-SAM"}
SEED_TABLE = {"sgd": (74.3, 43.1, 11.6, 44.6), "sam": (75.3, 45.6, 12.9, 46.2),   # Many Med Few Avg
              "imbsam": (72.3, 50.4, 16.6, 47.9), "ssesam": (71.7, 54.5, 17.1, 49.3)}
KEYS = ("many", "med", "few", "avg")
PAPER_ORDER = ("ssesam", "imbsam", "sam", "sgd")  # the paper's Avg, best first
PAIRS = [("sam", "sgd"), ("imbsam", "sgd"), ("ssesam", "sgd"), ("ssesam", "sam"), ("ssesam", "imbsam"),
         ("imbsam", "sam")]
# settings that say where a run ran or how often it reported, not what it computed: those --resume
# lets change, and the seed (what tells two runs of one row apart)
NOT_PROTOCOL = {"seed", *sm.RUN_ONLY}


def table_order(opt):
    """Where an optimizer's row stands in the table; any other optimizer after the four."""
    return OPTS.index(opt) if opt in OPTS else len(OPTS)


def in_table_order(names):
    """Run or row names (<opt>-seed<k>[suffix], <opt>[-suffix]) in the table's order, then by name."""
    return sorted(names, key=lambda n: (table_order(n.split("-")[0]), n))


def mean_std(values, decimals=1, sign=""):
    """The mean ± the sample std (one value: itself), to `decimals`; sign "+" for a difference."""
    if any(v is None for v in values):  # a group with no class in it (Few on CIFAR-10 IF 10)
        return "--"
    if len(values) == 1:
        return f"{values[0]:{sign}.{decimals}f}"
    return f"{statistics.mean(values):{sign}.{decimals}f} ± {statistics.stdev(values):.{decimals}f}"


def signed(values, decimals=1):
    """mean_std with a sign: a difference."""
    return mean_std(values, decimals, "+")


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


def protocol(s):
    """(opt, precision, cpu or cuda, the computing settings as a sorted tuple) of a summary."""
    settings = tuple(sorted((k, json.dumps(v)) for k, v in s["config"].items() if k not in NOT_PROTOCOL | {"bf16"}))
    return s["config"]["opt"], precision_of(s), "cuda" if s.get("device", "cpu").startswith("cuda") else "cpu", settings


def load_runs(folder):
    """{protocol: {seed: summary}} of the finished runs under folder."""
    runs, paths = {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "*-seed*", "summary.json"))):
        try:
            with open(path) as fh:
                s = json.load(fh)
            key, seed = protocol(s), s["config"]["seed"]
            if not all(k + sfx in s[part] for part in ("final", "best") for k in KEYS for sfx in ("", "_tta")) \
                    or not isinstance(s["seconds"], (int, float)) or s["params"] is None or s["torch"] is None:
                raise KeyError("a number the tables read")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a summary.json of ssesam_minimal.py ({type(e).__name__})")
        if (key, seed) in paths:
            raise ValueError(f"{paths[key, seed]} and {path} are two runs of one row with seed {seed}")
        runs.setdefault(key, {})[seed], paths[key, seed] = s, path
    return runs


def rows_of(runs):
    """[(label, key, main key)] in the table's order: each optimizer's main row (the most seeds; then
    bf16 before fp32, the CPU before the GPU), then its controls, labelled by what differs."""
    out = []
    for opt, name in ROWS:
        keys = sorted((k for k in runs if k[0] == opt), key=lambda k: (-len(runs[k]), k[2], k[1], k[3]))
        for key in keys:
            main, mine, theirs = keys[0], dict(key[3]), dict(keys[0][3])
            differ = [f"{k} {json.loads(mine[k]) if k in mine else '(unset)'}"
                      for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
            differ += ["GPU" if key[2] == "cuda" else "CPU"] if key[2] != main[2] else []
            out.append((name + (f" ({', '.join(differ)})" if differ else ""), key, main))
    return out


def paired(runs, a, b, part="final", suffix=""):
    """{key: [a - b for each seed both rows have]} over KEYS; None where a value is missing."""
    seeds = sorted(set(runs[a]) & set(runs[b]))
    out = {}
    for k in KEYS:
        va = [runs[a][s][part][k + suffix] for s in seeds]
        vb = [runs[b][s][part][k + suffix] for s in seeds]
        out[k] = None if None in va + vb else [x - y for x, y in zip(va, vb)]
    return seeds, out


def table(runs, part, suffix):
    """One table's markdown lines: part "final" or "best", suffix "" or "_tta"."""
    lines = ["| row | precision | seeds | Many | Med | Few | Avg | seed README Avg | hours per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, key, main in rows_of(runs):
        rs = list(runs[key].values())
        cells = [mean_std([r[part][k + suffix] for r in rs]) for k in KEYS]
        hours = mean_std([r["seconds"] / 3600 for r in rs])
        lines.append(f"| {label} | {key[1]} | {len(rs)} | {' | '.join(cells)} | {SEED_TABLE[key[0]][3]} | "
                     f"{hours} |")
        if key != main:  # a control: its difference to the main row, seed by seed
            seeds, d = paired(runs, key, main, part, suffix)
            diffs = ["--" if d[k] is None or not seeds else f"{statistics.mean(d[k]):+.1f}" for k in KEYS]
            lines.append(f"| {label}: {key[1]} − {main[1]} | | | {' | '.join(diffs)} | | |")
    return lines


def main_rows(runs):
    return {key[0]: key for _, key, main in rows_of(runs) if key == main}


def seeds_table(runs):
    lines = ["| row | precision | seed | Many | Med | Few | Avg |", "|---|---|---|---|---|---|---|"]
    for label, key, _ in rows_of(runs):
        for seed, s in sorted(runs[key].items()):
            lines.append(f"| {label} | {key[1]} | {seed} | " + " | ".join(
                "--" if s["final"][k] is None else f"{s['final'][k]:.1f}" for k in KEYS) + " |")
    return lines


def differences_table(runs):
    """The main rows' paired differences at the last epoch, mean ± std and Avg per seed."""
    main = main_rows(runs)
    lines = ["| difference | seeds | Many | Med | Few | Avg | Avg per seed |", "|---|---|---|---|---|---|---|"]
    for a, b in PAIRS:
        if a in main and b in main:
            seeds, d = paired(runs, main[a], main[b])
            if seeds:
                cells = ["--" if d[k] is None else signed(d[k]) for k in KEYS]
                per_seed = ", ".join(f"{x:+.1f}" for x in d["avg"])
                lines.append(f"| {NAMES[a]} − {NAMES[b]} | {len(seeds)} | {' | '.join(cells)} | {per_seed} |")
    return lines


def evidence(values):
    """The rule a difference must pass to count: every seed gives it the same sign and, over two or
    more seeds, its mean is more than twice its sample std."""
    return (len({x > 0 for x in values}) == 1 and 0 not in values
            and (len(values) < 2 or abs(statistics.mean(values)) > 2 * statistics.stdev(values)))


def reading(runs):
    """What the last-epoch numbers can say, in sentences made from them."""
    main, out = main_rows(runs), []
    common = sorted(set.intersection(*(set(runs[main[o]]) for o in PAPER_ORDER))) \
        if set(PAPER_ORDER) <= set(main) else []
    if common:  # the means over the seeds every row has, so that each row averages the same draws
        means = {o: statistics.mean(runs[main[o]][s]["final"]["avg"] for s in common) for o in PAPER_ORDER}
        here = sorted(PAPER_ORDER, key=lambda o: -means[o])
        seeds = ", ".join(map(str, common))
        over = f"seed {seeds}, the only seed" if len(common) == 1 else f"the means over seeds {seeds}, the seeds"
        out.append("The paper's order of the Avg, " + " > ".join(NAMES[o] for o in PAPER_ORDER)
                   + (", appears" if here == list(PAPER_ORDER) else ", does not appear")
                   + f" in {over} all four rows have: " + ", ".join(f"{NAMES[o]} {means[o]:.1f}" for o in here) + ".")
    floors = [abs(x) for label, key, m in rows_of(runs) if key != m for x in paired(runs, key, m)[1]["avg"] or []]
    if not floors:
        return out + ["No control run: nothing here says how far one run moves, so no difference below is weighed."]
    floor = max(floors)
    out.append(f"Noise floor: the largest last-epoch Avg difference between a control and its main row, "
               f"seed by seed, is {floor:.1f}; a difference between rows inside it is not evidence. A "
               f"difference is evidence when every seed puts it outside the floor with the same sign and "
               f"its mean is more than twice its sample std.")
    for a, b in PAIRS:
        if a in main and b in main:
            seeds, d = paired(runs, main[a], main[b])
            if not seeds:
                continue
            avg = d["avg"]
            every = "both" if len(avg) == 2 else f"all {len(avg)}"
            inside = sum(abs(x) <= floor for x in avg)
            if inside == len(avg):
                verdict = "inside the floor: not evidence"
            elif len({x > 0 for x in avg}) > 1:
                verdict = "its sign changes between seeds: not evidence"
            elif inside:
                verdict = f"inside the floor in {inside} of {len(avg)} seeds: not evidence"
            elif len(avg) == 1:
                verdict = f"{abs(avg[0]) / floor:.1f} times the floor, one seed"
            elif not evidence(avg):
                verdict = f"the same sign in {every} seeds, but the mean is within twice its std: not evidence"
            else:
                ratios = sorted(abs(x) / floor for x in avg)
                verdict = f"evidence: {ratios[0]:.1f} to {ratios[-1]:.1f} times the floor in {every} seeds"
            where_ = [f"{k.capitalize()} {signed(d[k])}" for k in KEYS[:3]
                      if len(seeds) > 1 and d[k] is not None and evidence(d[k])]
            out.append(f"{NAMES[a]} − {NAMES[b]}: {signed(avg)} Avg ({verdict})."
                       + (f" The seeds agree (same sign, mean over twice its std) in {', '.join(where_)}."
                          if where_ else ""))
    single = [NAMES.get(o, o) for o, key in main.items() if len(runs[key]) < 2]
    if single and len(single) == len(main):
        out.append("One seed per row: no spread between runs, so none of these differences is a ranking.")
    elif single:
        out.append(f"Rows with one seed ({', '.join(single)}): no spread between their runs, so no difference "
                   "with them is a ranking.")
    return out


def main(folder):
    try:
        runs = load_runs(folder)
    except ValueError as e:
        print(f"results_table.py: error: {e}", file=sys.stderr)
        return 2
    if not runs:
        print(f"results_table.py: no */summary.json under {folder}", file=sys.stderr)
        return 2
    every = [r for rs in runs.values() for r in rs.values()]
    made = "; ".join(sorted({where(r) for r in every}))
    torches = ", ".join(sorted({r["torch"] for r in every}))
    print(f"{every[0]['config']['arch']}, {every[0]['params'] / 1e6:.2f} M parameters, "
          f"{every[0]['config']['epochs']} epochs; made on {made}; torch {torches}\n")
    for title, lines in (("Last epoch (headline)", table(runs, "final", "")),
                         ("Best test evaluation by Avg, re-scored with flip TTA "
                          "(chosen on the test set, as the official code reports)", table(runs, "best", "_tta")),
                         ("Each seed, last epoch", seeds_table(runs)),
                         ("Paired differences at the last epoch (the same seed: the same initial weights "
                          "and data order)", differences_table(runs))):
        print(f"{title}\n")
        print("\n".join(lines))
        print()
    print("What they show\n")
    print("\n".join(f"- {line}" for line in reading(runs)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python scripts/results_table.py results/<arch>", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
