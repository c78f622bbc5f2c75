"""bench.py -- the cost of one training step and of one epoch of augmentation, against the official code's.

Reads no data and trains nothing. Each optimizer's step of ssesam_minimal.py and, as the baseline,
the official SSE-SAM step run on copies of one network and on one batch of random images whose
labels follow the long-tailed counts (so the head/tail split is the real one); each of our steps
also through sm.GraphedStep (recorded as a CUDA graph and replayed on a GPU; eager on static
buffers on the CPU). On a GPU it also sums the kernel time of one eager step (torch.profiler):
the floor a replayed graph can approach. Prints two tables and, with --out DIR, writes them to
DIR/bench.json. scripts/README.md has the measured numbers.

    python scripts/bench.py                                    # ResNet-32, batch 64, CIFAR-100-LT IF 100
    OMP_NUM_THREADS=1 python scripts/bench.py --out runs/bench  # as measured on the CPU
    python scripts/bench.py --device cpu --arch resnet8 --batch_size 4 --dataset synthetic  # seconds

The flags are ssesam_minimal.py's; --opt (every optimizer is timed) and those that only training
reads (--data_dir, --epochs, --drw_epoch, --print_freq, --resume, ...) are accepted and change
nothing here.
Exit codes: 2 bad input, 130 interrupted.
"""

import copy
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import ssesam_minimal as sm  # noqa: E402

# =============================================================================================
# The official baseline: never used for training
# =============================================================================================

class OfficialSSESAM:
    """BASELINE for the benchmark only, never used for training: the official SSESAM's bookkeeping.
    A Python loop over the parameters for every operation; eps and the gradient sum kept per
    parameter and made anew every step; w restored by subtracting eps; zero_grad() drops every
    .grad, so each backward allocates new ones. Same update as sm.SSESAM up to rounding (tested)."""

    def __init__(self, optimizer, model, head_rho, tail_rho):
        self.optimizer, self.model, self.rho_is, self.state = optimizer, model, [head_rho, tail_rho], {}

    @torch.no_grad()
    def compute_and_add_epsilon(self, n_i):
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.norm(torch.stack([torch.norm(p.grad) for p in params])) + 1e-16
        for p in params:
            state = self.state.setdefault(p, {})
            if "eps" not in state:
                state["eps"] = p.detach().clone()
            state["eps"].copy_(p.grad).mul_(self.rho_is[n_i] / norm)  # rho / norm redone per tensor
            p.add_(state["eps"])
        self.optimizer.zero_grad()

    @torch.no_grad()
    def compute_grad_sum_and_restore_p(self):
        for p in self.model.parameters():
            if p.grad is not None:
                state = self.state[p]
                state["G"] = state["G"].add_(p.grad) if "G" in state else p.grad.clone()
                p.sub_(state["eps"])  # w + eps - eps: w up to rounding
        self.optimizer.zero_grad()

    @torch.no_grad()
    def update(self):
        for p in self.model.parameters():
            p.grad = self.state[p]["G"].clone()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.state.clear()


def official_ssesam_step(model, criterion, opt, x, y, tail):
    """BASELINE: the official training step, 4F+4B in the seed README's order. Every forward
    updates the BN running statistics, boolean indexing cuts out each group (shapes vary from
    batch to batch), every backward retains its graph, and the logged loss costs one .item() (a
    host-device sync) per step. The official loop's other logging (softmax, argmax, two .cpu()
    copies, two .item()) is left out."""
    B = len(y)
    loss_i = criterion(model(x), y)                                             # F1 at w
    (loss_i[~tail].sum() / B).backward(retain_graph=True)                       # B1
    opt.compute_and_add_epsilon(0)                                              # w + eps_head
    head_loss = criterion(model(x)[~tail], y[~tail]).sum() / B                  # F2
    head_loss.backward(retain_graph=True)                                       # B2
    opt.compute_grad_sum_and_restore_p()                                        # back to w
    (criterion(model(x)[tail], y[tail]).sum() / B).backward(retain_graph=True)  # F3, B3 at w again
    opt.compute_and_add_epsilon(1)                                              # w + eps_tail
    tail_loss = criterion(model(x)[tail], y[tail]).sum() / B                    # F4
    tail_loss.backward(retain_graph=True)                                       # B4
    opt.compute_grad_sum_and_restore_p()                                        # back to w
    opt.update()
    return (head_loss + tail_loss).item()


class PILImages(torch.utils.data.Dataset):
    """The official data path: uint8 HWC arrays, each made a PIL image, then transformed."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(torchvision.transforms.functional.to_pil_image(self.x[i])), self.y[i]


# =============================================================================================
# Counting and timing
# =============================================================================================

class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active (a composite operator counts as the ones
    it runs). `own`: those dispatched neither inside a forward of the network or the loss (depth
    > 0, kept by hooks) nor by autograd in a backward (no autograd node running), i.e. the ones
    the step adds itself: head/tail split, climb, restore, update, logging."""

    def __init__(self):
        super().__init__()
        self.ops = self.own = self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            self.ops += 1
            self.own += self.depth == 0 and torch._C._current_autograd_node() is None
        return func(*args, **(kwargs or {}))


