"""curves.py -- the training curves of one or more runs: test Avg, Many, Med and Few, and the training
loss, against the epoch, with SSE-SAM's switch marked. The finished runs of one protocol (as
results_table.py groups them: a control is its own row) are drawn as their mean over the seeds with
a band from the lowest to the highest seed; a run in progress is drawn alone, dashed, as far as it is.

    python scripts/curves.py results/resnet32                  # every run under it -> its curves.png
    python scripts/curves.py results/resnet32/sgd-seed0 results/resnet32/sgd-seed0-fp32 --out sgd.png

A folder is a run (it holds summary.json, last.pt or train.log) or holds runs. A finished run (with
summary.json) is read from metrics.jsonl, and from train.log for the loss of every epoch; a run in
progress from the history in its last.pt, or else from its train.log. The test curves have a point
per evaluation (every 10 epochs in the table's runs), the loss one per epoch. All runs must be of
one network and data set. --out [the runs' folder/curves.png]. Exit codes: 0, 2 bad input (one line,
nothing written).
"""

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import ssesam_minimal as sm  # noqa: E402
from results_table import protocol, table_order  # noqa: E402

PROG = "curves.py"
TEST = ("avg", "many", "med", "few")
# an epoch line of ssesam_minimal.py's log, up to its test columns
EPOCH_LINE = re.compile(r"epoch +(\d+)/(\d+) lr \S+ rho_h (\S+) rho_t \S+ loss (\S+) train +\S+ \| test (.*?) \|")
FIRST_LINE = re.compile(r"^(\S+) IF (\S+): .*?; (\S+) [\d.]+ M params; (\w+) \+ ", re.M)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise sm.UsageError(message)


def parse_log(path):
    """(what the first line says, {epoch: row}) of a train.log; an epoch logged twice (a piece that
    ran past its last saved epoch) keeps its last line, the one the run went on from."""
    with open(path, errors="replace") as fh:
        text = fh.read()
    head = FIRST_LINE.search(text)
    if head is None:
        raise sm.UsageError(f"{path} is not a log of ssesam_minimal.py (no first line)")
    rows = {}
    for m in EPOCH_LINE.finditer(text):
        epoch, epochs, rho_head, loss, test = m.groups()
        row = {"epoch": int(epoch), "epochs": int(epochs), "rho_head": float(rho_head), "loss": float(loss)}
        values = dict(re.findall(r"(avg|many|med|few) +(\S+)", test))
        row.update({k: None if values[k] == "--" else float(values[k]) for k in values})
        rows[row["epoch"]] = row
    dataset, _, arch, opt = head.groups()
    return {"dataset": dataset, "arch": arch, "opt": opt}, rows


