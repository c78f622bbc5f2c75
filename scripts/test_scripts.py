"""Tests for the scripts in scripts/. Each re-derives its result the obvious way and compares.

CPU, no network; the tests that need CUDA have "cuda" in their names and skip without it. Each
script is imported inside its tests (fixtures), so that one broken script fails its own tests and
no others. In this process the synthetic data set is made smaller (49 training and 50 test
images); the commands run as subprocesses use the real one. Those subprocesses take seconds each, so
they start together in threads before the first test and run while the in-process tests do.
"""

import contextlib
import copy
import dataclasses
import functools
import importlib
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
for _path in (REPO, SCRIPTS):  # ssesam_minimal and the scripts, however pytest was started
    if _path not in sys.path:
        sys.path.insert(0, _path)
import ssesam_minimal as sm  # noqa: E402

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
SMALL = "--dataset synthetic --arch resnet8 --eta 10 --batch_size 20 --device cpu"  # 49 images: 2 x 20 + 9
SLOW_JOBS = {}  # test name -> a function (folder) that runs that test's subprocesses


# =============================================================================================
# Fixtures and helpers
# =============================================================================================

@pytest.fixture(scope="module", autouse=True)
def small_synthetic():
    """One torch thread (two OpenMP threads on a busy 2-core machine run many times slower), and
    the synthetic data set at a tenth of its size (49 images for IF 100), with 5 test images per class."""
    counts_of, make = sm.data_counts, sm.synthetic_cifar

    def small_counts(dataset, imb_factor):
        counts, n_max = counts_of(dataset, imb_factor)  # the real checks first
        return ([max(1, n // 10) for n in counts], n_max // 10) if dataset == "synthetic" else (counts, n_max)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sm, "data_counts", small_counts)
        mp.setattr(sm, "synthetic_cifar", functools.partial(make, n_test=5))
        yield
    torch.set_num_threads(threads)


class Background:
    """SLOW_JOBS of the selected tests, each in a thread of its own; result(name) waits for one."""

    def __init__(self, jobs, folder_of):
        self.results, self.threads = {}, {}
        for name, job in jobs.items():
            self.threads[name] = threading.Thread(target=self._run, args=(name, job, folder_of(name)))
            self.threads[name].daemon = True
            self.threads[name].start()

    def _run(self, name, job, folder):
        try:
            self.results[name] = job(folder)
        except BaseException as e:  # noqa: B902 -- raised again in the test that asks for it
            self.results[name] = e

    def result(self, name):
        self.threads[name].join(timeout=600)
        if isinstance(self.results.get(name), BaseException):
            raise self.results[name]
        return self.results[name]


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    return Background({n: job for n, job in SLOW_JOBS.items() if n in selected}, tmp_path_factory.mktemp)


def slow_job(test_name):
    def register(fn):
        SLOW_JOBS[test_name] = fn
        return fn
    return register


@pytest.fixture
def slow_result(request, background):
    """What the requesting test's SLOW_JOBS entry returned."""
    return background.result(request.node.originalname)


@pytest.fixture
def cuda_graph():
    return importlib.import_module("cuda_graph")


@pytest.fixture
def multi_run():
    return importlib.import_module("multi_run")


@pytest.fixture
def bench():
    return importlib.import_module("bench")


def expect_exit(main, argv, code, capsys):
    """main(argv) must exit with `code` and write exactly one line, no traceback, on stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def run_outputs(out):
    """(model.pt's state, metrics rows and summary, each without timings)."""
    state = torch.load(os.path.join(out, "model.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in fh]
    with open(os.path.join(out, "summary.json")) as fh:
        summary = {k: v for k, v in json.load(fh).items() if k != "seconds"}
    summary["config"].pop("out")
    return state, rows, summary


def assert_same_run(a, b):
    (state_a, rows_a, sum_a), (state_b, rows_b, sum_b) = run_outputs(a), run_outputs(b)
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k  # bit for bit, BN buffers included
    assert rows_a == rows_b and sum_a == sum_b


# SSE-SAM across its switch (after epoch 1) and the start of DRW (epoch 2), and plain SGD
ALONE = {"ssesam": f"{SMALL} --opt ssesam --epochs 2 --gamma 0.5 --drw_epoch 1 --lr 0.05",
         "sgd": f"{SMALL} --opt sgd --epochs 2 --lr 0.05"}


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """ALONE's runs made by ssesam_minimal.py's main(): the references."""
    outs = {}
    for name, args in ALONE.items():
        outs[name] = str(tmp_path_factory.mktemp("alone") / name)
        sm.main(args.split() + ["--out", outs[name]])
    return outs


# =============================================================================================
# cuda_graph.py
# =============================================================================================

@pytest.mark.parametrize("name", sm.OPTS)
def test_graphed_step_on_the_cpu_gives_the_plain_steps_weights_bit_for_bit(name, cuda_graph):
    # 2 epochs of 29 images in batches of 16 (the last has 13), a new lr every epoch; SSE-SAM
    # switches after epoch 1 (gamma 0.5, T 2), so it records 4 variants: 2 batch sizes x 2 rhos
    cfg = sm.Config(opt=name, arch="resnet8", lr=0.1, gamma=0.5, epochs=2, eta=15)
    counts = [40, 20, 10, 5]
    is_tail = torch.tensor([n < cfg.eta for n in counts])
    runs, calls = {}, []
    for graphed in (False, True):
        net, model, criterion, opt, _ = sm.build_run(cfg, counts, CPU)
        step = sm.STEPS[name]
        if graphed:
            def counted(*a, **k):
                calls.append(len(a[4]))
                return sm.STEPS[name](*a, **k)
            step = cuda_graph.GraphedStep(counted, model, opt, warmup=2)
        g, states = torch.Generator().manual_seed(5), []
        for epoch in range(2):
            for group in opt.param_groups:  # as sm.run_epoch sets it: a float
                group["lr"] = sm.lr_at(epoch, cfg) + 0.01
            xs, ys = torch.randn(29, 3, 8, 8, generator=g), torch.randint(0, 4, (29,), generator=g)
            step_loss, correct = sm.train_one_epoch(model, criterion, opt, step, xs, ys, is_tail, 16)
            states.append((cuda_graph.snapshot(net, opt), step_loss, correct))
        runs[graphed] = states
    for (plain, loss_a, correct_a), (static, loss_b, correct_b) in zip(runs[False], runs[True]):
        assert plain.keys() == static.keys() and all(torch.equal(plain[k], static[k]) for k in plain)
        assert torch.equal(loss_a, loss_b) and torch.equal(correct_a, correct_b)
    variants = 4 if name == "ssesam" else 2
    assert len(calls) == 2 * variants + 4  # each variant warmed up twice (and undone), then 4 steps
    assert [type(g["lr"]) for g in opt.param_groups] == [float]  # the schedule's next float fits
    assert step.lr[0].item() == torch.tensor(sm.lr_at(1, cfg) + 0.01).item()  # filled before the step
    if name == "ssesam":
        assert opt.k == 2 and opt.head_rho == 0.0


CHECK = SMALL.split() + ["--check", "--gamma", "0.5", "--steps", "6", "--epochs", "2", "--batch_size", "8"]


def printed(fn, *args, **kwargs):
    """(fn's result, what it printed)."""
    with contextlib.redirect_stdout(io.StringIO()) as text:
        return fn(*args, **kwargs), text.getvalue()


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """cuda_graph.py --check on the CPU: SSE-SAM, 2 epochs of 3 steps (batches 8 and 5), the switch
    after the first. (result, out folder, what it printed)"""
    out = tmp_path_factory.mktemp("check")
    return (*printed(importlib.import_module("cuda_graph").main, CHECK + ["--out", str(out)]), out)


def test_check_on_the_cpu_finds_exactly_no_difference_across_the_switch_and_short_batches(cpu_check):
    result, text, out = cpu_check
    assert result["passed"] and not result["recorded"]
    assert result["max_rel_diff_1_step"] == 0.0 and result["max_rel_diff"] == 0.0 and result["bitwise_equal"]
    assert result["first_step_diff_over_step"] == 0.0
    assert 0 < result["first_step_size"] < result["weights_moved"]  # the copies trained
    assert result["steps"] == 6 and result["batch_sizes"] == [8, 5] and result["switch_after_epoch"] == 1
    stages = {"before the switch", "after the switch"}
    assert set(result["ms_per_step"]["plain"]) == set(result["ms_per_step"]["graphed"]) == stages
    assert json.loads((out / "cuda_graph_check.json").read_text()) == result
    assert text.splitlines()[-1] == "PASSED"


def test_check_finds_a_planted_difference_names_its_tensor_and_exits_1(cuda_graph, monkeypatch, tmp_path,
                                                                        capsys):
    class Planted(cuda_graph.GraphedStep):  # after its first step, conv1.weight *= 1 + 1e-3
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            if not hasattr(self, "planted"):
                self.planted = True
                with torch.no_grad():
                    next(self.model.parameters()).mul_(1 + 1e-3)
            return out

    monkeypatch.setattr(cuda_graph, "GraphedStep", Planted)
    with pytest.raises(SystemExit) as exc:
        cuda_graph.main(SMALL.split() + ["--check", "--opt", "sgd", "--steps", "4", "--epochs", "2",
                                         "--out", str(tmp_path)])
    assert exc.value.code == 1 and "FAILED" in capsys.readouterr().out
    result = json.loads((tmp_path / "cuda_graph_check.json").read_text())
    assert not result["passed"] and not result["bitwise_equal"]
    assert result["max_rel_diff_1_step"] == pytest.approx(1e-3, rel=1e-3)  # ||1e-3 w|| / ||w||
    assert result["worst_tensor_1_step"] == "conv1.weight" and result["max_rel_diff"] > 0


@pytest.mark.parametrize("argv,needle", [
    (["--check", "--steps", "5", "--epochs", "4"], "--steps >= 2 * --epochs"),
    (["--check", "--batch_size", "1"], "--batch_size >= 2"),
    (["--check", "--epochs", "3"], "--gamma 0.7 puts SSE-SAM's switch after the last of the 3 epochs"),
    (["--steps", "8"], "--steps goes with --check"),
    (["--check", "--opt", "adam"], "argument --opt: invalid choice"),
])
def test_check_bad_input_exits_2_with_one_line(argv, needle, cuda_graph, capsys):
    line = expect_exit(cuda_graph.main, ["--dataset", "synthetic"] + argv, 2, capsys)
    assert line.startswith("cuda_graph.py: error:") and needle in line, line


def test_cuda_graph_training_on_the_cpu_is_ssesam_minimal_py_bit_for_bit(alone, cuda_graph, tmp_path):
    out = str(tmp_path / "graphed")  # SSE-SAM graphed across its switch in multi_run.py's test
    summary = cuda_graph.main(ALONE["sgd"].split() + ["--out", out])
    assert_same_run(alone["sgd"], out)
    assert summary["final"]["epoch"] == 2


@needs_cuda
def test_cuda_graph_check_on_cuda_passes_across_the_switch_and_short_batches(cuda_graph):
    result = cuda_graph.main([a.replace("cpu", "cuda") for a in CHECK] + ["--steps", "16"])
    assert result["passed"] and result["recorded"]
    assert result["first_step_diff_over_step"] <= 1e-2 and result["max_rel_diff"] <= 1e-2


@needs_cuda
def test_cuda_graphed_training_follows_the_plain_one_epoch_by_epoch(cuda_graph, tmp_path):
    args = ALONE["ssesam"].replace("--device cpu", "--device cuda").split() + ["--epochs", "3"]
    plain = sm.main(args + ["--out", str(tmp_path / "plain")])
    graphed = cuda_graph.main(args + ["--out", str(tmp_path / "graphed")])
    assert plain["device"].startswith("cuda") and graphed["device"].startswith("cuda")
    for a, b in zip(run_outputs(tmp_path / "plain")[1], run_outputs(tmp_path / "graphed")[1]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a, b)  # bf16 and atomics: not bitwise


# =============================================================================================
# multi_run.py
# =============================================================================================

def test_multi_run_starts_each_run_after_the_one_before_drew_its_weights_and_matches_it_alone(
        alone, multi_run, tmp_path, monkeypatch):
    # the second run records its step as a CUDA graph (on the CPU: static buffers, eager); a slow
    # build_run would let a run started too early draw its weights meanwhile
    build, events = sm.build_run, []

    def slow_build(cfg, *args):
        events.append(("enter", cfg.opt))
        time.sleep(0.1)
        out = build(cfg, *args)
        events.append(("exit", cfg.opt))
        return out

    monkeypatch.setattr(sm, "build_run", slow_build)
    outs = {name: str(tmp_path / name) for name in ("sgd", "ssesam")}  # the command line's order
    summaries = multi_run.main([f"{ALONE['sgd']} --out {outs['sgd']}",
                                f"{ALONE['ssesam']} --cuda_graph --out {outs['ssesam']}"])
    assert events == [("enter", "sgd"), ("exit", "sgd"), ("enter", "ssesam"), ("exit", "ssesam")]
    for (name, out), summary in zip(outs.items(), summaries):
        assert_same_run(alone[name], out)
        assert summary == json.loads(open(os.path.join(out, "summary.json")).read())
        assert sorted(os.listdir(out)) == ["last.pt", "metrics.jsonl", "model.pt", "summary.json", "train.log"]
        log = open(os.path.join(out, "train.log")).read().splitlines()
        assert log[0].startswith("multi_run.py: run ") and log[2].startswith("epoch   1/2")
    assert [r["rho_head"] for r in run_outputs(outs["ssesam"])[1]] == [0.05, 0.0]  # across the switch


@pytest.mark.parametrize("runs,needle", [
    ([], "no run given"),
    ([SMALL, SMALL + " --imb_factor 10"], "run 2 differs from run 1 in --imb_factor"),
    ([SMALL, SMALL + " --dataset cifar10"], "run 2 differs from run 1 in --dataset"),
    ([SMALL + " --subset_seed 1", SMALL], "in --subset_seed"),
    ([SMALL, SMALL + " --device cuda:7"], "run 2: --device cuda:7: no such"),
    ([SMALL + " --out {tmp}/a", SMALL + " --out {tmp}/b/../a"], "both write --out"),
    ([SMALL, SMALL + " --opt adam"], "run 2: argument --opt"),
    ([SMALL, SMALL + " --out {tmp}/x --resume"], "run 2: --resume: there is no"),
    ([SMALL + " --lr '0.1"], "run 1: No closing quotation"),
])
def test_multi_run_bad_input_exits_2_with_one_line_before_anything_trains(runs, needle, multi_run, tmp_path,
                                                                        capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(sm, "train", lambda *a, **k: trained.append(1))
    line = expect_exit(multi_run.main, [r.format(tmp=tmp_path) for r in runs], 2, capsys)
    assert line.startswith("multi_run.py: error:") and needle in line, line
    assert not trained and os.listdir(tmp_path) == []  # nothing written


def test_a_failing_run_does_not_stop_the_other_and_the_exit_code_is_1(multi_run, tmp_path, capsys):
    # run 2 diverges in its first step (lr 1e12 / 2); run 1 (no --out: "[1] ..." on stdout) trains on
    args, bad = f"{SMALL} --opt sgd --epochs 2", tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        multi_run.main([args, f"{args} --lr 1e12 --out {bad}"])
    out, err = capsys.readouterr()
    assert exc.value.code == 1
    assert "[1] final (epoch 2)" in out and "[1]: final avg" in out and "1 of 2 finished" in out
    assert len(err.splitlines()) == 1 and re.fullmatch(
        rf"multi_run.py: run 2 \({re.escape(str(bad))}\) failed: non-finite training loss at epoch 1, "
        rf"step \d of 3 \(lr 5e\+11\); no epoch saved yet", err.strip()), err
    assert sorted(os.listdir(bad)) == ["train.log"]  # no epoch finished: nothing saved
    assert (bad / "train.log").read_text().splitlines()[-1] == err.strip().replace(f"run 2 ({bad}) failed: ", "")


@needs_cuda
def test_multi_run_on_cuda_trains_a_graphed_and_an_eager_run_alike_side_by_side(multi_run, tmp_path):
    args = ALONE["ssesam"].replace("--device cpu", "--device cuda")
    multi_run.main([f"{args} --cuda_graph --out {tmp_path / 'g'}", f"{args} --out {tmp_path / 'e'}"])
    for a, b in zip(run_outputs(tmp_path / "e")[1], run_outputs(tmp_path / "g")[1]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a, b)


# =============================================================================================
# bench.py
# =============================================================================================

PASSES = {"sgd": "1F+1B", "sam": "2F+2B", "imbsam": "2F+3B", "ssesam before the switch": "3F+4B",
          "ssesam after the switch": "2F+3B", "official ssesam": "4F+4B"}


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """bench.py on the CPU, ResNet-8, batch 4, 2 rounds of 1 step, with the graphed rows that only CUDA
    gets by default. (result, out folder, what it printed)"""
    out = tmp_path_factory.mktemp("bench")
    argv = f"--device cpu --arch resnet8 --batch_size 4 --dataset synthetic --out {out}".split()
    return (*printed(importlib.import_module("bench").main, argv, repeats=2, steps=1, graphed=True), out)


def test_bench_reports_the_passes_of_every_step_and_its_time_against_the_official_one(tiny_bench):
    result, text, out = tiny_bench
    rows = result["rows"]
    assert {k: r["passes"] for k, r in rows.items() if "graphed" not in k and "bf16" not in k} == PASSES
    assert {k: r["passes"] for k, r in rows.items() if "graphed" in k and "bf16" not in k} == \
        {f"{k}, graphed": "graph" for k in PASSES if k != "official ssesam"}
    fp32 = [k for k in rows if "bf16" not in k and k != "official ssesam"]
    assert sorted(k for k in rows if "bf16" in k) == sorted(f"{k}, bf16" for k in fp32)
    for k in fp32:  # bf16's speed-up is the fp32 time over the bf16 time, and the table prints it
        b = rows[f"{k}, bf16"]
        assert b["bf16_speedup"] == rows[k]["median_ms"] / b["median_ms"]
        assert f"| {k} | {rows[k]['median_ms']:.2f} | {b['median_ms']:.2f} | {b['bf16_speedup']:.2f}x |" in text
        if "graphed" not in k:
            assert b["passes"] == rows[k]["passes"]
    official = statistics.median(rows["official ssesam"]["ms"])
    for name, r in rows.items():
        assert len(r["ms"]) == 2 and all(t > 0 for t in r["ms"]), name
        assert r["median_ms"] == statistics.median(r["ms"]) and r["of_official"] == r["median_ms"] / official
        assert r["kernel_ms"] is None
    assert json.loads((out / "bench.json").read_text()) == result


@pytest.mark.parametrize("epochs_done", [0, 7])  # before and after the switch (gamma 0.7, T 10)
def test_official_baseline_step_gives_the_weights_of_ssesam_step_in_float64(epochs_done, bench):
    torch.manual_seed(0)
    ours = sm.build_model("resnet8", 4).double()
    official = sm.build_model("resnet8", 4).double()
    official.load_state_dict(ours.state_dict())
    start = torch.cat([p.detach().flatten() for p in ours.parameters()])
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    opt = sm.SSESAM(sgd(ours), ours, 0.05, 0.1, gamma=0.7, total_epochs=10)
    for _ in range(epochs_done):
        opt.update_rho()
    off = bench.OfficialSSESAM(sgd(official), official, opt.head_rho, 0.1)  # its update_rho() zeroes rho_head
    criterion, g = nn.CrossEntropyLoss(reduction="none"), torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step goes through SGD's momentum
        x = torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (16,), generator=g)
        tail = y >= 2
        sm.ssesam_step(ours, criterion, opt, x, y, tail)
        bench.official_ssesam_step(official, criterion, off, x, y, tail)
    a, b = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (ours, official))
    assert (a - start).norm() > 1e-3  # the steps moved the weights: the comparison can fail
    assert torch.allclose(a, b, rtol=0, atol=1e-10)  # w + ε - ε leaves rounding residue, no more


def test_bench_with_a_bad_imb_factor_exits_2_with_one_line(bench, capsys):
    line = expect_exit(bench.main, ["--dataset", "synthetic", "--imb_factor", "1000"], 2, capsys)
    assert line.startswith("bench.py: error: --imb_factor 1000")


@needs_cuda
def test_bench_on_cuda_reports_passes_graphed_rows_and_kernel_time(bench):
    rows = bench.main(["--device", "cuda", "--arch", "resnet8", "--batch_size", "4", "--dataset", "synthetic"],
                      repeats=2, steps=1)["rows"]
    assert {k: r["passes"] for k, r in rows.items() if "graphed" not in k} == PASSES
    graphed = {f"{k}, graphed" for k in PASSES if k != "official ssesam"}
    assert {k for k in rows if k.endswith(", graphed")} == graphed
    assert all(r["kernel_ms"] > 0 for k, r in rows.items() if "graphed" not in k)


# =============================================================================================
# reproduce.sh, results_table.py, gpu_check.sh
# =============================================================================================

REPRODUCE = dict(ENV, EPOCHS="1", ROWS="sgd", JOBS="2",
                 EXTRA="--dataset synthetic --eta 20 --batch_size 128 --device cpu")


def reproduce(folder, mode, seeds):
    return subprocess.run(["bash", os.path.join(SCRIPTS, "reproduce.sh"), "resnet8", seeds], capture_output=True,
                          text=True, env=dict(REPRODUCE, OUT_ROOT=str(folder), MODE=mode), timeout=300)


@slow_job("test_reproduce_sh_runs_a_row_skips_it_when_done_and_prints_the_table")
def reproduce_processes(folder):
    first, again = reproduce(folder, "processes", "3"), reproduce(folder, "processes", "3")
    control = subprocess.run(["bash", os.path.join(SCRIPTS, "reproduce.sh"), "resnet8", "3"], capture_output=True,
                             text=True, timeout=300, env=dict(REPRODUCE, OUT_ROOT=str(folder), SUFFIX="-bf16",
                                                              EXTRA=REPRODUCE["EXTRA"] + " --bf16"))
    return folder, first, again, control


def test_reproduce_sh_runs_a_row_skips_it_when_done_and_prints_the_table(slow_result):
    folder, first, again, control = slow_result
    run = folder / "resnet8" / "sgd-seed3"
    assert first.returncode == 0 and f"finished: {run}" in first.stdout, first.stderr
    assert sorted(os.listdir(run)) == ["last.pt", "metrics.jsonl", "model.pt", "summary.json", "train.log"]
    summary = json.loads((run / "summary.json").read_text())
    cfg = summary["config"]
    assert [cfg[k] for k in ("opt", "seed", "arch", "epochs")] == ["sgd", 3, "resnet8", 1]
    avg = f"{summary['final']['avg']:.1f}"
    assert re.search(rf"^\| CE \(SGD\) \| fp32 \| 1 \| .* \| {re.escape(avg)} \| 44.6 \|", first.stdout, re.M), \
        first.stdout
    assert again.returncode == 0 and f"done already: {run}" in again.stdout and "start:" not in again.stdout
    # SUFFIX: the same row again beside it, here in bf16; the table shows it as its own row
    assert control.returncode == 0 and f"finished: {run}-bf16" in control.stdout, control.stderr
    assert json.loads((folder / "resnet8" / "sgd-seed3-bf16" / "summary.json").read_text())["precision"] == "bf16"
    assert re.search(r"^\| CE \(SGD\) \| bf16 \| 1 \| ", control.stdout, re.M)
    assert "| CE (SGD): fp32 − bf16 |" in control.stdout


@slow_job("test_ctrl_c_in_reproduce_sh_threads_ends_multi_run_with_one_line_130_and_each_last_pt_resumes")
def reproduce_threads_interrupted(folder):
    """MODE=threads: two seeds of 50 epochs in one multi_run.py process; Ctrl-C (SIGINT to the process
    group, as a terminal sends it) once both runs have saved an epoch."""
    env = dict(REPRODUCE, OUT_ROOT=str(folder), MODE="threads", EPOCHS="50")
    env["EXTRA"] += " --print_freq 99"  # evaluate at the end only
    outs = [folder / "resnet8" / f"sgd-seed{seed}" for seed in (3, 4)]
    proc = subprocess.Popen(["bash", os.path.join(SCRIPTS, "reproduce.sh"), "resnet8", "3 4"], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not all((out / "last.pt").exists() for out in outs) and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stdout, stderr, outs


def test_ctrl_c_in_reproduce_sh_threads_ends_multi_run_with_one_line_130_and_each_last_pt_resumes(slow_result):
    code, stdout, stderr, outs = slow_result
    lines = [line for line in stderr.splitlines() if not line.startswith("warning: no CUDA")]  # --gpu 0 here
    assert code == 130 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("multi_run.py: interrupted by SIGINT;") and "--resume" in lines[0]
    assert all(f"start: {out}" in stdout for out in outs)  # both runs in the one multi_run.py process
    for out in outs:
        ckpt = sm.load_checkpoint(str(out / "last.pt"))  # whole and readable
        assert 1 <= ckpt["epoch"] < 50 and not (out / "summary.json").exists()
        cfg = sm.Config(**ckpt["config"])
        with pytest.raises(sm.UsageError, match="holds an unfinished run"):
            sm.prepare_out(cfg)  # the same flags without --resume do not start it afresh
        resume = sm.prepare_out(dataclasses.replace(cfg, resume=True))  # --resume accepts it ...
        net, _, criterion, opt, rng = sm.build_run(cfg, sm.data_counts(cfg.dataset, cfg.imb_factor)[0], CPU)
        assert sm._restore(resume, net, opt, criterion, rng, str(out))[1] == ckpt["epoch"]  # ... and it loads


@pytest.mark.parametrize("args,env", [([], {}), (["resnet8", "0"], {"ROWS": "sgd adam"}),
                                      (["resnet8", "0"], {"MODE": "fibers"}), (["resnet8", "0"], {"JOBS": "0"}),
                                      (["resnet8", "0"], {"SUFFIX": "/../x"})])
def test_reproduce_sh_rejects_bad_usage_with_exit_2_before_running_anything(args, env, tmp_path):
    r = subprocess.run(["bash", os.path.join(SCRIPTS, "reproduce.sh")] + args, capture_output=True, text=True,
                       env=dict(ENV, OUT_ROOT=str(tmp_path / "results"), **env), timeout=30)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and r.stdout == "", r.stderr
    assert not (tmp_path / "results").exists()


def write_summary(folder, opt, seed, avg, precision="bf16", suffix="", hours=1.0, many=70.0, device="cpu",
                  **settings):
    metrics = {"avg": avg, "many": many, "med": 50.0, "few": 17.0}
    metrics.update({k + "_tta": v + 1 for k, v in metrics.items()})
    cpu = {"name": "AMD EPYC", "vendor": "AuthenticAMD", "family": "25", "model": "17", "amx": False,
           "avx512_bf16": True}
    config = {"opt": opt, "arch": "resnet32", "epochs": 200, "lr": 0.01, "seed": seed,
              "out": str(folder / f"{opt}-seed{seed}{suffix}"), "print_freq": 10, **settings}
    (folder / f"{opt}-seed{seed}{suffix}").mkdir(parents=True, exist_ok=True)
    (folder / f"{opt}-seed{seed}{suffix}" / "summary.json").write_text(json.dumps(
        {"config": config, "params": 470000, "device": device, "device_name": "NVIDIA H200" if device != "cpu"
         else "cpu", "precision": precision, "cpu": cpu, "threads": 2, "torch": "2.14.1",
         "seconds": 3600.0 * hours, "final": metrics, "best": {k: v + 0.5 for k, v in metrics.items()}}))


def results_table_output(folder, capsys):
    assert importlib.import_module("results_table").main(str(folder)) == 0
    out = capsys.readouterr().out
    return {title.split("\n")[0]: title for title in out.split("\n\n") if title}, out


def test_results_table_gives_mean_and_sample_std_over_seeds_each_seed_and_the_paired_differences(tmp_path,
                                                                                                capsys):
    for seed, avg in enumerate([48.0, 50.0, 49.0]):
        write_summary(tmp_path, "ssesam", seed, avg, hours=seed + 1, many=70.0 + seed)
    for seed, avg in enumerate([44.0, 47.0, 45.0]):
        write_summary(tmp_path, "sgd", seed, avg)
    write_summary(tmp_path, "sam", 0, 46.0)  # a row with fewer seeds: shown with its n
    _, out = results_table_output(tmp_path, capsys)
    assert out.startswith("resnet32, 0.47 M parameters, 200 epochs; made on AMD EPYC (family 25 model 17), "
                          "2 threads; torch 2.14.1\n")
    headline, best = out.split("Best test evaluation")
    best = best.split("Each seed")[0]
    # avg 48, 50, 49: mean 49.0, sample std 1.0; many 70, 71, 72; hours 1, 2, 3
    sse = "| +SSE-SAM | bf16 | 3 | {} ± 1.0 | {} ± 0.0 | {} ± 0.0 | {} ± 1.0 | 49.3 | 2.0 ± 1.0 |"
    assert sse.format(71.0, 50.0, 17.0, 49.0) in headline
    assert "| CE (SGD) | bf16 | 3 | 70.0 ± 0.0 | 50.0 ± 0.0 | 17.0 ± 0.0 | 45.3 ± 1.5 | 44.6 | 1.0 ± 0.0 |" in headline
    assert "| +SAM | bf16 | 1 | 70.0 | 50.0 | 17.0 | 46.0 | 46.2 | 1.0 |" in headline
    assert sse.format(72.5, 51.5, 18.5, 50.5) in best  # the best: each + 0.5, re-scored with TTA: + 1
    assert "+ImbSAM" not in headline and "fp32" not in out  # rows without runs are left out; no control
    assert "| +SSE-SAM | bf16 | 1 | 71.0 | 50.0 | 17.0 | 50.0 |" in out  # each seed's own numbers
    # paired, seed by seed: SSE-SAM - SGD = 4, 3, 4 (mean 3.7, sample std 0.6); Many 0, 1, 2
    assert "| SSE-SAM − SGD | 3 | +1.0 ± 1.0 | +0.0 ± 0.0 | +0.0 ± 0.0 | +3.7 ± 0.6 | +4.0, +3.0, +4.0 |" in out
    assert "| SAM − SGD | 1 | +0.0 | +0.0 | +0.0 | +2.0 | +2.0 |" in out  # on the seed both have
    assert "| SSE-SAM − SAM | 1 | +0.0 | +0.0 | +0.0 | +2.0 | +2.0 |" in out
    assert "- No control run: nothing here says how far one run moves" in out


def test_results_table_shows_each_control_as_its_own_row_with_its_difference_and_weighs_rows_against_it(
        tmp_path, capsys):
    write_summary(tmp_path, "sgd", 0, 44.0)
    # where seed 1 ran and how it reported (every setting --resume lets change) leaves it a seed of the row
    write_summary(tmp_path, "sgd", 1, 45.0, **{k: "elsewhere" for k in sm.RUN_ONLY if k != "out"})
    write_summary(tmp_path, "sgd", 0, 45.5, precision="fp32", suffix="-fp32", hours=1.5, many=69.0)
    write_summary(tmp_path, "sgd", 0, 43.0, suffix="-gpu", device="cuda:0")  # a GPU run: a control
    write_summary(tmp_path, "sgd", 0, 44.5, suffix="-lr", lr=0.02)  # other settings: a control
    write_summary(tmp_path, "ssesam", 0, 46.0)
    write_summary(tmp_path, "ssesam", 1, 45.6)
    _, out = results_table_output(tmp_path, capsys)
    headline, best = out.split("Best test evaluation")
    rows = [line for line in headline.splitlines() if line.startswith("| CE (SGD)")]
    assert rows == ["| CE (SGD) | bf16 | 2 | 70.0 ± 0.0 | 50.0 ± 0.0 | 17.0 ± 0.0 | 44.5 ± 0.7 | 44.6 | 1.0 ± 0.0 |",
                    "| CE (SGD) (lr 0.02) | bf16 | 1 | 70.0 | 50.0 | 17.0 | 44.5 | 44.6 | 1.0 |",
                    "| CE (SGD) (lr 0.02): bf16 − bf16 | | | +0.0 | +0.0 | +0.0 | +0.5 | | |",
                    "| CE (SGD) | fp32 | 1 | 69.0 | 50.0 | 17.0 | 45.5 | 44.6 | 1.5 |",
                    "| CE (SGD): fp32 − bf16 | | | -1.0 | +0.0 | +0.0 | +1.5 | | |",  # seed 0's pair
                    "| CE (SGD) (GPU) | bf16 | 1 | 70.0 | 50.0 | 17.0 | 43.0 | 44.6 | 1.0 |",
                    "| CE (SGD) (GPU): bf16 − bf16 | | | +0.0 | +0.0 | +0.0 | -1.0 | | |"]
    assert "| CE (SGD): fp32 − bf16 | | | -1.0 | +0.0 | +0.0 | +1.5 | | |" in best
    # the floor is the largest control difference (1.5); SSE-SAM - SGD: +2.0 and +0.6
    assert "- Noise floor: the largest last-epoch Avg difference between a control and its main row, seed by " \
           "seed, is 1.5;" in out
    assert "- SSE-SAM − SGD: +1.3 ± 1.0 Avg (inside the floor in 1 of 2 seeds: not evidence)." in out
    assert "One seed per row" not in out
    write_summary(tmp_path, "sam", 0, 45.0)  # one row with one seed: named, not every row
    _, out = results_table_output(tmp_path, capsys)
    assert out.rstrip("\n").endswith("- Rows with one seed (SAM): no spread between their runs, so no difference "
                                      "with them is a ranking.")
    assert "One seed per row" not in out


def test_results_table_weighs_each_difference_by_the_floor_its_sign_and_twice_its_std(tmp_path, capsys):
    write_summary(tmp_path, "sgd", 0, 44.5, precision="fp32", suffix="-fp32")  # the floor: 0.5
    for opt, avgs, manys in (("sgd", (44.0, 45.0, 44.0), (70.0,) * 3),
                             ("sam", (46.0, 46.5, 47.0), (71.0, 72.0, 71.5)), ("imbsam", (45.0, 47.0, 44.6), (70.0,) * 3), ("ssesam", (48.0, 49.0, 48.5), (70.0,) * 3)):
        for seed, (avg, many) in enumerate(zip(avgs, manys)):
            write_summary(tmp_path, opt, seed, avg, many=many)
    shows = results_table_output(tmp_path, capsys)[1].split("What they show\n\n")[1].splitlines()
    # means 48.5, 46.5, 45.5, 44.3: ImbSAM below SAM
    assert shows[0] == ("- The paper's order of the Avg, SSE-SAM > ImbSAM > SAM > SGD, does not appear in the means "
                        "over seeds 0, 1, 2, the seeds all four rows have: SSE-SAM 48.5, SAM 46.5, ImbSAM 45.5, SGD 44.3.")
    # SAM - SGD: 2, 1.5, 3 (mean 2.17 > 2 x 0.76), all above 0.5; Many 1, 2, 1.5; Med and Few 0
    assert "- SAM − SGD: +2.2 ± 0.8 Avg (evidence: 3.0 to 6.0 times the floor in all 3 seeds). The seeds agree " \
           "(same sign, mean over twice its std) in Many +1.5 ± 0.5." in shows
    # ImbSAM - SGD: 1, 2, 0.6: one sign, outside the floor, but mean 1.2 < 2 x 0.72
    assert "- ImbSAM − SGD: +1.2 ± 0.7 Avg (the same sign in all 3 seeds, but the mean is within twice its std: " \
           "not evidence)." in shows
    assert "- ImbSAM − SAM: -1.0 ± 1.5 Avg (its sign changes between seeds: not evidence). The seeds agree (same " \
           "sign, mean over twice its std) in Many -1.5 ± 0.5." in shows  # Many: 70 - 71, 70 - 72, 70 - 71.5
    for seed, avg in enumerate((46.5, 47.5, 47.0)):  # ImbSAM now above SAM: the paper's order
        write_summary(tmp_path, "imbsam", seed, avg)
    assert "- The paper's order of the Avg, SSE-SAM > ImbSAM > SAM > SGD, appears in the means over seeds " \
           "0, 1, 2, the seeds all four rows have: SSE-SAM 48.5, ImbSAM 47.0, SAM 46.5, SGD 44.3." in \
           results_table_output(tmp_path, capsys)[1]


@pytest.mark.parametrize("damage", ["truncated", "no seed", "no final avg", "a second seed 0"])
def test_results_table_with_a_damaged_summary_exits_2_with_one_line_naming_it(damage, tmp_path, capsys):
    write_summary(tmp_path, "sgd", 0, 44.0)
    path = tmp_path / "sgd-seed0" / "summary.json"
    s = json.loads(path.read_text())
    if damage == "truncated":
        path.write_text("{truncated")
    elif damage == "a second seed 0":
        write_summary(tmp_path, "sgd", 0, 44.0, suffix="-again")
        path = tmp_path / "sgd-seed0-again" / "summary.json"
    else:
        part, key = ("config", "seed") if damage == "no seed" else ("final", "avg")
        del s[part][key]
        path.write_text(json.dumps(s))
    assert importlib.import_module("results_table").main(str(tmp_path)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(path) in err[0] and err[0].startswith("results_table.py: error: ")


def test_gpu_check_sh_is_valid_bash():
    r = subprocess.run(["bash", "-n", os.path.join(SCRIPTS, "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_gpu_check_sh_summary_gives_each_checks_status_and_numbers(cpu_check, tiny_bench, tmp_path):
    (tmp_path / "graph_check.txt").write_text(cpu_check[1])
    (tmp_path / "bench.txt").write_text(tiny_bench[1])
    (tmp_path / "tests.txt").write_text("....\n4 passed, 2 skipped in 3.1s\n")
    (tmp_path / "status.tsv").write_text("tests\t0\ngraph_check\t0\nbench\t1\n")
    (tmp_path / "env.txt").write_text("python 3.11.7\ntorch 2.11.0\ndevice NVIDIA H200\nother lines\n")
    r = subprocess.run(["bash", os.path.join(SCRIPTS, "gpu_check.sh"), "--summary", str(tmp_path)],
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# gpu_check: NVIDIA H200\n\npython 3.11.7, torch 2.11.0\n")
    assert "| tests | passed | 4 passed, 2 skipped in 3.1s |" in md and "| graph_check | passed | PASSED |" in md
    rows = tiny_bench[0]["rows"]
    ratios = [rows[f"ssesam {when} the switch"]["of_official"] for when in ("before", "after")]
    assert (f"| bench | failed (exit 1) | SSE-SAM step: {ratios[0]:.3f} of the official step's time before the "
            f"switch, {ratios[1]:.3f} after it |") in md
    assert "\n    largest relative difference per tensor, graphed vs plain: 0 after step 1 (-), 0 after" in md
    assert f"| official ssesam | {rows['official ssesam']['median_ms']:.2f} | 1.000 | 4F+4B | -- |" in md


# =============================================================================================
# curves.py, saddle.py: the pictures of the table's runs
# =============================================================================================

TINY_RUN = (SMALL + " --imb_factor 10 --epochs 4 --gamma 0.5 --print_freq 2 --opt ssesam").split()


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A finished SSE-SAM run (4 epochs, the switch after 2, evaluated at 2 and 4) with its train.log
    as reproduce.sh keeps it, a copy of it in progress (last.pt after epoch 3, no summary.json) and
    one with only its train.log."""
    root = tmp_path_factory.mktemp("runs") / "resnet8"
    done = root / "ssesam-seed0"
    summary, text = printed(sm.main, TINY_RUN + ["--out", str(done)])
    (done / "train.log").write_text(text)
    running = root / "ssesam-seed1"
    running.mkdir()
    ckpt = torch.load(done / "last.pt", map_location="cpu", weights_only=True)
    ckpt["epoch"], ckpt["history"] = 3, ckpt["history"][:3]
    torch.save(ckpt, running / "last.pt")
    log_only = root / "ssesam-seed2"
    log_only.mkdir()
    (log_only / "train.log").write_text("\n".join(text.splitlines()[:3]) + "\n")  # the first line, 2 epochs
    return SimpleNamespace(root=root, done=done, running=running, log_only=log_only, summary=summary,
                           history=torch.load(done / "last.pt", weights_only=True)["history"])


@pytest.fixture
def curves():
    return importlib.import_module("curves")


def test_curves_read_a_finished_run_a_run_in_progress_and_a_bare_log_as_the_run_wrote_them(tiny_runs, curves):
    history = tiny_runs.history  # every epoch, as train() kept it
    done = curves.read_run(str(tiny_runs.done))
    assert done["done"] and done["config"] == {"dataset": "synthetic", "arch": "resnet8", "opt": "ssesam", "epochs": 4}
    assert [r["epoch"] for r in done["rows"]] == [1, 2, 3, 4]
    # the loss of each epoch from train.log (4 decimals), exact where metrics.jsonl has the epoch
    assert [r["loss"] for r in done["rows"]] == [h["loss"] if "avg" in h else float(f"{h['loss']:.4f}")
                                                 for h in history]
    with open(tiny_runs.done / "metrics.jsonl") as fh:
        evaluated = [json.loads(line) for line in fh]
    assert [r for r in done["rows"] if "avg_tta" in r] == [{**r, "epochs": 4} for r in evaluated]  # exact
    running = curves.read_run(str(tiny_runs.running))
    assert not running["done"] and running["rows"] == history[:3]
    bare = curves.read_run(str(tiny_runs.log_only))
    assert [r["epoch"] for r in bare["rows"]] == [1, 2] and bare["config"]["arch"] == "resnet8"
    assert bare["rows"][1]["avg"] == float(f"{history[1]['avg']:.1f}") and "avg" not in bare["rows"][0]
    assert curves.switch_epoch(done["rows"]) == 2  # ρ_head = 0 after ⌈0.5 · 4⌉ = 2 epochs
    assert curves.switch_epoch(bare["rows"]) is None  # not seen yet
    # an epoch logged twice (a piece that ran on past its last saved epoch): the later line counts
    lines = (tiny_runs.done / "train.log").read_text().splitlines(keepends=True)
    second = next(i for i, line in enumerate(lines) if line.startswith("epoch   2/"))
    redone = lines[second].replace("loss ", "loss 9", 1)
    (tiny_runs.log_only / "twice.log").write_text("".join(lines[:second + 1] + ["interrupted\n", redone]))
    _, rows = curves.parse_log(str(tiny_runs.log_only / "twice.log"))
    assert list(rows) == [1, 2] and rows[2]["loss"] == float("9" + f"{history[1]['loss']:.4f}")
    os.remove(tiny_runs.log_only / "twice.log")


def test_curves_draw_a_row_as_the_mean_of_its_seeds_and_a_control_or_a_run_in_progress_alone(
        tiny_runs, curves, tmp_path):
    root = tmp_path / "resnet8"
    for name in ("ssesam-seed0", "ssesam-seed1", "ssesam-seed0-fp32"):
        shutil.copytree(tiny_runs.done, root / name)
    for name, seed, precision in (("ssesam-seed1", 1, "bf16"), ("ssesam-seed0-fp32", 0, "fp32")):
        summary = json.loads((root / name / "summary.json").read_text())
        summary["config"]["seed"], summary["precision"] = seed, precision
        (root / name / "summary.json").write_text(json.dumps(summary))
    summary = json.loads((root / "ssesam-seed0" / "summary.json").read_text())
    summary["precision"] = "bf16"
    (root / "ssesam-seed0" / "summary.json").write_text(json.dumps(summary))
    shutil.copytree(tiny_runs.running, root / "ssesam-seed2")
    runs = [curves.read_run(str(f)) for f in curves.find_runs([str(root)])]
    groups = curves.groups_of(runs)
    assert [(label, [m["name"] for m in members]) for label, members in groups] == [
        ("ssesam, seeds 0, 1", ["ssesam-seed0", "ssesam-seed1"]),   # one protocol, two seeds
        ("ssesam-fp32, seed 0", ["ssesam-seed0-fp32"]),              # a control: its own line
        ("ssesam-seed2 (in progress, epoch 3)", ["ssesam-seed2"])]   # alone, as far as it is
    out = curves.main([str(root), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and out == str(tmp_path / "c.png")


def test_curves_draws_one_run_or_several_into_a_png(tiny_runs, curves, tmp_path, capsys):
    one = tmp_path / "one.png"
    curves.main([str(tiny_runs.done), "--out", str(one)])
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = curves.main([str(tiny_runs.root)])  # every run under the folder, into its curves.png
    assert out == str(tiny_runs.root / "curves.png") and os.path.getsize(out) > 0
    text = capsys.readouterr().out
    assert "ssesam-seed1: 3 of 4 epochs, in progress" in text and "ssesam-seed0: 4 of 4 epochs\n" in text
    os.remove(out)


@pytest.mark.parametrize("damage,needle", [("no metrics", "without its metrics.jsonl"),
                                           ("bad summary", "summary.json is damaged"),
                                           ("bad last.pt", "last.pt is not a readable checkpoint"),
                                           ("other network", "different networks"),
                                           ("empty", "holds no run"), ("missing", "is not a folder")])
def test_curves_bad_input_exits_2_with_one_line_and_writes_nothing(damage, needle, tiny_runs, curves, tmp_path,
                                                                 capsys):
    run = tmp_path / "ssesam-seed0"
    shutil.copytree(tiny_runs.done, run)
    folders = [str(run)]
    if damage == "no metrics":
        os.remove(run / "metrics.jsonl")
    elif damage == "bad summary":
        (run / "summary.json").write_text("{")
    elif damage == "bad last.pt":
        os.remove(run / "summary.json")
        (run / "last.pt").write_bytes(b"garbage")
    elif damage == "other network":
        other = tmp_path / "sgd-seed0"
        other.mkdir()
        (other / "train.log").write_text("synthetic IF 10: 49 train images, 10 classes, 5 tail (n < 10); "
                                         "resnet32 0.47 M params; sgd + CE; device cpu\n")
        folders.append(str(other))
    elif damage == "empty":
        folders = [str(tmp_path / "nothing")]
        os.mkdir(folders[0])
    else:
        folders = [str(tmp_path / "absent")]
    with pytest.raises(SystemExit) as exc:
        curves.main(folders + ["--out", str(tmp_path / "c.png")])
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "c.png").exists()


@pytest.fixture
def saddle():
    return importlib.import_module("saddle")


# =============================================================================================
# saddle.py's analysis: Hessian eigenvalues against the exact ones of a tiny model
# =============================================================================================

C = 10
COUNTS = [200, 154, 119, 92, 71, 55, 42, 33, 25, 20]  # synthetic IF 10; tail (n < 50) = classes 6..9
ETA = 50
TAIL_CLASSES = torch.tensor([c for c, n in enumerate(COUNTS) if n < ETA])


def hessian_model(seed=0):
    """166 float64 parameters: conv, BN in eval mode with non-trivial running statistics, ReLU,
    global pool, fc. Small enough for the full Hessian; at these weights the Hessian is indefinite."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, C)).double()
    with torch.no_grad():
        bn = m[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def hessian_data(n=40, seed=1):
    """n uint8 8 x 8 images and labels over all C classes."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8),
            torch.randint(0, C, (n,), generator=g))


def exact_hessian(model, x, y):
    """The full P x P Hessian of the mean CE over all images, in eval mode, in the flat parameters."""
    model.eval()
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()])
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    xn = sm.normalize(x).double()

    def L(w):
        params = {n: t.view(s) for n, t, s in zip(names, w.split([s.numel() for s in shapes]), shapes)}
        return F.cross_entropy(torch.func.functional_call(model, params, (xn,)), y)

    return torch.autograd.functional.hessian(L, w)


def ce_criterion():
    return sm.LongTailLoss("CE", COUNTS).double()


def test_hvp_equals_the_exact_hessian_times_v_summed_over_batches(saddle):
    model = hessian_model()
    x, y = hessian_data()
    H = exact_hessian(model, x, y)
    for seed in (0, 1):
        v = torch.randn(len(H), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        Hv = saddle.hvp(model, ce_criterion(), x, y, v, batch_size=16)  # 16 + 16 + 8 images
        assert torch.allclose(Hv, H @ v, rtol=0, atol=1e-13)
        with torch.no_grad():  # works where the caller switched autograd off
            assert torch.allclose(saddle.hvp(model, ce_criterion(), x, y, v, batch_size=16), Hv, rtol=0, atol=1e-15)
    assert all(p.grad is None for p in model.parameters())  # .grad is left alone


def test_hessian_extremes_are_the_extreme_eigenvalues_of_the_exact_hessian(saddle):
    model = hessian_model()
    x, y = hessian_data()
    ev = torch.linalg.eigvalsh(exact_hessian(model, x, y))
    lo, hi = ev[0].item(), ev[-1].item()
    assert len(ev) == 166 and lo < -0.1 and hi > 0.1  # indefinite, and larger than k: a real test
    r = saddle.hessian_extremes(model, ce_criterion(), x, y, batch_size=16)  # k = 30 Lanczos steps
    assert r["lambda_min"] == pytest.approx(lo, rel=1e-10)
    assert r["lambda_max"] == pytest.approx(hi, rel=1e-10)
    assert r["ratio"] == pytest.approx(lo / hi, rel=1e-10)
    with torch.no_grad():  # L(w) over the same images, in one batch
        assert r["loss"] == pytest.approx(F.cross_entropy(model(sm.normalize(x).double()), y).item(), rel=1e-12)


def test_hessian_extremes_of_a_model_in_train_mode_use_eval_mode_and_leave_the_model_as_found(saddle):
    model = hessian_model()
    x, y = hessian_data()
    in_eval = saddle.hessian_extremes(model, ce_criterion(), x, y, k=5)
    model.train()  # BN would normalise by the batch: another Hessian
    state = copy.deepcopy(model.state_dict())
    assert saddle.hessian_extremes(model, ce_criterion(), x, y, k=5) == in_eval
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # weights, BN statistics
    assert all(p.grad is None for p in model.parameters())


def rotated(eigenvalues, seed=0):
    """A symmetric Q diag(eigenvalues) Qᵀ with a random orthogonal Q (float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T


def test_lanczos_gives_ritz_values_weights_and_residual_bounds_and_stops_on_an_invariant_space(saddle):
    ev = torch.linspace(-2, 7, 12, dtype=torch.float64)
    A = rotated(ev.tolist())
    v0 = torch.randn(12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theta, tau, res = saddle.lanczos(lambda v: A @ v, v0, k=12)
    assert torch.allclose(theta, ev, rtol=0, atol=1e-10) and res.max() < 1e-8
    # after all 12 steps the weights are v0's squared components along the eigenvectors
    _, U = torch.linalg.eigh(A)
    assert torch.allclose(tau, (U.T @ v0 / v0.norm()) ** 2, rtol=0, atol=1e-10)
    # after 5: each Ritz value has an eigenvalue of A within its residual bound, and the weights sum to 1
    theta, tau, res = saddle.lanczos(lambda v: A @ v, v0, k=5)
    assert len(theta) == 5 and tau.sum().item() == pytest.approx(1, abs=1e-12)
    assert all((ev - t).abs().min() <= r + 1e-12 for t, r in zip(theta, res))
    # repeated eigenvalues: the Krylov space has dimension 3 (one per distinct eigenvalue), so
    # Lanczos stops after 3 steps with the exact distinct eigenvalues, not with noise
    R = rotated([1.0, 1.0, 1.0, 2.0, 2.0, 5.0])
    theta, _, res = saddle.lanczos(lambda v: R @ v, v0[:6], k=6)
    assert torch.allclose(theta, torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64), rtol=0, atol=1e-10)
    assert res.max() == 0


class Quadratic(nn.Module):
    """A model whose every per-sample loss is ½ wᵀ A w: the Hessian of the mean loss is A."""

    def __init__(self, A):
        super().__init__()
        self.A = A
        self.w = nn.Parameter(torch.ones(len(A), dtype=A.dtype))

    def forward(self, x):  # (N, 1): the loss of each image, which the criterion passes on
        return (0.5 * self.w @ self.A @ self.w).expand(len(x), 1)


@pytest.mark.parametrize("planted", [True, False])
def test_hessian_extremes_find_a_planted_negative_outlier_and_report_none_where_there_is_none(planted, saddle):
    # 200 small eigenvalues in [0.01, 0.5] and two large ones, plus (planted) one at -3
    small = torch.linspace(0.01, 0.5, 200, dtype=torch.float64).tolist()
    ev = ([-3.0] if planted else []) + small + [10.0, 30.0]
    A = rotated(ev, seed=4)
    model = Quadratic(A)
    x, y = torch.zeros(8, 3, 1, 1, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    r = saddle.hessian_extremes(model, lambda z, y: z[:, 0], x, y, k=80, tol=0.05, batch_size=3)
    for e in ("min", "max"):  # stopped once both extremes settled, each within its bound of the truth
        truth = {"min": ev[0], "max": ev[-1]}[e]
        assert abs(r[f"lambda_{e}"] - truth) <= r[f"residual_{e}"] + 1e-12
        assert r[f"residual_{e}"] < 0.05 * abs(truth)
    assert r["steps"] < 80 and sum(r["weights"]) == pytest.approx(1, abs=1e-12)
    if planted:  # found, settled and standing apart from the next Ritz value
        assert r["outlier"] and r["nodes"][1] > -0.1
        # all 80 steps: λ_min exact, and its weight in the density is v0's squared component along
        # the planted eigenvector (v0 as hessian_extremes draws it)
        full = saddle.hessian_extremes(model, lambda z, y: z[:, 0], x, y, k=80, batch_size=3)
        v0 = torch.randn(len(A), generator=torch.Generator().manual_seed(0)).double()
        q = torch.linalg.eigh(A)[1][:, 0]
        assert full["lambda_min"] == pytest.approx(-3.0, rel=1e-10) and full["outlier"]
        assert full["weights"][0] == pytest.approx(((q @ v0) / v0.norm()).item() ** 2, rel=1e-8)
        grid = torch.linspace(-5, -1, 401, dtype=torch.float64)  # the density's mass around -3
        mass = saddle.density(full["nodes"], full["weights"], grid, sigma=0.1).sum().item() * 0.01
        assert mass == pytest.approx(full["weights"][0], rel=1e-3)
    else:  # no negative eigenvalue: none reported, and the density has no node below 0
        assert r["lambda_min"] > 0 and not r["outlier"] and r["ratio"] > 0
        assert all(t > 0 for t in r["nodes"])


def test_saddle_analysis_takes_head_and_tail_by_eta_and_subsets_without_repeats(saddle, monkeypatch):
    model = hessian_model()
    x, y = hessian_data(n=60)
    tail = torch.isin(y, TAIL_CLASSES)  # COUNTS with η 50: classes 6..9
    assert 0 < int(tail.sum()) < len(y)
    r = saddle.saddle_analysis(model, ce_criterion(), x, y, COUNTS, ETA, k=5)
    assert r["head"] == saddle.hessian_extremes(model, ce_criterion(), x[~tail], y[~tail], k=5)
    assert r["tail"] == saddle.hessian_extremes(model, ce_criterion(), x[tail], y[tail], k=5)
    seen = []
    monkeypatch.setattr(saddle, "hessian_extremes", lambda model, criterion, x, y, **kw: seen.append((x, y)))
    saddle.saddle_analysis(model, ce_criterion(), x, y, COUNTS, ETA, max_images=8)
    (xh, yh), (xt, yt) = seen
    assert len(yh) == 8 and len(yt) == min(8, int(tail.sum()))
    assert not torch.isin(yh, TAIL_CLASSES).any() and torch.isin(yt, TAIL_CLASSES).all()
    for xs, group in ((xh, x[~tail]), (xt, x[tail])):  # distinct images of the group, none twice
        rows = {tuple(r.flatten().tolist()) for r in group}
        picked = [tuple(r.flatten().tolist()) for r in xs]
        assert len(set(picked)) == len(picked) and set(picked) <= rows


def test_saddle_gives_saddle_analysis_of_each_model_pt_and_writes_json_and_png(tiny_runs, saddle, tmp_path):
    report = saddle.main([str(tiny_runs.done), "--images", "8", "--steps", "4", "--out", str(tmp_path)])
    # the same numbers the obvious way: the run's network and loss, its weights, the module's analysis
    cfg = sm.Config(**tiny_runs.summary["config"])
    x, y, _, _, counts, _ = sm.load_data("synthetic", imb_factor=10.0)
    model = sm.build_model("resnet8", 10)
    model.load_state_dict(torch.load(tiny_runs.done / "model.pt", weights_only=True))
    expected = saddle.saddle_analysis(model.eval(), sm.LongTailLoss("CE", counts), x, y, counts, cfg.eta,
                                  max_images=8, seed=0, k=4)
    got = report["runs"]["ssesam-seed0"]
    assert {g: got[g] for g in ("head", "tail")} == expected
    assert report["lanczos_steps"] == 4 and report["precision"] == "fp32"
    assert report["images_per_group"] == {"head": 8, "tail": 8}
    assert json.loads((tmp_path / "saddle.json").read_text()) == report
    assert (tmp_path / "saddle.png").read_bytes()[:4] == b"\x89PNG"
    assert got["commit"] and got["threads"] == torch.get_num_threads()


def test_saddle_adds_runs_to_its_json_one_at_a_time_and_refuses_other_settings(tiny_runs, saddle, tmp_path,
                                                                             capsys):
    first = saddle.main([str(tiny_runs.done), "--images", "8", "--steps", "3", "--out", str(tmp_path)])
    other = tmp_path / "runs" / "sgd-seed0"
    shutil.copytree(tiny_runs.done, other)
    capsys.readouterr()
    both = saddle.main([str(tiny_runs.done), str(other), "--images", "8", "--steps", "3", "--out", str(tmp_path)])
    assert "ssesam-seed0: already in" in capsys.readouterr().out
    assert both["runs"]["ssesam-seed0"] == first["runs"]["ssesam-seed0"]  # kept, not made again
    assert {g: both["runs"]["sgd-seed0"][g] for g in ("head", "tail")} == \
           {g: first["runs"]["ssesam-seed0"][g] for g in ("head", "tail")}  # the same weights
    saved = (tmp_path / "saddle.json").read_text()
    err = expect_exit(saddle.main, [str(other), "--images", "8", "--steps", "4", "--out", str(tmp_path)], 2, capsys)
    assert "holds runs made with other settings" in err and (tmp_path / "saddle.json").read_text() == saved
    for damaged in ("[1, 2", saved.replace('"ratio"', '"ration"', 1)):  # not JSON; a run without a number
        (tmp_path / "saddle.json").write_text(damaged)
        assert "is damaged" in expect_exit(saddle.main, [str(other), "--out", str(tmp_path)], 2, capsys)
        assert (tmp_path / "saddle.json").read_text() == damaged


def test_saddle_tables_give_mean_and_std_each_seed_and_weigh_the_papers_claims_by_paired_ratios(saddle):
    def run(head, tail, loss=None):  # ratios; λ_max 100; L(w) where given
        return {g: None if r is None else {"lambda_min": 100 * r, "lambda_max": 100.0, "ratio": r,
                                           **({} if loss is None else {"loss": loss})}
                for g, r in (("head", head), ("tail", tail))}
    tails = {"sgd": (-0.005, -0.006, -0.004), "sam": (-0.012, -0.011, -0.013), "imbsam": (-0.010, -0.014, -0.009),
             "ssesam": (-0.018, -0.015, -0.017)}
    runs = {f"{opt}-seed{k}": run(-0.01, t, loss=0.01 * (k + 1)) for opt, ts in tails.items() for k, t in enumerate(ts)}
    runs["sgd-seed0-fp32"] = run(None, -0.007)  # a control: its own row; a group without images: --
    runs["sam-seed2"] = run(-0.01, -0.013)  # made before L(w) was recorded: -- for the row's mean L
    mean, each, reading = saddle.tables({"runs": runs})
    assert mean.splitlines()[2:4] == [
        "| SGD | 3 | 0.0200 ± 0.0100 | -1.000 ± 0.000 | 100.0 ± 0.0 | -0.0100 ± 0.0000 "
        "| 0.0200 ± 0.0100 | -0.500 ± 0.100 | 100.0 ± 0.0 | -0.0050 ± 0.0010 |",
        "| SGD (fp32) | 1 | -- | -- | -- | -- | -- | -0.700 | 100.0 | -0.0070 |"]
    assert mean.splitlines()[4].startswith("| SAM | 3 | -- | -1.000 ± 0.000 |")
    assert mean.splitlines()[-1].startswith("| SSE-SAM | 3 |") and len(mean.splitlines()) == 7
    assert "| ImbSAM | 1 | 0.0200 | -1.000 | 100.0 | -0.0100 | 0.0200 | -1.400 | 100.0 | -0.0140 |" in each.splitlines()
    lines = reading.splitlines()
    # SAM - SGD: -0.007, -0.005, -0.009, one sign, |mean| over twice the std: the claim's sign
    assert lines[0] == ("- SAM leaves the tail near a saddle: SAM's tail ratio below SGD's. SAM − SGD, tail ratio "
                        "-0.0070 ± 0.0020 (seeds 0, 1, 2: -0.0070, -0.0050, -0.0090): supports it.")
    assert lines[1].endswith("(seeds 0, 1, 2: +0.0020, -0.0030, +0.0040): not one sign in every seed with a mean "
                             "over twice its std: leaves it open.")  # ImbSAM - SAM
    assert lines[2].endswith("(seeds 0, 1, 2: -0.0060, -0.0040, -0.0040): contradicts it.")  # SSE-SAM - SAM
    assert lines[3] == ("- SSE-SAM escapes on the head too: its head ratio above ImbSAM's. SSE-SAM − ImbSAM, head "
                        "ratio +0.0000 ± 0.0000 (seeds 0, 1, 2: +0.0000, +0.0000, +0.0000): not one sign in every "
                        "seed with a mean over twice its std: leaves it open.")  # no difference at all
    table, one = saddle.tables({"runs": {"sam-seed0": run(-0.01, -0.012), "sgd-seed0": run(-0.01, -0.005),
                                         "mine": run(-0.02, -0.02)}})  # a folder named without a seed
    assert table.splitlines()[-1] == "| mine | 1 | -- | -2.000 | 100.0 | -0.0200 | -- | -2.000 | 100.0 | -0.0200 |"
    assert one.endswith("SAM − SGD, tail ratio -0.0070 (seed 0): one seed, no spread: leaves it open.")


def test_spectrum_adds_each_run_to_spectrum_json_with_group_and_class_spectra_and_draws_them(
        tiny_runs, saddle, tmp_path, capsys):
    spectrum = importlib.import_module("spectrum")
    flags = ["--images", "8", "--steps", "4", "--rare", "2", "--head_classes", "2", "--class_images", "5",
             "--out", str(tmp_path)]
    report = spectrum.main([str(tiny_runs.done)] + flags)
    run = report["runs"]["ssesam-seed0"]
    cfg = sm.Config(**tiny_runs.summary["config"])
    x, y, _, _, counts, _ = sm.load_data("synthetic", imb_factor=10.0)
    # the classes: the two rarest (all their images), two head classes (a 5-image subset), by hand
    by_count = sorted(range(10), key=lambda c: (counts[c], -c))
    heads = [c for c in range(10) if counts[c] >= cfg.eta]
    assert set(run["result"]["classes"]) == {str(c) for c in by_count[:2] + [heads[0], heads[-1]]}
    for c, s in run["result"]["classes"].items():
        assert s["images"] == min(counts[int(c)], 5 if counts[int(c)] >= cfg.eta else counts[int(c)])
        assert s["group"] == ("tail" if counts[int(c)] < cfg.eta else "head")
    # one class and the groups again, the obvious way: the run's weights, saddle.py's analysis
    model = sm.build_model("resnet8", 10)
    model.load_state_dict(torch.load(tiny_runs.done / "model.pt", weights_only=True))
    criterion = sm.LongTailLoss("CE", counts)
    rarest = by_count[0]
    mine = saddle.hessian_extremes(model.eval(), criterion, x[y == rarest], y[y == rarest], k=4, tol=0.05)
    assert {k: run["result"]["classes"][str(rarest)][k] for k in mine} == mine
    assert run["result"]["groups"] == saddle.saddle_analysis(model, criterion, x, y, counts, cfg.eta,
                                                             max_images=8, k=4, tol=0.05)
    assert run["settings"]["steps"] == 4 and run["commit"] and run["threads"] == torch.get_num_threads()
    assert json.loads((tmp_path / "spectrum.json").read_text()) == report
    assert (tmp_path / "spectrum.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "saddle.json").exists()
    # again: kept, not redone; another run is added beside it
    other = tmp_path / "runs" / "sgd-seed0"
    shutil.copytree(tiny_runs.done, other)
    capsys.readouterr()
    again = spectrum.main([str(tiny_runs.done), str(other)] + flags)
    assert "ssesam-seed0: already in" in capsys.readouterr().out
    assert again["runs"]["ssesam-seed0"] == run and set(again["runs"]) == {"sgd-seed0", "ssesam-seed0"}
    # a damaged spectrum.json: one line, exit 2, left as it is
    for damaged in ("{not json", (tmp_path / "spectrum.json").read_text().replace('"outlier"', '"outlie"', 1)):
        (tmp_path / "spectrum.json").write_text(damaged)  # not JSON; a Hessian without its outlier flag
        assert "is damaged" in expect_exit(spectrum.main, [str(other)] + flags, 2, capsys)
        assert (tmp_path / "spectrum.json").read_text() == damaged


def test_spectrum_tables_put_classes_beside_each_other_and_name_outliers_and_unsettled_hessians():
    spectrum = importlib.import_module("spectrum")

    def h(lam_min, lam_max, next_=None, steps=20, residual=0.001, outlier=False, **more):
        return {"lambda_min": lam_min, "lambda_max": lam_max, "ratio": lam_min / lam_max, "steps": steps,
                "residual_min": residual, "residual_max": 0.01, "outlier": outlier,
                "nodes": [lam_min, lam_min / 2 if next_ is None else next_, lam_max], "weights": [0.1, 0.8, 0.1],
                **more}
    runs = {"sam-seed0": {"groups": {"head": h(-0.5, 50.0), "tail": h(-1.0, 200.0, steps=30)},
                          "classes": {"99": h(-6.0, 30.0, next_=-1.0, outlier=True, count=5, group="tail"),
                                      "0": h(-0.2, 40.0, residual=1.0, steps=40, count=500, group="head")}},
            "sgd-seed0": {"groups": {"head": h(-0.4, 60.0, steps=10), "tail": None},
                          "classes": {"99": h(-3.0, 30.0, count=5, group="tail"),
                                      "0": h(-0.1, 40.0, count=500, group="head")}}}
    report = {"runs": {n: {"settings": {"tol": 0.05}, "result": r} for n, r in runs.items()}}
    groups, classes, reading = spectrum.tables(report)
    assert groups.splitlines()[2:] == ["| sgd-seed0 | head | 10 | -0.400 (± 0.001) | 60.0 | -0.0067 | no |",
                                       "| sam-seed0 | head | 20 | -0.500 (± 0.001) | 50.0 | -0.0100 | no |",
                                       "| sam-seed0 | tail | 30 | -1.000 (± 0.001) | 200.0 | -0.0050 | no |"]
    assert classes.splitlines() == ["| class | n | group | sgd-seed0 | sam-seed0 |", "|---|---|---|---|---|",
                                    "| 99 | 5 | tail | -0.1000 (-3.00 / 30) | -0.2000 (-6.00 / 30) ▼ |",
                                    "| 0 | 500 | head | -0.0025 (-0.10 / 40) | -0.0050 (-0.20 / 40) |"]
    lines = reading.splitlines()
    # sam's class 0: residual bound 1.0 over 5 % of |-0.2|
    assert lines[0] == "- Steps: 10 to 40 Lanczos steps (median 20) per Hessian, 7 Hessians; 1 did not settle to " \
                       "the tolerance: sam-seed0 class 0."
    assert lines[1].endswith(": sam-seed0 class 99 (-6.00, next -1.00).")
    assert lines[2].startswith("- The most negative λ_min: -6.00 (sam-seed0, class 99, λ_max 30.0).")
    assert lines[3:] == ["- sgd-seed0: tail classes' ratios -0.1000 to -0.1000; head classes' ratios -0.0025 to "
                         "-0.0025; groups: head -0.0067.",
                         "- sam-seed0: tail classes' ratios -0.2000 to -0.2000; head classes' ratios -0.0050 to "
                         "-0.0050; groups: head -0.0100, tail -0.0050."]


# what saddle.py and evaluate.py (which loads runs with saddle.py's load_run) refuse, and the words
LOAD_DAMAGES = [("no model", "has no model.pt"), ("bad model", "not a readable model.pt"),
                ("other network", "not the weights of a resnet8"), ("in progress", "holds no finished run")]


def damaged_run(damage, tiny_runs, tmp_path):
    """The folder to pass: a copy of the tiny finished run with one of LOAD_DAMAGES (None: intact)."""
    if damage == "in progress":
        return tiny_runs.running
    run = tmp_path / "runs" / "ssesam-seed0"
    shutil.copytree(tiny_runs.done, run)
    if damage == "no model":
        os.remove(run / "model.pt")
    elif damage == "bad model":
        (run / "model.pt").write_bytes(b"garbage")
    elif damage == "other network":
        torch.save(sm.build_model("resnet14", 10).state_dict(), run / "model.pt")
    return run


@pytest.mark.parametrize("damage,needle", LOAD_DAMAGES)
def test_saddle_bad_input_exits_2_with_one_line_and_writes_nothing(damage, needle, tiny_runs, saddle, tmp_path,
                                                                 capsys):
    folder = damaged_run(damage, tiny_runs, tmp_path)
    with pytest.raises(SystemExit) as exc:
        saddle.main([str(folder), "--images", "4", "--steps", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "saddle.json").exists() and not (tmp_path / "saddle.png").exists()


# =============================================================================================
# evaluate.py: the saved weights give the run's numbers again
# =============================================================================================

@pytest.fixture
def evaluate_py():
    return importlib.import_module("evaluate")


def test_evaluate_gives_the_final_numbers_of_summary_json_again_from_model_pt(tiny_runs, evaluate_py, tmp_path,
                                                                             capsys, monkeypatch):
    final = {k: tiny_runs.summary["final"][k] for k in evaluate_py.KEYS}
    result = evaluate_py.main([str(tiny_runs.done)])["ssesam-seed0"]
    assert result["fp32"] == final and result["same"] and set(result) == {"precision", "final", "same", "fp32"}
    assert "ssesam-seed0 (fp32, as trained): " in capsys.readouterr().out
    # a bf16 run: evaluated through the loop's bf16 forward, compared with its final, then in fp32
    run = tmp_path / "runs" / "sgd-seed0"
    shutil.copytree(tiny_runs.done, run)
    forwards = []

    class Spy(sm.Bf16Forward):
        def forward(self, x):
            forwards.append(x.shape[0])
            return super().forward(x)

    monkeypatch.setattr(sm, "Bf16Forward", Spy)
    net = sm.build_model("resnet8", 10).to(memory_format=torch.channels_last)
    net.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    _, _, xt, yt, counts, n_max = sm.load_data("synthetic", imb_factor=10.0)
    bf16 = sm.evaluate(Spy(net), xt, yt, counts, n_max)
    summary = {**tiny_runs.summary, "precision": "bf16", "final": {"epoch": 4, **bf16}}
    (run / "summary.json").write_text(json.dumps(summary))
    forwards.clear()
    result = evaluate_py.main([str(run.parent)])["sgd-seed0"]
    assert result["bf16"] == bf16 and result["fp32"] == final and result["same"]
    assert sum(forwards) == 2 * len(yt)  # each test image and its mirror, once, through the bf16 forward
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith("sgd-seed0 (bf16, as trained): ") and text[0].endswith("equal to summary.json's final")
    assert text[1].startswith("sgd-seed0 (fp32): avg ")
    # evaluated at the run's thread count (a bf16 sum splits by thread), the caller's given back
    before, seen = torch.get_num_threads(), []
    (run / "summary.json").write_text(json.dumps({**summary, "threads": before + 2}))
    evaluate = sm.evaluate
    monkeypatch.setattr(sm, "evaluate", lambda *a, **k: seen.append(torch.get_num_threads()) or evaluate(*a, **k))
    evaluate_py.main([str(run)])
    assert seen == [before + 2] * 2 and torch.get_num_threads() == before
    monkeypatch.setattr(sm, "evaluate", evaluate)
    capsys.readouterr()
    # a final that the weights do not give: exit code 1, and by how much
    summary["final"]["avg"] += 1.5
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit) as exc:
        evaluate_py.main([str(run)])
    assert exc.value.code == 1 and "differs from summary.json's final, by up to 1.5 points" in capsys.readouterr().out


@pytest.mark.parametrize("damage,needle", LOAD_DAMAGES + [
    ("no final", "has no final numbers"), ("bad device", "--device gpu: expected auto, cpu, cuda or cuda:N")])
def test_evaluate_bad_input_exits_2_with_one_line(damage, needle, tiny_runs, evaluate_py, tmp_path, capsys):
    run = damaged_run(damage if damage in dict(LOAD_DAMAGES) else None, tiny_runs, tmp_path)
    args = [str(run)]
    if damage == "no final":
        (run / "summary.json").write_text(json.dumps({"config": tiny_runs.summary["config"]}))
    elif damage == "bad device":
        args += ["--device", "gpu"]
    with pytest.raises(SystemExit) as exc:
        evaluate_py.main(args)
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert exc.value.code == 2 and len(err) == 1 and needle in err[0] and captured.out == "", err