def count_step(step, model, criterion):
    """Run step() once: (forwards of model, backwards, aten ops, own aten ops). A backward is
    counted by a hook on the first parameter (the stem), which every backward reaches."""
    counter, n = OpCounter(), {"F": 0, "B": 0}

    def enter(module, args):
        counter.depth += 1
        n["F"] += module is model

    def leave(module, args, out):
        counter.depth -= 1

    hooks = [h for m in (model, criterion)
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    hooks.append(next(model.parameters()).register_hook(lambda g: n.update(B=n["B"] + 1)))
    try:
        with counter:
            step()
    finally:
        for h in hooks:
            h.remove()
    return n["F"], n["B"], counter.ops, counter.own


def kernel_ms(fn, device):
    """The summed GPU time of the kernels one call of fn runs, by torch.profiler: the floor that
    replaying the step as a CUDA graph can approach (the rest of an eager step is launch overhead).
    None on the CPU, or where the profiler reports no device times."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    # self time: each kernel counted once, not again in the ops that launched it (microseconds)
    total = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                for e in prof.key_averages())
    return total / 1000 if total else None


def time_ms(fn, calls, device):
    """Milliseconds per call of fn: CUDA events on a GPU, perf_counter on the CPU."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if cuda:
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    return (time.perf_counter() - t0) * 1000 / calls


# =============================================================================================
# The benchmark
# =============================================================================================

def bench(cfg: sm.Config, counts, device, repeats=5, steps=3, log=print) -> dict:
    """Time and count one step of each optimizer and of the official baseline, and one epoch of
    augmentation against the official DataLoader; print the table, return its rows. Times are
    medians over `repeats` rounds; each round runs every row in turn (`steps` steps, or one
    epoch), so that background load hits all rows alike."""
    torch.manual_seed(cfg.seed)
    amp = device.type == "cuda"  # ours as in sm.train(): channels_last, and bf16 autocast on CUDA
    if amp:
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last
    y_all = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))  # (N,)
    x_all = torch.randint(0, 256, (len(y_all), 3, 32, 32), dtype=torch.uint8)        # (N, 3, 32, 32)
    pick = torch.randperm(len(y_all))[:cfg.batch_size]
    x, y = sm.normalize(x_all[pick]).to(device), y_all[pick].to(device)
    tail = torch.tensor([n < cfg.eta for n in counts], device=device)[y]
    model0, criterion = sm.make_model_and_criterion(cfg, counts, device)  # copied for every row

    def make(name):  # a copy of the network, its optimizer, and one step as a closure
        if name == "official ssesam":  # fp32, default memory format, SGD's default implementation
            model = copy.deepcopy(model0).to(device)
            base = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.wd)
            opt = OfficialSSESAM(base, model, cfg.head_rho, cfg.tail_rho)
            return model, lambda: official_ssesam_step(model, criterion, opt, x, y, tail)
        # the contiguous row shows what channels_last buys
        layout = torch.contiguous_format if name.endswith("contiguous") else fmt
        model = copy.deepcopy(model0).to(device, memory_format=layout)
        opt_name, xf = name.split()[0].rstrip(","), x.contiguous(memory_format=layout)
        opt = sm.make_optimizer(dataclasses.replace(cfg, opt=opt_name), model)
        for _ in range(opt.cut if "after the switch" in name else 0):
            opt.update_rho()
        step = sm.STEPS[opt_name]
        if name.endswith("graphed"):  # sm.GraphedStep: recorded and replayed on CUDA, eager on the CPU
            step = sm.GraphedStep(step, model, opt)
        return model, lambda: step(model, criterion, opt, xf, y, tail, cfg.imbsam_weight)

    rows, fns = {}, {}
    eager = ("sgd", "sam", "imbsam", "ssesam before the switch", "ssesam after the switch")
    for name in (*eager, "ssesam before the switch, contiguous", "official ssesam",
                 *(f"{e}, graphed" for e in eager)):
        model, fns[name] = make(name)
        for _ in range(2):  # warm-up: momentum buffers, allocator, cudnn autotuning (a graph's own)
            fns[name]()
        if name.endswith("graphed"):  # a replay runs no Python forward or backward to count
            rows[name] = {"passes": "graph" if amp else "static", "kernel_ms": None}
            continue
        f, b, ops, own = count_step(fns[name], model, criterion)
        rows[name] = {"passes": f"{f}F+{b}B", "forwards": f, "backwards": b, "ops": ops, "own_ops": own,
                      "kernel_ms": kernel_ms(fns[name], device)}
    # one epoch of augmentation: ours (whole epoch at once, on the device) against a DataLoader of
    # PIL images with the official transforms, batch size and number of workers
    workers, tf = (os.cpu_count() or 1) // 4, torchvision.transforms
    official_tf = tf.Compose([tf.RandomCrop(32, padding=sm.PAD), tf.RandomHorizontalFlip(), tf.ToTensor(),
                              tf.Normalize(sm.MEAN, sm.STD)])
    loader = torch.utils.data.DataLoader(PILImages(x_all, y_all, official_tf), batch_size=cfg.batch_size,
                                         shuffle=True, num_workers=workers)
    x_pad, y_dev = F.pad(x_all, (sm.PAD,) * 4).to(device), y_all.to(device)
    fns["augmentation, ours"] = lambda: sm.shuffled_epoch(x_pad, y_dev, fmt)
    fns["augmentation, official"] = lambda: [(xb.to(device), yb.to(device)) for xb, yb in loader]
    for name in ("augmentation, ours", "augmentation, official"):
        fns[name]()  # warm-up
        rows[name] = {"images": len(y_all), "workers": workers if name.endswith("official") else None}
    ms = {name: [] for name in fns}
    for i in range(repeats):
        for name in list(fns)[::1 if i % 2 == 0 else -1]:  # every other round reversed: no row always first
            ms[name].append(time_ms(fns[name], 1 if name.startswith("augmentation") else steps, device))
    for name, r in rows.items():
        r["ms"], r["median_ms"] = ms[name], float(np.median(ms[name]))
        r["spread"] = (max(ms[name]) - min(ms[name])) / r["median_ms"]  # (max - min) / median
    ref, ref_aug = rows["official ssesam"], rows["augmentation, official"]
    device_name = torch.cuda.get_device_name(device) if amp else f"cpu, {os.cpu_count()} cores"
    n_tail = sum(n < cfg.eta for n in counts)
    log(f"{device_name}, torch {torch.__version__}, torch threads {torch.get_num_threads()}; "
        f"{cfg.arch}, batch {cfg.batch_size}, {cfg.dataset} IF {cfg.imb_factor:g} ({n_tail} of "
        f"{len(counts)} classes tail); median of {repeats} rounds, spread = (max - min) / median\n")
    log("| step | ms/step | spread | kernel ms | passes | aten ops | outside F/B | time / official "
        "| ops / official | outside F/B / official |\n" + "|---" * 10 + "|")
    for name, r in rows.items():
        if "passes" not in r:
            continue
        kernels = "--" if r["kernel_ms"] is None else f"{r['kernel_ms']:.2f}"
        counts = (f"{r['ops']} | {r['own_ops']}" if "ops" in r else "-- | --")
        ratios = (f"{r['ops'] / ref['ops']:.3f} | {r['own_ops'] / ref['own_ops']:.3f}" if "ops" in r
                  else "-- | --")
        log(f"| {name} | {r['median_ms']:.1f} | {r['spread']:.0%} | {kernels} | {r['passes']} | {counts} "
            f"| {r['median_ms'] / ref['median_ms']:.3f} | {ratios} |")
    log(f"\n| one epoch of augmentation, {len(y_all)} images | ms | spread | time / official |\n"
        + "|---" * 4 + "|")
    for name, label in (("augmentation, ours", f"ours: shuffled_epoch() on the {device.type}"),
                        ("augmentation, official", f"official: DataLoader, PIL transforms, {workers} "
                         f"workers (os.cpu_count() // 4 = {os.cpu_count()} // 4)")):
        r = rows[name]
        log(f"| {label} | {r['median_ms']:.1f} | {r['spread']:.0%} "
            f"| {r['median_ms'] / ref_aug['median_ms']:.3f} |")
    return {"device": str(device), "device_name": device_name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "repeats": repeats, "steps": steps,
            "config": dataclasses.asdict(cfg), "rows": rows}