def read_run(folder):
    """{"name", "config" (dataset, arch, opt, epochs), "rows": per-epoch dicts, "done": bool}."""
    files = {n: os.path.join(folder, n) for n in ("summary.json", "metrics.jsonl", "last.pt", "train.log")}
    has = {n: os.path.isfile(p) for n, p in files.items()}
    name = os.path.basename(os.path.normpath(folder))
    if has["summary.json"]:  # finished: metrics.jsonl is part of it
        try:
            with open(files["summary.json"]) as fh:
                summary = json.load(fh)
            config = summary["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise sm.UsageError(f"{files['summary.json']} is damaged ({type(e).__name__})")
        if not has["metrics.jsonl"]:
            raise sm.UsageError(f"{folder} is a finished run without its metrics.jsonl")
        try:
            with open(files["metrics.jsonl"]) as fh:
                evaluated = {r["epoch"]: r for r in map(json.loads, filter(str.strip, fh))}
        except (ValueError, KeyError, TypeError) as e:
            raise sm.UsageError(f"{files['metrics.jsonl']} is damaged ({type(e).__name__})")
        rows = parse_log(files["train.log"])[1] if has["train.log"] else {}
        for e, r in evaluated.items():  # the exact test numbers over the log's rounded ones
            rows[e] = {**rows.get(e, {}), **r}
        done, kind = True, protocol_of(summary)
    elif has["last.pt"]:
        try:
            ckpt = sm.load_checkpoint(files["last.pt"])
        except sm.UsageError as e:  # its advice to delete last.pt is for a resume, not for a picture
            raise sm.UsageError(str(e).split("; delete it")[0]) from None
        config, rows, done = ckpt["config"], {r["epoch"]: r for r in ckpt["history"]}, False
        kind = protocol_of({"config": config, **ckpt["pieces"][-1]})
    elif has["train.log"]:
        config, rows = parse_log(files["train.log"])
        if rows:
            config["epochs"] = next(iter(rows.values()))["epochs"]
        done, kind = False, None
    else:
        raise sm.UsageError(f"{folder} holds no run (no summary.json, last.pt or train.log)")
    config = {k: config.get(k) for k in ("dataset", "arch", "opt", "epochs")}
    return {"name": name, "config": config, "rows": [rows[e] for e in sorted(rows)], "done": done,
            "protocol": kind}


def protocol_of(summary):
    """What a run computes (results_table.protocol), or None where the record lacks it."""
    try:
        return protocol(summary)
    except (KeyError, TypeError, AttributeError):
        return None


def groups_of(runs):
    """[(label, [runs])]: finished runs of one protocol together (their seeds), each run in progress
    or without a full record alone; labelled by the first one's folder name without its seed."""
    groups = {}
    for run in runs:
        key = (run["protocol"], run["config"]["opt"]) if run["done"] and run["protocol"] else run["name"]
        groups.setdefault(key, []).append(run)
    out = []
    for members in sorted(groups.values(), key=lambda ms: (table_order(ms[0]["config"]["opt"]), ms[0]["name"])):
        base = re.sub(r"-seed\d+", "", members[0]["name"])
        seeds = sorted(re.findall(r"-seed(\d+)", m["name"])[0] for m in members if "-seed" in m["name"])
        label = (members[0]["name"] + f" (in progress, epoch {members[0]['rows'][-1]['epoch'] if members[0]['rows'] else 0})"
                 if not members[0]["done"] else f"{base}, seed{'s' * (len(seeds) > 1)} {', '.join(seeds)}"
                 if seeds else base)
        out.append((label, members))
    return out


def find_runs(paths):
    """The run folders named, or held one level down by the folders named."""
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise sm.UsageError(f"{path} is not a folder")
        marks = ("summary.json", "last.pt", "train.log")
        if any(os.path.isfile(os.path.join(path, m)) for m in marks):
            runs.append(path)
            continue
        inside = sorted(os.path.join(path, d) for d in os.listdir(path)
                        if any(os.path.isfile(os.path.join(path, d, m)) for m in marks))
        if not inside:
            raise sm.UsageError(f"{path} holds no run")
        runs += inside
    return runs


def switch_epoch(rows):
    """The last epoch with ρ_head > 0 in a run whose ρ_head later drops to 0, or None."""
    last = [r["epoch"] for r in rows if r.get("rho_head", 0) > 0]
    if last and any(r["epoch"] > last[-1] for r in rows):
        return last[-1]
    return None


def save_png(fig, path):
    """Write fig to path.tmp.png, then rename it over path: path is the old picture or the whole
    new one, never a part (as sm._atomic_write for the other files). The figure is closed."""
    import matplotlib.pyplot as plt

    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def draw(runs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    panels = dict(zip(TEST + ("loss",), axes.flat))
    titles = {"avg": "test Avg (mean per-class accuracy, %)", "many": "test Many (%)", "med": "test Med (%)",
              "few": "test Few (%)", "loss": "training loss (at w)"}
    notes = []
    for i, (label, members) in enumerate(groups_of(runs)):
        colour, style = f"C{i % 10}", "-" if members[0]["done"] else "--"
        for key, ax in panels.items():
            # the epochs every member has a value at: the mean, and the lowest to the highest seed
            per = [{r["epoch"]: r[key] for r in m["rows"] if r.get(key) is not None} for m in members]
            epochs = sorted(set.intersection(*(set(p) for p in per)))
            if not epochs:
                continue
            values = [[p[e] for p in per] for e in epochs]
            mean = [sum(v) / len(v) for v in values]
            ax.plot(epochs, mean, ls=style, marker=None if key == "loss" else ".", color=colour, lw=1.2, ms=4,
                    label=label)
            if len(members) > 1:
                ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], color=colour,
                                alpha=0.2, lw=0)
        cut = switch_epoch(members[0]["rows"]) if members[0]["config"]["opt"] == "ssesam" else None
        if cut is not None:
            for ax in panels.values():
                ax.axvline(cut + 0.5, color=colour, ls=":", lw=1)
            notes.append(f"{label}: rho_head = 0 after epoch {cut} (dotted)")
    epochs = max(r["config"]["epochs"] or r["rows"][-1]["epoch"] for r in runs if r["rows"])
    for key, ax in panels.items():
        ax.set_xlim(0, epochs + 1)  # every panel spans the whole run, finished or not
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    legend = axes.flat[-1]
    legend.axis("off")
    handles, labels = panels["loss"].get_legend_handles_labels()
    legend.legend(handles, labels, loc="upper left", fontsize=9, frameon=False)
    cfg = runs[0]["config"]
    legend.text(0, 0.05, "\n".join([f"{cfg['arch']}, {cfg['dataset']}; a line is the mean over a row's seeds, "
                                    "the band spans its lowest and highest seed; dashed: in progress"] + notes),
                fontsize=8, transform=legend.transAxes, va="bottom", wrap=True)
    save_png(fig, out)


def main(argv=None):
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="run folders, or folders holding runs")
    p.add_argument("--out", help="the picture to write (default: the runs' folder/curves.png)")
    try:
        args = p.parse_args(argv)
        folders = find_runs(args.folders)
        runs = [read_run(f) for f in folders]
        shapes = {(r["config"]["arch"], r["config"]["dataset"]) for r in runs}
        if len(shapes) > 1:
            raise sm.UsageError("the runs are of different networks or data sets: "
                           + ", ".join(f"{r['name']} {r['config']['arch']} {r['config']['dataset']}" for r in runs))
        if not any(r["rows"] for r in runs):
            raise sm.UsageError("no run has finished an epoch yet")
        parents = {os.path.dirname(os.path.normpath(f)) for f in folders}
        out = args.out or os.path.join(sorted(parents)[0], "curves.png")
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise sm.UsageError(f"--out {out}: no such folder")
        draw(runs, out)
    except (sm.UsageError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    for r in runs:
        last = r["rows"][-1]["epoch"] if r["rows"] else 0
        print(f"{r['name']}: {last} of {r['config']['epochs']} epochs" + ("" if r["done"] else ", in progress"))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
