"""cuda_graph.py -- train with each step recorded once as a CUDA graph, or check that against the
plain step.

    python scripts/cuda_graph.py [ssesam_minimal.py flags]            # train, graphed
    python scripts/cuda_graph.py --check [flags] [--steps N]         # graphed against plain

Training: what `python ssesam_minimal.py` does with the same flags, the step recorded as a CUDA
graph on a GPU; on the CPU it runs eagerly on static buffers, bit for bit the plain step.
--check: two copies train side by side on the same batches, plain and graphed, N steps (200) in
--epochs epochs (4), each with its own lr and a shorter last batch, SSE-SAM's switch inside. It
reports the largest relative difference per tensor after the first step and after the last, the
steps' size for scale, and ms per step of each; --out DIR writes DIR/cuda_graph_check.json. Pass:
bit for bit on the CPU; on a GPU at most 1e-2 (after step 1: of the step), as the copies run the
same kernels on the same data and differ only where a kernel is not deterministic, far below that,
while a wrong recording (a stale input or lr, the wrong variant) is off by the order of a step.
Exit codes: 0 passed, 1 failed, 2 bad input (one line), 130 interrupted.
"""

import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import ssesam_minimal as sm  # noqa: E402

PROG = "cuda_graph.py"
THRESHOLD = 1e-2
_CAPTURE_LOCK = threading.Lock()  # runs in threads of one process (multi_run.py) record one at a time


class GraphedStep:
    """step(model, criterion, opt, x, y, tail) on static buffers, recorded as one
    CUDA graph per (batch size, rho) and replayed; eager on the CPU. GraphedStep(step, model, opt)
    is a wrap_step of sm.train(), which builds it after any resume.

    A step of a network this small is bound by launching hundreds of small kernels from Python; a
    replay launches them all at once. What it needs: fixed inputs (each batch is copied into static
    buffers); no read back to the host and no data-dependent shape (true of every step in sm.STEPS);
    the lr as a device tensor, which fused SGD reads without a host sync; one graph per variant, as
    Python branches are frozen when recorded: the batch size (the short last batch) and rho
    (SSE-SAM's switch); momentum buffers made before recording; and warm-up steps (cuDNN picks its
    kernels, memory is allocated: 3 on CUDA; on the CPU 1, to show their undoing is exact)."""

    def __init__(self, step, model, opt, warmup=None):
        dev = next(model.parameters()).device
        self.step, self.model, self.opt, self.record = step, model, opt, dev.type == "cuda"
        self.warmup = (3 if self.record else 1) if warmup is None else warmup
        self.base = opt.optimizer if isinstance(opt, sm._Climb) else opt
        self.lr = [torch.tensor(float(g["lr"]), device=dev) for g in self.base.param_groups]  # graphs read
        for p in model.parameters():  # buf = 0.9 * 0 + g at the first step: what SGD does without one
            self.base.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        # everything a step changes besides scratch space: put back after each warm-up
        self.state = [*model.parameters(), *model.buffers(),
                      *(self.base.state[p]["momentum_buffer"] for p in model.parameters())]
        self.variants = {}  # (B, rhos) -> (static x, y, tail, graph or None, static outputs)

    def __call__(self, model, criterion, opt, x, y, tail):
        for t, group in zip(self.lr, self.base.param_groups):
            t.fill_(group["lr"])  # the float the schedule set; no host sync
        key = (len(y), getattr(opt, "rhos", None))
        if key not in self.variants:
            self.variants[key] = self._prepare(criterion, x, y, tail)
        sx, sy, st, graph, out = self.variants[key]
        sx.copy_(x)
        sy.copy_(y)
        st.copy_(tail)
        if graph is None:  # the CPU: the plain step, on the static buffers
            return self.step(self.model, criterion, self.opt, sx, sy, st)
        graph.replay()
        return out

    def _prepare(self, criterion, x, y, tail):
        static, saved = (x.clone(), y.clone(), tail.clone()), [t.clone() for t in self.state]
        floats = [g["lr"] for g in self.base.param_groups]
        for g, t in zip(self.base.param_groups, self.lr):
            g["lr"] = t  # warm-up and recording read the tensor
        side = torch.cuda.Stream() if self.record else None  # warm-up on a side stream, as CUDA graphs ask
        try:
            if side is not None:
                side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for _ in range(self.warmup):  # these steps train ...
                    self.step(self.model, criterion, self.opt, *static)
            if side is not None:
                torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():  # ... so that is undone, in place: a graph reads these very tensors
                torch._foreach_copy_(self.state, saved)
            if not self.record:
                return (*static, None, None)
            graph = torch.cuda.CUDAGraph()
            # records, runs nothing; thread_local: other threads' runs may go on meanwhile
            with _CAPTURE_LOCK, torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.step(self.model, criterion, self.opt, *static)
            return (*static, graph, out)
        finally:  # floats again, as the schedule left them: its next assignment replaces a float
            for g, lr in zip(self.base.param_groups, floats):
                g["lr"] = lr


