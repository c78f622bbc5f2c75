"""evaluate.py -- each finished run's model.pt evaluated again on the test set, against the final
numbers its summary.json holds: do the saved weights give the table's numbers?

    python scripts/evaluate.py results/resnet32               # every finished run under it
    python scripts/evaluate.py results/resnet32/sgd-seed0     # one run

Each run's model.pt is loaded into the network of its summary.json and evaluated with the module's
evaluate() on the test set of its data set, read from --data_dir [./datasets]: first in the
run's precision (a bf16 run through the loop's bf16 forward), which is compared with summary.json's
"final", then in fp32, which shows how far the precision of evaluation moves the numbers. On the
CPU the evaluation uses the run's thread count. bf16 evaluations repeat exactly only on the CPU
model (or GPU) and thread count of the run: elsewhere expect differences of a few hundredths of a
point. Exit codes: 0 every run gives its final numbers again, 1 one does not, 2 bad input (one line).
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repo root (ssesam_minimal.py), saddle.py's
import ssesam_minimal as sm  # noqa: E402
from saddle import build_net, finished_runs, load_run  # noqa: E402

PROG = "evaluate.py"
KEYS = ("avg", "many", "med", "few", "avg_tta", "many_tta", "med_tta", "few_tta")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise sm.UsageError(message)


def read_summary(summary, folder):
    """summary.json's precision, threads and final numbers, or one line on what is missing."""
    try:
        return summary.get("precision", "fp32"), summary.get("threads"), {k: summary["final"][k] for k in KEYS}
    except (KeyError, TypeError) as e:
        raise sm.UsageError(f"{os.path.join(folder, 'summary.json')} has no final numbers ({type(e).__name__} {e})")


def line(numbers):
    fmt = lambda v: "--" if v is None else f"{v:.2f}"  # noqa: E731 (None: a group with no class)
    return (" ".join(f"{k} {fmt(numbers[k])}" for k in KEYS[:4]) + " | flip-TTA "
            + " ".join(f"{k[:-4]} {fmt(numbers[k])}" for k in KEYS[4:]))


def largest_difference(a, b):
    return max(abs(a[k] - b[k]) if None not in (a[k], b[k]) else 0.0 if a[k] == b[k] else float("inf")
               for k in KEYS)


def main(argv=None):
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="finished run folders, or folders holding them")
    p.add_argument("--data_dir", default="./datasets", help="folder holding the CIFAR python files")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    threads = torch.get_num_threads()
    try:
        args = p.parse_args(argv)
        device = sm.resolve_device(sm.Config(device=args.device))  # the module's check of --device
        runs = {}
        for folder in finished_runs(args.folders):  # every check before the first evaluation
            cfg, state, summary = load_run(folder)
            name = os.path.basename(os.path.normpath(folder))
            net = build_net(cfg, state, len(sm.data_counts(cfg.dataset, cfg.imb_factor)[0]), name)
            runs[name] = (cfg, net, *read_summary(summary, folder))
        data = {(c.dataset, c.imb_factor, c.subset_seed): None for c, *_ in runs.values()}
        for key in data:  # each data set once, all of them before the first line is printed
            data[key] = sm.load_data(key[0], args.data_dir, *key[1:])
        results = {}
        for name, (cfg, net, run_precision, run_threads, final) in runs.items():
            _, _, x_test, y_test, counts, n_max = data[(cfg.dataset, cfg.imb_factor, cfg.subset_seed)]
            net = net.to(device, memory_format=torch.channels_last)
            if device.type == "cpu" and run_threads:
                torch.set_num_threads(run_threads)  # a bf16 sum splits by thread: the run's count repeats it
            x_test, y_test = x_test.to(device), y_test.to(device)
            got = {}
            for prec in dict.fromkeys((run_precision, "fp32")):  # the run's first, then fp32
                model = sm.Bf16Forward(net) if prec == "bf16" else net
                got[prec] = sm.evaluate(model, x_test, y_test, counts, n_max, cfg.test_batch_size)
            same = all(got[run_precision][k] == final[k] for k in KEYS)
            results[name] = {"precision": run_precision, "final": final, "same": same, **got}
            print(f"{name} ({run_precision}, as trained): {line(got[run_precision])} -- "
                  + ("equal to summary.json's final" if same else
                     "differs from summary.json's final, by up to "
                     f"{largest_difference(got[run_precision], final):.3g} points: {line(final)}"))
            if run_precision != "fp32":
                print(f"{name} (fp32): {line(got['fp32'])}")
    except (sm.UsageError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        torch.set_num_threads(threads)
    if not all(r["same"] for r in results.values()):
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
