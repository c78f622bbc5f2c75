"""multi_run.py -- several trainings in one process, each in its own thread (and CUDA stream).

    python scripts/multi_run.py "FLAGS OF RUN 1" "FLAGS OF RUN 2" ...
    python scripts/multi_run.py "--opt sgd --out runs/sgd" "--opt ssesam --out runs/ssesam" \
        "--opt sam --out runs/sam --resume"

Each argument is one run's ssesam_minimal.py flags, split as a shell would (shlex). Why: a ResNet-32
step at batch 64 leaves a large GPU mostly idle. Separate processes on one GPU take turns (without
MPS their kernels do not run at the same time); in one process each run gets its own CUDA stream,
so the kernels of different runs can overlap, most of all when each step is one replayed CUDA
graph (--cuda_graph). On the CPU the runs' threads share the cores.

What is shared and what is not. The runs must agree on the data (--dataset, --imb_factor,
--subset_seed, and --data_dir for CIFAR) and on the device; the data is read once and shared
read-only. Everything else is each run's own: its network, optimizer, data order (each run draws
from its own torch.Generator), checkpoint and outputs. The initial weights are drawn one run at a
time (sm._INIT_LOCK), so on the CPU every run gives bit for bit what `python ssesam_minimal.py`
with the same flags gives (tested). On CUDA nothing is bitwise repeatable anyway.

Outputs are main()'s: --out gets metrics.jsonl, summary.json, model.pt and the rolling last.pt;
a run's log lines are appended to <out>/train.log (flushed per line), or, without --out, printed
to stdout as "[k] line" (k = the run's place on the command line, from 1). At the end one line per
run: its out folder (or [k]), final Avg and seconds, then the wall time of all.

Exit codes: 0 all runs finished; 2 bad input (one line on stderr, before anything trains, nothing
written); 1 one or more runs failed (a non-finite loss, or any error): the others run on to their
end, then one stderr line per failed run names its folder and the error, which also goes to its
train.log. 130 (SIGINT) / 143 (SIGTERM): Python threads cannot be interrupted, so the main thread
prints one line and ends the process at once (os._exit), after any run that is writing its final
outputs has finished writing them. Every last.pt is written whole or not at all (write, then
rename), so each run's last.pt holds its last finished epoch, and the same command with --resume
added to a run's flags continues it (scripts/reproduce.sh adds it by itself). What is lost: the
unfinished epoch of each run, and a stray last.pt.tmp if a checkpoint was being written (the next
write replaces it).
"""

import contextlib
import io
import os
import shlex
import signal
import sys
import threading
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import ssesam_minimal as sm  # noqa: E402

PROG = "multi_run.py"
USAGE = f'usage: {PROG} "FLAGS OF RUN 1" ["FLAGS OF RUN 2" ...]   (ssesam_minimal.py flags per run)'

_PRINT_LOCK = threading.Lock()   # one stdout line at a time from the runs' threads
_FINISH_LOCK = threading.Lock()  # held while a run writes its final outputs; an interrupt waits for it


class _Terminated(Exception):
    """SIGTERM arrived (raised in the main thread by the handler main() installs)."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _data_key(cfg):
    """What the data is: runs that differ here cannot share it."""
    key = {"dataset": cfg.dataset, "imb_factor": cfg.imb_factor, "subset_seed": cfg.subset_seed}
    if cfg.dataset != "synthetic":  # the synthetic set is made in memory: no folder is read
        key["data_dir"] = os.path.realpath(cfg.data_dir)
    return key


def _same_device(dev):
    """cuda and cuda:0 are one device when 0 is the current one."""
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def parse_runs(args):
    """[(cfg, checkpoint to resume or None)] and the shared device, or UsageError."""
    if not args:
        raise sm.UsageError("no run given; " + USAGE.split(": ", 1)[1])
    runs, devices, warnings = [], [], []
    for k, text in enumerate(args, start=1):
        try:
            argv = shlex.split(text)
        except ValueError as e:
            raise sm.UsageError(f"run {k}: cannot split its flags ({e})")
        if "-h" in argv or "--help" in argv:
            raise sm.UsageError(f"run {k}: --help: see python ssesam_minimal.py --help for the flags")
        try:
            cfg = sm.Config(**vars(sm.build_parser().parse_args(argv)))
            sm.check_config(cfg)
            buf = io.StringIO()
            with contextlib.redirect_stderr(buf):  # --gpu without CUDA: its warning once, not per run
                devices.append(_same_device(sm.resolve_device(cfg)))
            warnings += [w for w in buf.getvalue().splitlines() if w not in warnings]
        except sm.UsageError as e:
            raise sm.UsageError(f"run {k}: {e}")
        runs.append(cfg)
    first = _data_key(runs[0])
    for k, cfg in enumerate(runs[1:], start=2):
        for name, value in _data_key(cfg).items():
            if first.get(name) != value:
                raise sm.UsageError(f"run {k} differs from run 1 in --{name} ({value} vs "
                                    f"{first.get(name)}): all runs share one data set")
        if devices[k - 1] != devices[0]:
            raise sm.UsageError(f"run {k} differs from run 1 in its device ({devices[k - 1]} vs "
                                f"{devices[0]}): all runs share one device")
    outs = {}
    for k, cfg in enumerate(runs, start=1):
        if cfg.out is None:
            continue
        real = os.path.realpath(cfg.out)
        if real in outs:
            raise sm.UsageError(f"runs {outs[real]} and {k} both write --out {cfg.out}")
        outs[real] = k
    resumes = []
    for k, cfg in enumerate(runs, start=1):
        try:
            resumes.append(sm.prepare_out(cfg))  # exactly main()'s checks of --out and --resume
        except sm.UsageError as e:
            raise sm.UsageError(f"run {k}: {e}")
    for w in warnings:
        print(w, file=sys.stderr)
    return list(zip(runs, resumes)), devices[0]


class RunLog:
    """A run's log: appended to <out>/train.log and flushed per line, or '[k] line' on stdout."""

    def __init__(self, k, cfg):
        self.k = k
        self.fh = open(os.path.join(cfg.out, "train.log"), "a") if cfg.out is not None else None

    def __call__(self, line=""):
        if self.fh is not None:
            self.fh.write(f"{line}\n")
            self.fh.flush()
            return
        with _PRINT_LOCK:
            sys.stdout.write("".join(f"[{self.k}] {part}\n" for part in str(line).split("\n")))
            sys.stdout.flush()

    def close(self):
        if self.fh is not None:
            self.fh.close()