# =============================================================================================
# --check: the plain and the graphed step side by side
# =============================================================================================

def snapshot(net, opt):
    """name -> a copy of every tensor a step changes: weights, BN buffers, momentum buffers."""
    base = opt.optimizer if isinstance(opt, sm._Climb) else opt
    out = {name: t.detach().clone() for name, t in (*net.named_parameters(), *net.named_buffers())}
    for name, p in net.named_parameters():
        buf = base.state.get(p, {}).get("momentum_buffer")
        out[f"momentum of {name}"] = torch.zeros_like(p) if buf is None else buf.clone()
    return out


def compare(a, b):
    """(largest ||a - b|| / ||a|| over the tensors, that tensor's name or None, bit for bit equal)."""
    worst, where = 0.0, None
    for name in a:
        x, y = a[name].double(), b[name].double()
        diff, norm = (x - y).norm().item(), x.norm().item()
        rel = diff / norm if norm > 0 else diff
        if rel > worst or math.isnan(rel) and not math.isnan(worst):  # NaN is the worst
            worst, where = rel, name
    return worst, where, all(torch.equal(a[k], b[k]) for k in a)


def _now(cuda):
    """A time mark: a recorded CUDA event on a GPU (no host sync), else the host clock in ms."""
    if not cuda:
        return time.perf_counter() * 1000
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class Recorder:
    """A step that keeps the state after its first call and times, per SSE-SAM stage, each
    full-batch call that records nothing."""

    def __init__(self, step, net, opt, batch_size, cuda):
        self.step, self.net, self.opt, self.B, self.cuda = step, net, opt, batch_size, cuda
        self.marks, self.after_one = {}, None  # stage -> [(start, end)]

    def __call__(self, model, criterion, opt, x, y, tail):
        t0, variants = _now(self.cuda), len(getattr(self.step, "variants", ()))
        out = self.step(model, criterion, opt, x, y, tail)
        if len(y) == self.B and len(getattr(self.step, "variants", ())) == variants:
            stage = "every step" if not isinstance(opt, sm.SSESAM) else \
                "before the switch" if opt.head_rho > 0 else "after the switch"
            self.marks.setdefault(stage, []).append((t0, _now(self.cuda)))
        if self.after_one is None:
            self.after_one = snapshot(self.net, self.opt)
        return out

    def median_ms(self):
        return {stage: statistics.median(b - a if not self.cuda else a.elapsed_time(b) for a, b in marks)
                for stage, marks in self.marks.items()}


