"""multi_run.py -- several trainings in one process, each in its own thread (and CUDA stream).

    python scripts/multi_run.py "FLAGS OF RUN 1" "FLAGS OF RUN 2" ...
    python scripts/multi_run.py "--opt sgd --out runs/sgd" "--opt ssesam --out runs/ssesam --cuda_graph"

Each argument holds one run's ssesam_minimal.py flags, split as a shell would; --cuda_graph records
that run's steps as CUDA graphs (cuda_graph.py). Why: a small network leaves a large GPU mostly
idle; processes on one GPU take turns, while in one process each run's kernels go to its own CUDA
stream and can overlap. The runs share the data (read once) and the device. Outputs are
ssesam_minimal.py's; a run's lines go to <out>/train.log (without --out: stdout, as "[k] line").
Exit codes: 0; 2 bad input (one line, before anything trains); 1 a run failed (the others go on);
130 / 143 on SIGINT / SIGTERM (one line; each last.pt holds its run's last finished epoch).
"""

import contextlib
import importlib
import io
import os
import shlex
import signal
import sys
import threading
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repo root (ssesam_minimal.py), cuda_graph.py's
import ssesam_minimal as sm  # noqa: E402

PROG = "multi_run.py"
USAGE = f'usage: {PROG} "FLAGS OF RUN 1" ["FLAGS OF RUN 2" ...]   (ssesam_minimal.py flags per run)'
_PRINT_LOCK = threading.Lock()  # one stdout line at a time from the runs' threads


def _raise(signum, frame):  # SIGINT / SIGTERM in the main thread; the runs' threads cannot be stopped
    raise sm.Interrupted(signum)


def parse_runs(args):
    """[(cfg, checkpoint to resume or None, wrap_step or None)] and the shared device; or UsageError."""
    if not args:
        raise sm.UsageError("no run given; " + USAGE.split(": ", 1)[1])
    runs, outs, warnings = [], {}, io.StringIO()
    for k, text in enumerate(args, start=1):
        try:
            argv = shlex.split(text)
            if "-h" in argv or "--help" in argv:
                raise sm.UsageError("--help: see python ssesam_minimal.py --help for the flags")
            cfg = sm.parse_config([a for a in argv if a != "--cuda_graph"])
            with contextlib.redirect_stderr(warnings):  # --gpu without CUDA: its warning once
                dev = sm.resolve_device(cfg)
            resume = sm.prepare_out(cfg)  # exactly main()'s checks of --out and --resume
        except (ValueError, sm.UsageError) as e:  # ValueError: shlex's unbalanced quote
            raise sm.UsageError(f"run {k}: {e}")
        dev = torch.device("cuda", torch.cuda.current_device()) if str(dev) == "cuda" else dev  # cuda:N
        first, first_dev = (runs[0][0], runs[0][3]) if runs else (cfg, dev)
        synthetic = cfg.dataset == "synthetic"  # made in memory: no folder is read
        for name in ("dataset", "imb_factor", "subset_seed") + (() if synthetic else ("data_dir",)):
            if getattr(cfg, name) != getattr(first, name):
                raise sm.UsageError(f"run {k} differs from run 1 in --{name} ({getattr(cfg, name)} vs "
                                    f"{getattr(first, name)}): all runs share one data set")
        if dev != first_dev:
            raise sm.UsageError(f"run {k} differs from run 1 in its device ({dev} vs {first_dev}): all "
                                f"runs share one device")
        real = cfg.out and os.path.realpath(cfg.out)
        if real in outs:
            raise sm.UsageError(f"runs {outs[real]} and {k} both write --out {cfg.out}")
        outs.update({real: k} if real else {})
        wrap = importlib.import_module("cuda_graph").GraphedStep if "--cuda_graph" in argv else None
        runs.append((cfg, resume, wrap, dev))
    sys.stderr.write("".join(dict.fromkeys(warnings.getvalue().splitlines(True))))
    return [run[:3] for run in runs], runs[0][3]


