"""bench.py -- the time of one training step of each optimizer against the official SSE-SAM step.

    python scripts/bench.py                     # ResNet-32, batch 64, CIFAR-100-LT IF 100 labels
    python scripts/bench.py --device cpu        # the same on the CPU, fp32 against bf16
    python scripts/bench.py --device cpu --arch resnet8 --batch_size 4 --dataset synthetic  # seconds

Reads no data, trains nothing: each step runs on a copy of one network and one batch of random
images whose labels follow the long-tailed counts, ours as sm.train() runs them, the official one
as the official code does. Per row: ms per step, its ratio to the official step's, the passes per
step; on CUDA also each step recorded as a CUDA graph, and the GPU time of one eager step's kernels
(the floor a graph can approach). Each of our rows runs in fp32 and in bf16 (the loop's bf16
autocast, one block per forward), on the CPU as on CUDA, and the table gives bf16's speed-up;
--no-bf16 times fp32 only. The official step runs in fp32, as the official code does. --out DIR
writes DIR/bench.json. The flags are ssesam_minimal.py's; --opt and those only training reads change
nothing here.
Exit codes: 0, 2 bad input (one line), 130 interrupted.
"""

import dataclasses
import importlib
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repo root (ssesam_minimal.py), cuda_graph.py's
import ssesam_minimal as sm  # noqa: E402

PROG = "bench.py"


class OfficialSSESAM:
    """BASELINE, never used for training: the official SSESAM's bookkeeping. A Python loop over the
    parameters for every operation; ε and the gradient sum kept per parameter and made anew every
    step; w restored by subtracting ε; zero_grad() drops every .grad, so each backward allocates
    new ones. The same update as sm.SSESAM up to rounding (tested)."""

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
            state["eps"].copy_(p.grad).mul_(self.rho_is[n_i] / norm)  # ρ / norm redone per tensor
            p.add_(state["eps"])
        self.optimizer.zero_grad()

    @torch.no_grad()
    def compute_grad_sum_and_restore_p(self):
        for p in self.model.parameters():
            if p.grad is not None:
                state = self.state[p]
                state["G"] = state["G"].add_(p.grad) if "G" in state else p.grad.clone()
                p.sub_(state["eps"])  # w + ε - ε: w up to rounding
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
    host-device sync) per step. The official loop's other logging is left out, which flatters it."""
    B = len(y)
    loss_i = criterion(model(x), y)                                             # F1 at w
    (loss_i[~tail].sum() / B).backward(retain_graph=True)                       # B1
    opt.compute_and_add_epsilon(0)                                              # w + ε_head
    head_loss = criterion(model(x)[~tail], y[~tail]).sum() / B                  # F2
    head_loss.backward(retain_graph=True)                                       # B2
    opt.compute_grad_sum_and_restore_p()                                        # back to w
    (criterion(model(x)[tail], y[tail]).sum() / B).backward(retain_graph=True)  # F3, B3 at w again
    opt.compute_and_add_epsilon(1)                                              # w + ε_tail
    tail_loss = criterion(model(x)[tail], y[tail]).sum() / B                    # F4
    tail_loss.backward(retain_graph=True)                                       # B4
    opt.compute_grad_sum_and_restore_p()                                        # back to w
    opt.update()
    return (head_loss + tail_loss).item()


def count_passes(fn, net):
    """Run fn() once: "<forwards of net>F+<backwards>B"; a backward is counted by a hook on the
    first parameter (the stem), which every backward reaches."""
    n = {"F": 0, "B": 0}
    hooks = [net.register_forward_pre_hook(lambda m, a: n.update(F=n["F"] + 1)),
             next(net.parameters()).register_hook(lambda g: n.update(B=n["B"] + 1))]
    fn()
    for h in hooks:
        h.remove()
    return f"{n['F']}F+{n['B']}B"


def kernel_ms(fn, device):
    """The summed GPU time of the kernels of one call of fn (torch.profiler), or None."""
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    # self time: each kernel once, not again in the operator that launched it (microseconds)
    total = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    return total / 1000 if total else None