def check(cfg, data, device, steps, log=print) -> dict:
    """Train the plain and the graphed copy side by side; return the report (see the top)."""
    x, y, _, _, counts, _ = data
    E, B, cuda = cfg.epochs, cfg.batch_size, device.type == "cuda"
    S, short = steps // E, max(1, B - B // 3 - 1)  # per epoch: S - 1 full batches, then a short one
    n = (S - 1) * B + short
    # the same n images every epoch (the training set repeated if smaller); each copy's generator,
    # seeded alike, shuffles, crops and flips them alike
    pick = torch.randperm(len(y) * math.ceil(n / len(y)), generator=torch.Generator().manual_seed(cfg.seed))
    pick = pick[:n] % len(y)
    is_tail = torch.tensor([c < cfg.eta for c in counts], device=device)
    epoch_data = (F.pad(x[pick], (sm.PAD,) * 4).to(device), y[pick].to(device), is_tail)
    schedule = dataclasses.replace(cfg, epochs=E + 1)  # no epoch at lr 0
    torch.backends.cudnn.benchmark = cuda  # as sm.train() sets it
    runs = {}
    for kind in ("plain", "graphed"):
        net, model, criterion, opt, rng = sm.build_run(cfg, counts, device)
        if getattr(opt, "cut", 0) >= E:  # SSE-SAM's own switch epoch: nothing has trained yet
            raise sm.UsageError(f"--gamma {cfg.gamma:g} puts SSE-SAM's switch after the last of the "
                                f"{E} epochs: use more --epochs or a smaller --gamma")
        w0, step = snapshot(net, opt), sm.STEPS[cfg.opt]
        rec = Recorder(step if kind == "plain" else GraphedStep(step, model, opt), net, opt, B, cuda)
        losses = [sm.run_epoch(schedule, e, model, criterion, opt, rec, epoch_data, rng)["loss"]
                  for e in range(E)]
        runs[kind] = dict(w0=w0, one=rec.after_one, end=snapshot(net, opt), losses=losses, ms=rec.median_ms())
    p, g = runs["plain"], runs["graphed"]
    d1, where1, equal1 = compare(p["one"], g["one"])
    d, where, equal = compare(p["end"], g["end"])
    names = [name for name, _ in net.named_parameters()]
    w0, w1, w1_graphed, w_end = (torch.cat([s[k].double().flatten() for k in names])
                                 for s in (p["w0"], p["one"], g["one"], p["end"]))
    step1, moved = ((w1 - w0).norm() / w0.norm()).item(), ((w_end - w0).norm() / w0.norm()).item()
    of_step1 = ((w1 - w1_graphed).norm() / (w1 - w0).norm()).item()  # a wrong recording: order 1
    bitwise = equal1 and equal and p["losses"] == g["losses"]
    passed = of_step1 <= THRESHOLD and d <= THRESHOLD if cuda else bitwise
    cut, name = getattr(opt, "cut", None), torch.cuda.get_device_name(device) if cuda else "cpu"
    log(f"{cfg.arch} {cfg.opt}, {E} epochs of {S} steps (batches {B} and {short})"
        + ("" if cut is None else f", switch after epoch {cut}") + "; "
        + (f"recorded and replayed on {name}" if cuda else "CPU: nothing recorded, static buffers"))
    log(f"largest relative difference per tensor, graphed vs plain: {d1:.3g} after step 1 "
        f"({where1 or '-'}), {d:.3g} after step {S * E} ({where or '-'}); bit for bit: {equal1 and equal}")
    log(f"for scale: step 1 moved the weights by {step1:.3g} of their norm (the difference: "
        f"{of_step1:.3g} of that), all {S * E} steps by {moved:.3g}")
    for stage, ms in p["ms"].items():
        graphed = g["ms"].get(stage)  # none where every full batch of the stage was a recording
        log(f"ms per step, {stage}: plain {ms:.2f}, graphed " + ("--" if graphed is None else f"{graphed:.2f}"))
    log("PASSED" if passed else "FAILED: the copies differ" + (f" by over {THRESHOLD:g}" if cuda else ""))
    return {"passed": passed, "recorded": cuda, "max_rel_diff_1_step": d1, "worst_tensor_1_step": where1,
            "first_step_diff_over_step": of_step1, "max_rel_diff": d, "worst_tensor": where,
            "bitwise_equal": equal1 and equal, "first_step_size": step1, "weights_moved": moved,
            "ms_per_step": {"plain": p["ms"], "graphed": g["ms"]}, "steps": S * E, "epochs": E,
            "batch_sizes": [B, short], "switch_after_epoch": cut, "device": str(device),
            "device_name": name, "torch": torch.__version__, "config": dataclasses.asdict(cfg)}


def main(argv=None):
    """The command line. Training: sm.main's summary. --check: the report; exit 1 if it failed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "The other flags: python ssesam_minimal.py --help")
        return None
    try:
        own = sm._Parser(add_help=False, allow_abbrev=False)  # this script's flags; the rest are sm's
        own.add_argument("--check", action="store_true")
        own.add_argument("--steps", type=int)
        flags, rest = own.parse_known_args(argv)
        if not flags.check:
            if flags.steps is not None:
                raise sm.UsageError("--steps goes with --check")
            return sm.main(rest, wrap_step=GraphedStep)
        steps = 200 if flags.steps is None else flags.steps
        cfg = sm.parse_config(["--epochs", "4"] + rest)  # 4 epochs unless the flags say otherwise
        if steps < 2 * cfg.epochs or cfg.batch_size < 2:
            raise sm.UsageError(f"--check needs --steps >= 2 * --epochs and --batch_size >= 2 (each epoch: "
                                f"a full and a shorter batch), got {steps}, {cfg.epochs}, {cfg.batch_size}")
        device = sm.resolve_device(cfg)
        if cfg.out is not None and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
            raise sm.UsageError(f"--out {cfg.out} exists and is not a folder")
        data = sm.load_data(cfg.dataset, cfg.data_dir, cfg.imb_factor, cfg.subset_seed)
        result = check(cfg, data, device, steps)
    except (sm.UsageError, sm.Diverged, KeyboardInterrupt) as e:  # one line on stderr, no traceback
        code = 2 if isinstance(e, sm.UsageError) else 1 if isinstance(e, sm.Diverged) else 130
        print(f"{PROG}: " + {2: f"error: {e}", 1: str(e), 130: "interrupted by SIGINT"}[code],
              file=sys.stderr)
        raise SystemExit(code)
    if cfg.out is not None:
        os.makedirs(cfg.out, exist_ok=True)
        sm._atomic_write(os.path.join(cfg.out, "cuda_graph_check.json"), json.dumps(result, indent=2))
    if not result["passed"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