class RunLog:
    """A run's log: <out>/train.log, flushed per line, or '[k] line' on stdout. `started` is set
    at the first line train() logs."""

    def __init__(self, k, cfg, header):
        self.k, self.started = k, threading.Event()
        self.fh = open(os.path.join(cfg.out, "train.log"), "a") if cfg.out is not None else None
        self.write(header)

    def write(self, line):
        with _PRINT_LOCK:
            out = self.fh or sys.stdout
            prefix = "" if self.fh else f"[{self.k}] "
            out.write("".join(f"{prefix}{part}\n" for part in str(line).split("\n")))
            out.flush()

    def __call__(self, line=""):
        self.write(line)
        self.started.set()


def run_one(k, cfg, resume, wrap, data, device, log, result):
    """Train and finish one run in the calling thread; result[k] = ("ok", summary) or ("failed",
    one line). Never raises."""
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        ckpt_path = None if cfg.out is None else os.path.join(cfg.out, "last.pt")
        with torch.cuda.stream(stream) if stream else contextlib.nullcontext():  # this run's own queue
            net, summary = sm.train(cfg, data, device, log=log, ckpt_path=ckpt_path, resume=resume,
                                    progress=False, wrap_step=wrap)
            result[k] = ("ok", sm.finish(cfg, net, summary, log=log))
    except BaseException as e:  # noqa: B902 -- a run's failure must not reach the other threads
        expected = isinstance(e, (sm.Diverged, sm.UsageError))
        msg = " ".join((str(e) if expected else f"{type(e).__name__}: {e}").split())
        if not expected:  # unexpected: keep the traceback in the run's log
            log.write(traceback.format_exc().rstrip())
        log.write(f"{PROG}: {msg}")
        result[k] = ("failed", msg)
    finally:
        log.started.set()  # a run that failed before its first line lets the next one start
        if log.fh is not None:
            log.fh.close()


def main(argv=None) -> list:
    """The command line: check every run, load the data once, train all in threads, report.
    Returns the runs' summaries (as sm.finish returns them) in command-line order."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args in (["-h"], ["--help"]):
        print(__doc__ + USAGE)
        return []
    # our own handlers, also where a script started us with SIGINT ignored
    old = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    threads, result = [], {}
    try:
        runs, device = parse_runs(args)
        cfg0 = runs[0][0]
        data = sm.load_data(cfg0.dataset, cfg0.data_dir, cfg0.imb_factor, cfg0.subset_seed)
        for cfg, _, _ in runs:
            if cfg.out is not None:
                os.makedirs(cfg.out, exist_ok=True)
        t0 = time.time()
        for k, (cfg, resume, wrap) in enumerate(runs, start=1):
            log = RunLog(k, cfg, f"{PROG}: run {k} of {len(runs)} in one process, one thread"
                         + (" and one CUDA stream" if device.type == "cuda" else "") + " each")
            run = (k, cfg, resume, wrap, data, device, log, result)
            threads.append(threading.Thread(target=run_one, args=run, daemon=True))
            threads[-1].start()
            # the next run starts once this one logged its first line: by then it has drawn its initial
            # weights from torch's global generator, the one thing runs share. So on the CPU each run
            # gives bit for bit what it gives alone. Short waits: a signal reaches this thread between them.
            while not log.started.wait(0.2):
                pass
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except sm.UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except sm.Interrupted as e:
        print(f"{PROG}: {e}" + ("; each run's last.pt holds its last finished epoch: continue with --resume"
                                if threads else " before any run started"), file=sys.stderr, flush=True)
        if not threads:
            raise SystemExit(128 + e.signum)
        sys.stdout.flush()
        os._exit(128 + e.signum)  # the threads stop in their unfinished epoch; last.pt is never partial
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    failed = []
    for k, (cfg, _, _) in enumerate(runs, start=1):
        where = cfg.out if cfg.out is not None else f"[{k}]"
        status, value = result[k]
        if status == "ok":
            print(f"{where}: final avg {value['final']['avg']:.2f}, {value['seconds']:.1f} s")
        else:
            failed.append(f"{PROG}: run {k} ({where}) failed: {value}")
    print(f"all runs: {time.time() - t0:.1f} s wall, {len(runs) - len(failed)} of {len(runs)} finished",
          flush=True)
    if failed:
        print("\n".join(failed), file=sys.stderr)
        raise SystemExit(1)
    return [result[k][1] for k in range(1, len(runs) + 1)]


if __name__ == "__main__":
    main()