def time_ms(fn, calls, device):
    """Milliseconds per call of fn, from an idle device to an idle device again."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1000 / calls


def bench(cfg, counts, device, repeats=5, steps=3, graphed=None, log=print) -> dict:
    """Time one step of each row; print the table and return its rows. graphed: also each step through
    cuda_graph.GraphedStep (default: on CUDA; on the CPU it records nothing and costs what the step does)."""
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda  # as sm.train() sets it
    torch.manual_seed(cfg.seed)
    y_all = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    pick = torch.randperm(len(y_all))[:cfg.batch_size]
    y = y_all[pick].to(device)
    x = sm.normalize(torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8)).to(device)
    tail = torch.tensor([n < cfg.eta for n in counts], device=device)[y]

    def make(name):  # (net, one step as a closure) on a fresh copy of the same initial network
        opt_name = name.split()[0].rstrip(",")
        run = dataclasses.replace(cfg, opt=opt_name, bf16=", bf16" in name)
        net, model, criterion, opt, _ = sm.build_run(run, counts, device)
        if name == "official ssesam":  # fp32, default layout, default SGD: as the official code runs
            net = net.to(memory_format=torch.contiguous_format)
            opt = OfficialSSESAM(torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                                 weight_decay=cfg.wd), net, cfg.head_rho, cfg.tail_rho)
            return net, lambda: official_ssesam_step(net, criterion, opt, x, y, tail)
        for _ in range(opt.cut if "after the switch" in name else 0):
            opt.update_rho()
        step = sm.STEPS[opt_name]
        if name.endswith("graphed"):
            step = importlib.import_module("cuda_graph").GraphedStep(step, model, opt)
        xf = x.contiguous(memory_format=torch.channels_last)
        return net, lambda: step(model, criterion, opt, xf, y, tail)

    ours = ["sgd", "sam", "imbsam", "ssesam before the switch", "ssesam after the switch"]
    names = ours + ["official ssesam"]
    names += [f"{n}, graphed" for n in ours] if (cuda if graphed is None else graphed) else []
    if cfg.bf16 is not False:  # each row of ours again in bf16
        names += [f"{n}, bf16" for n in names if n != "official ssesam"]
    rows, fns = {}, {}
    for name in names:
        net, fns[name] = make(name)
        for _ in range(2):  # warm-up: momentum buffers, allocator, cuDNN's choice of kernels, the graph
            fns[name]()
        replay = name.endswith("graphed")  # a replay runs no Python forward or backward to count
        rows[name] = {"passes": "graph" if replay else count_passes(fns[name], net),
                      "kernel_ms": kernel_ms(fns[name], device) if cuda and not replay else None, "ms": []}
    for i in range(repeats):
        for name in names[::1 if i % 2 == 0 else -1]:  # every other round reversed: no row always first
            rows[name]["ms"].append(time_ms(fns[name], steps, device))
    official = statistics.median(rows["official ssesam"]["ms"])
    for r in rows.values():
        r["median_ms"] = statistics.median(r["ms"])
        r["of_official"] = r["median_ms"] / official
    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu, {os.cpu_count()} cores"
    log(f"{device_name}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; {cfg.arch}, "
        f"batch {cfg.batch_size}, {cfg.dataset} IF {cfg.imb_factor:g} labels ({int(tail.sum())} of {len(y)} "
        f"images tail); median of {repeats} rounds of {steps} steps\n")
    log("| step | ms/step | / official | passes | kernel ms |\n|---|---|---|---|---|")
    for name, r in rows.items():
        kernels = "--" if r["kernel_ms"] is None else f"{r['kernel_ms']:.2f}"
        log(f"| {name} | {r['median_ms']:.2f} | {r['of_official']:.3f} | {r['passes']} | {kernels} |")
    for name in [n for n in names if f"{n}, bf16" in rows]:  # fp32 time / bf16 time, per row
        rows[f"{name}, bf16"]["bf16_speedup"] = rows[name]["median_ms"] / rows[f"{name}, bf16"]["median_ms"]
    if any("bf16_speedup" in r for r in rows.values()):  # before the summary line, which comes last
        log("\n| step | fp32 ms | bf16 ms | bf16 speed-up |\n|---|---|---|---|")
        for name in [n for n in names if f"{n}, bf16" in rows]:
            b = rows[f"{name}, bf16"]
            log(f"| {name} | {rows[name]['median_ms']:.2f} | {b['median_ms']:.2f} | {b['bf16_speedup']:.2f}x |")
    log(f"\nSSE-SAM step: {rows['ssesam before the switch']['of_official']:.3f} of the official step's time "
        f"before the switch, {rows['ssesam after the switch']['of_official']:.3f} after it")
    return {"device": str(device), "device_name": device_name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "repeats": repeats, "steps": steps,
            "config": dataclasses.asdict(cfg), "rows": rows}


def main(argv=None, repeats=5, steps=3, graphed=None) -> dict:
    """The command line: parse, check, time, print the table, write --out/bench.json."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "The flags: python ssesam_minimal.py --help")
        return {}
    try:
        cfg = sm.parse_config(argv)  # a bad --imb_factor stops here, before anything is timed
        device = sm.resolve_device(cfg)
        if cfg.out is not None and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
            raise sm.UsageError(f"--out {cfg.out} exists and is not a folder")
        result = bench(cfg, sm.data_counts(cfg.dataset, cfg.imb_factor)[0], device, repeats, steps, graphed)
    except (sm.UsageError, KeyboardInterrupt) as e:  # one line; nothing to save (bench.json comes last)
        print(f"{PROG}: " + (f"error: {e}" if isinstance(e, sm.UsageError) else "interrupted by SIGINT"),
              file=sys.stderr)
        raise SystemExit(2 if isinstance(e, sm.UsageError) else 130)
    if cfg.out is not None:
        os.makedirs(cfg.out, exist_ok=True)
        sm._atomic_write(os.path.join(cfg.out, "bench.json"), json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