# =============================================================================================
# CLI
# =============================================================================================

def build_parser():
    """ssesam_minimal.py's parser (each flag declared once, in sm.Config), under this script's name
    and with --out's help for what it writes here."""
    p = sm.build_parser()
    p.prog, p.description = "bench.py", "Step and augmentation cost of SSE-SAM against the official code."
    p._option_string_actions["--out"].help = "folder for bench.json"  # no public way to edit a help
    return p


def main(argv=None) -> dict:
    """The CLI: parse, check, time, print the tables, write --out/bench.json. Returns the result."""
    try:
        cfg = sm.Config(**vars(build_parser().parse_args(argv)))
        sm.check_config(cfg)
        device = sm.resolve_device(cfg)
        if cfg.out is not None and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
            raise sm.UsageError(f"--out {cfg.out} exists and is not a folder")
        counts, _ = sm.data_counts(cfg)  # a bad --imb_factor stops here, before anything is timed
        result = bench(cfg, counts, device)
    except sm.UsageError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:  # nothing to save: bench.json is written only at the end
        print("bench.py: interrupted by SIGINT", file=sys.stderr)
        raise SystemExit(130)
    if cfg.out is not None:  # whole or not at all
        os.makedirs(cfg.out, exist_ok=True)
        sm._atomic_write(os.path.join(cfg.out, "bench.json"), json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