def _one_line(e):
    """An exception as one line: train()'s own messages as they are, others with their type."""
    if isinstance(e, (sm.Diverged, sm.UsageError)):
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def run_one(k, n, cfg, resume, data, device, result):
    """Train and finish one run in the calling thread; result gets ("ok", summary, seconds) or
    ("failed", one-line message). Never raises."""
    t0, log = time.time(), None
    try:
        log = RunLog(k, cfg)
        log(f"{PROG}: run {k} of {n} in one process, one thread" + (" and one CUDA stream" if
                                                                  device.type == "cuda" else "") + " each")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
            ctx = torch.cuda.stream(torch.cuda.Stream(device))  # this run's kernels: its own queue
        else:
            ctx = contextlib.nullcontext()
        ckpt_path = None if cfg.out is None else os.path.join(cfg.out, "last.pt")
        with ctx:
            model, summary = sm.train(cfg, data, device, log=log, ckpt_path=ckpt_path, resume=resume,
                                      progress=False)
            with _FINISH_LOCK:
                summary = sm.finish(cfg, model, summary, log=log)
        result[k] = ("ok", summary, time.time() - t0)
    except BaseException as e:  # noqa: B902 -- a run's failure must not reach the other threads
        msg = _one_line(e)
        result[k] = ("failed", msg, time.time() - t0)
        if log is not None:
            if not isinstance(e, (sm.Diverged, sm.UsageError)):  # unexpected: keep the traceback
                log(traceback.format_exc().rstrip())
            log(f"{PROG}: {msg}")
    finally:
        if log is not None:
            log.close()


def _where(k, cfg):
    return cfg.out if cfg.out is not None else f"[{k}]"


def _interrupted(code, name, started):
    """One line on stderr, then the end of the process: the runs' threads cannot be stopped."""
    if not started:
        print(f"{PROG}: interrupted by {name} before any run started", file=sys.stderr)
        raise SystemExit(code)
    _FINISH_LOCK.acquire(timeout=60)  # a run writing its final outputs finishes them; none starts after
    print(f"{PROG}: interrupted by {name}; the runs stop with their unfinished epoch; each run's "
          f"last.pt holds its last finished epoch: continue with --resume", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> list:
    """The CLI: check every run, load the data once, train all runs in threads, report. Returns
    the runs' summaries (as sm.finish returns them) in command-line order."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args in (["-h"], ["--help"]):
        print(__doc__.split("\n\n")[0] + "\n\n" + USAGE)
        return []
    in_main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if in_main_thread:  # also where SIGINT came in ignored (a background job of a script), as main()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_sigterm)
    started, threads, result = False, [], {}
    try:
        try:
            runs, device = parse_runs(args)
            data = sm.load_data(runs[0][0])
            for cfg, _ in runs:
                if cfg.out is not None:
                    os.makedirs(cfg.out, exist_ok=True)
        except sm.UsageError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            raise SystemExit(2)
        t0 = time.time()
        for k, (cfg, resume) in enumerate(runs, start=1):
            t = threading.Thread(target=run_one, args=(k, len(runs), cfg, resume, data, device, result),
                                 name=f"run{k}", daemon=True)
            t.start()
            started = True
            threads.append(t)
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # short waits: a signal reaches the main thread between them
    except KeyboardInterrupt:
        _interrupted(128 + signal.SIGINT, "SIGINT", started)
    except _Terminated:
        _interrupted(128 + signal.SIGTERM, "SIGTERM", started)
    finally:
        if in_main_thread:
            for s, h in old.items():
                signal.signal(s, h)
    wall = time.time() - t0
    failed = []
    for k, (cfg, _) in enumerate(runs, start=1):
        status, value, seconds = result[k]
        if status == "ok":
            print(f"{_where(k, cfg)}: final avg {value['final']['avg']:.2f}, {value['seconds']:.1f} s")
        else:
            failed.append(f"{PROG}: run {k} ({_where(k, cfg)}) failed: {value}")
    print(f"all runs: {wall:.1f} s wall, {len(runs) - len(failed)} of {len(runs)} finished")
    sys.stdout.flush()
    if failed:
        for line in failed:
            print(line, file=sys.stderr)
        raise SystemExit(1)
    return [result[k][1] for k in range(1, len(runs) + 1)]


if __name__ == "__main__":
    main()
