"""Tests for ssesam_minimal.py: its specification, in the module's section order.

Each test re-derives its result the obvious way (a per-parameter loop, a closed form, a count by
hand, a published list, the seed README's own snippet) and compares; its name states the property.
The design's two named checks come first: the perturbation ε = ρ·g/‖g‖ and the stage switch. Then
long-tailed CIFAR, augmentation, networks, losses, the method (the block meant for copying),
evaluation, training (with last.pt and resume), the command line, the README's
own-loop example and the notebook. scripts/ has its own tests.

CPU only, no network, no real CIFAR: CIFAR files are written small, in the real pickle layout, into
temporary folders. Runs through main() use the synthetic set at 40 images per class instead of 200
(`small_synthetic`), and the resume tests share one straight reference run.
"""

import ast
import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import typing
import warnings
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms

import ssesam_minimal as sm

REPO = os.path.dirname(os.path.abspath(sm.__file__))

# Published constants (LDAM-DRW / SSE-SAM papers and the official code).
CIFAR100_IF100 = [500, 477, 455, 434, 415, 396, 378, 361, 344, 328, 314, 299, 286, 273, 260, 248,
                  237, 226, 216, 206, 197, 188, 179, 171, 163, 156, 149, 142, 135, 129, 123, 118,
                  112, 107, 102, 98, 93, 89, 85, 81, 77, 74, 70, 67, 64, 61, 58, 56, 53, 51, 48, 46,
                  44, 42, 40, 38, 36, 35, 33, 32, 30, 29, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18,
                  17, 16, 15, 15, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 7, 6, 6, 6,
                  6, 5, 5, 5, 5]
CIFAR10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
OFFICIAL_MEAN = (0.4914, 0.4822, 0.4465)
OFFICIAL_STD = (0.2023, 0.1994, 0.2010)

# The seed README's SSESAM usage snippet, verbatim: the module's SSESAM must run it unchanged.
SEED_SNIPPET = """
if optim_mode == 'ssesam':
    # Identify tail samples using their class labels
    tail_mask = torch.where((targets[:, None] == tail_classes[None, :].to(targets.device)).sum(1) == 1, True, False)

    # Compute and backpropagate head loss
    logits = model(images)
    head_loss = lossFunc(logits[~tail_mask], targets[~tail_mask]).sum() / targets.size(0)
    head_loss.backward(retain_graph=True)
    optimizer.compute_and_add_epsilon(n_i=0)  # Perturb for head classes

    # Recompute logits for head classes and calculate updated gradients
    logits = model(images)
    head_loss = lossFunc(logits[~tail_mask], targets[~tail_mask]).sum() / targets.size(0)
    head_loss.backward(retain_graph=True)
    optimizer.compute_grad_sum_and_restore_p()  # Accumulate and restore head gradients

    # Compute and backpropagate tail loss
    logits = model(images)
    tail_loss = lossFunc(logits[tail_mask], targets[tail_mask]).sum() / targets.size(0)
    tail_loss.backward(retain_graph=True)
    optimizer.compute_and_add_epsilon(n_i=1)  # Perturb for tail classes

    # Recompute logits for tail classes and calculate updated gradients
    logits = model(images)
    tail_loss = lossFunc(logits[tail_mask], targets[tail_mask]).sum() / targets.size(0)
    tail_loss.backward(retain_graph=True)
    optimizer.compute_grad_sum_and_restore_p()  # Accumulate and restore tail gradients

    # Update model parameters
    optimizer.update()

    # Combine head and tail losses
    loss = head_loss + tail_loss
"""


# =============================================================================================
# Fixtures and helpers
# =============================================================================================

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every download fails as it does on a machine without network, after making its folder and a
    partial archive, as torchvision's download does; calls are recorded."""
    calls = []

    def refuse(url, download_root, filename, md5):
        calls.append(url)
        os.makedirs(download_root, exist_ok=True)
        with open(os.path.join(download_root, filename), "wb") as fh:
            fh.write(b"the first bytes of an archive")
        raise OSError("no network")

    monkeypatch.setattr(sm.torchvision.datasets.utils, "download_and_extract_archive", refuse)
    return calls


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Train with one intra-op thread: ResNet-8 on 32 x 32 images gains little from a second, and
    on a busy 2-core machine two OpenMP threads were measured ~10x slower than one. Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


N_MAX = 40  # synthetic training images per class in the runs (the module's 200, cut for speed)


def small_synthetic(dataset, imb_factor):
    """sm.data_counts for the synthetic set with n_max 40: load_data then makes 40 images per class."""
    assert dataset == "synthetic"
    counts = sm.lt_class_counts(N_MAX, 10, imb_factor)
    assert min(counts) >= 1
    return counts, N_MAX


def expect_usage_exit(argv, capsys):
    """sm.main(argv) must exit with code 2 and print exactly one line on stderr, starting
    'ssesam_minimal.py: error: ', and no traceback. Returns the line."""
    with pytest.raises(SystemExit) as exc:
        sm.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssesam_minimal.py: error: "), err
    return lines[0]


# A tiny problem for the optimizer tests: ResNet-8 on 8 x 8 images (the network pools globally),
# float64 where results are compared to a re-derivation, 10 classes of which 6..9 are tail.
C = 10
COUNTS = [200, 154, 119, 92, 71, 55, 42, 33, 25, 20]  # synthetic IF 10; tail (n < 50) = classes 6..9
ETA = 50
TAIL_CLASSES = torch.tensor([c for c, n in enumerate(COUNTS) if n < ETA])


def tiny_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return sm.CifarResNet(8, C).to(dtype)


def batch(seed=1, B=16, dtype=torch.float64, labels=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g) if labels is None else torch.as_tensor(labels)
    return x, y


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def make_opt(name, model, epochs_done=0, imbsam_weight="group", ns=sm):
    """The optimizer of each step on plain SGD: rho 0.05; SSE-SAM 0.05 / 0.10, switch after 1 of 2.
    ns: where SAM, ImbSAM and SSESAM come from (the module, or the method block copied alone)."""
    if name == "sgd":
        return sgd(model)
    if name == "sam":
        return ns.SAM(sgd(model), model, 0.05)
    if name == "imbsam":
        return ns.ImbSAM(sgd(model), model, 0.05, imbsam_weight)
    opt = ns.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.5, total_epochs=2)
    for _ in range(epochs_done):
        opt.update_rho()
    return opt


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def grads_at(model, loss_fn):
    """Plain autograd: the gradient of loss_fn(model) in every parameter, as a list."""
    return list(torch.autograd.grad(loss_fn(model), list(model.parameters())))


def naive_eps(grads, rho):
    """ε = ρ g / (‖g‖ + 1e-16), ‖g‖ over all parameters, as a per-parameter Python loop."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    return [rho * g / (norm + 1e-16) for g in grads]


def shifted(model, eps):
    """A copy of model at w + ε."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(m.parameters(), eps):
            p.add_(e)
    return m


def ce_sum(model, x, y, mask, denominator):
    """Σ_{i in mask} CE_i / denominator, the group loss written out."""
    return F.cross_entropy(model(x)[mask], y[mask], reduction="sum") / denominator


def sgd_update(model, G, lr=0.1, wd=1e-3):
    """The first SGD step from w with gradient G (momentum buffer = G): w - lr (G + wd w), flat."""
    return torch.cat([(p.detach() - lr * (g + wd * p.detach())).reshape(-1)
                      for p, g in zip(model.parameters(), G)])


def method_block():
    """The text between the module's '# ---- copy from here' and '# ---- copy to here' lines."""
    with open(sm.__file__, encoding="utf-8") as fh:
        lines = fh.read().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if "copy from here" in line)
    end = next(i for i, line in enumerate(lines) if "copy to here" in line)
    return "".join(lines[start + 1:end])


def readme_example():
    """The README's one Python block: SSE-SAM in your own training loop."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        (example,) = re.findall(r"```python\n(.*?)```", fh.read(), re.S)
    return example


def run_example(code):
    """exec code from the same global seed (the README example draws its weights and its batch
    order from it), with every warning an error (a scheduler that missed the optimizer's steps
    warns); returns its namespace and what it printed."""
    torch.manual_seed(0)
    scope, stdout = {}, io.StringIO()
    with contextlib.redirect_stdout(stdout), warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(code, scope)
    return scope, stdout.getvalue()


@pytest.fixture(scope="module")
def readme_example_run(one_torch_thread):
    """The README's own-loop example, run as written (ResNet-32, 2 epochs; the slowest test setup)."""
    scope, printed = run_example(readme_example())
    return SimpleNamespace(scope=scope, printed=printed,
                           state={k: v.clone() for k, v in scope["model"].state_dict().items()})


# =============================================================================================
# 1. The perturbation: ε = ρ·g/‖g‖ per group, restored bit for bit
# =============================================================================================

@pytest.mark.parametrize("kind", ["sam", "imbsam-tail", "ssesam-head", "ssesam-tail"])
def test_climb_moves_w_by_rho_g_over_norm_g_as_a_per_parameter_loop_computes_it(kind):
    model = tiny_model()
    x, y = batch()
    tail = torch.isin(y, TAIL_CLASSES)
    assert 0 < int(tail.sum()) < len(y)  # both groups present: their gradients differ
    w0 = [p.detach().clone() for p in model.parameters()]
    if kind == "sam":  # g = ∇L(w), the batch mean
        opt, rho = sm.SAM(sgd(model), model, rho=0.05), 0.05
        F.cross_entropy(model(x), y).backward()
    elif kind == "imbsam-tail":  # g = ∇L_tail(w)
        opt, rho = sm.ImbSAM(sgd(model), model, rho=0.07), 0.07
        ce_sum(model, x, y, tail, len(y)).backward()
    else:  # g = ∇L_head(w) or ∇L_tail(w), each with its own ρ
        opt = sm.SSESAM(sgd(model), model, head_rho=0.05, tail_rho=0.1, gamma=0.7, total_epochs=10)
        rho = 0.05 if kind == "ssesam-head" else 0.1
        ce_sum(model, x, y, ~tail if kind == "ssesam-head" else tail, len(y)).backward()
    want = naive_eps([p.grad.clone() for p in model.parameters()], rho)
    if kind == "sam":
        opt.first_step()
    elif kind == "imbsam-tail":
        opt.second_step()
    else:
        opt.compute_and_add_epsilon(n_i=sm.HEAD if kind == "ssesam-head" else sm.TAIL)
    eps = [p.detach() - w for p, w in zip(model.parameters(), w0)]
    assert abs(math.sqrt(sum(float((e * e).sum()) for e in eps)) - rho) < 1e-12  # ‖ε‖ = ρ
    for e, e_want in zip(eps, want):
        assert torch.allclose(e, e_want, rtol=1e-10, atol=1e-15)
    assert all((p.grad == 0).all() for p in model.parameters())  # the pass at w + ε starts from 0


@pytest.mark.parametrize("name", ["sam", "imbsam", "ssesam"])
def test_a_step_at_lr_0_gives_back_w_bit_for_bit_because_the_climb_is_undone_by_a_copy(name):
    model = tiny_model(torch.float32)
    x, y = batch(dtype=torch.float32)
    w0 = [p.detach().clone() for p in model.parameters()]
    # precondition: in float32, w + ε - ε is not w here, so undoing ε by subtraction would fail
    eps = naive_eps(grads_at(model, lambda m: F.cross_entropy(m(x), y)), 0.05)
    assert any(not torch.equal(w + e - e, w) for w, e in zip(w0, eps))
    base = torch.optim.SGD(model.parameters(), lr=0.0)
    opt = {"sam": lambda: sm.SAM(base, model, 0.05), "imbsam": lambda: sm.ImbSAM(base, model, 0.05),
           "ssesam": lambda: sm.SSESAM(base, model, 0.05, 0.1, gamma=0.5, total_epochs=2)}[name]()
    sm.STEPS[name](model, sm.LongTailLoss("CE", COUNTS), opt, x, y, torch.isin(y, TAIL_CLASSES))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


def test_a_zero_gradient_gives_eps_0_not_nan():
    model = tiny_model()
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.5, total_epochs=4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w0 = flat(model).clone()
    opt.compute_and_add_epsilon(sm.HEAD)  # 0 / (0 + 1e-16) = 0, where 0 / 0 would be NaN
    assert torch.equal(flat(model), w0)


# =============================================================================================
# 2. The stage switch: ρ_head = 0 once ⌈γT⌉ epochs are done
# =============================================================================================

SWITCH = [  # (γ, T, ⌈γT⌉ by hand): epochs 1..⌈γT⌉ perturb the head, the later ones do not
    (0.7, 200, 140),   # the paper's setting
    (0.7, 10, 7),      # as checked on the official code: 0.05 after 1-6 update_rho() calls, 0 after 7
    (0.07, 100, 7),    # 0.07 * 100 = 7.000000000000001 in floating point
    (0.55, 200, 110),  # 0.55 * 200 = 110.00000000000001
    (0.14, 50, 7),     # 7.000000000000001
    (0.29, 100, 29),   # 28.999999999999996
    (0.33, 7, 3),      # 2.31
    (0.5, 3, 2),       # 1.5
    (0.99, 3, 3),      # 2.97
    (0.0, 5, 0),       # γ 0: ImbSAM from the first step (the official code crashes here)
]


@pytest.mark.parametrize("gamma,T,cut", SWITCH)
def test_rho_head_is_0_iff_at_least_ceil_gamma_T_epochs_are_done(gamma, T, cut):
    assert cut == math.ceil(Fraction(str(gamma)) * T)  # the hand-written column, in exact arithmetic
    model = nn.Linear(2, 2)
    opt = sm.SSESAM(torch.optim.SGD(model.parameters(), lr=0.1), model, head_rho=0.05, tail_rho=0.1,
                    gamma=gamma, total_epochs=T)
    for k in range(T + 2):  # k epochs done; ρ_tail never changes
        want = (0.0 if k >= cut else 0.05, 0.1)
        assert (opt.head_rho, opt.tail_rho) == want and opt.rhos == want, k
        opt.update_rho()


def test_the_switch_and_the_momentum_survive_a_state_dict_round_trip():
    model = tiny_model(torch.float32)
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.5, total_epochs=4)
    x, y = batch(dtype=torch.float32)
    sm.ssesam_step(model, sm.LongTailLoss("CE", COUNTS), opt, x, y, torch.isin(y, TAIL_CLASSES))
    opt.update_rho()
    opt.update_rho()  # 2 = ⌈0.5 · 4⌉ epochs done: ρ_head = 0 from here on
    twin = copy.deepcopy(model)
    twin_opt = sm.SSESAM(sgd(twin), twin, 0.05, 0.1, gamma=0.5, total_epochs=4)
    assert twin_opt.rhos == (0.05, 0.1)
    state = opt.state_dict()  # last.pt's format: the base optimizer's state_dict and SSE-SAM's k
    assert state.keys() == {"base", "k"} and state["base"].keys() == {"state", "param_groups"}
    twin_opt.load_state_dict(copy.deepcopy(state))
    assert twin_opt.k == 2 and twin_opt.rhos == (0.0, 0.1)
    # still one set of groups: an lr set on the wrapper (as a schedule does) is the base step's
    assert twin_opt.param_groups is twin_opt.optimizer.param_groups
    assert twin_opt.state is twin_opt.optimizer.state
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(twin_opt.optimizer.state[q]["momentum_buffer"],
                           opt.optimizer.state[p]["momentum_buffer"])


# =============================================================================================
# 3. Long-tailed CIFAR
# =============================================================================================

def exact_floor_counts(n_max, num_classes, imb_factor):
    """⌊n_max / IF^(i/(C-1))⌋ in exact arithmetic: the largest n with n^(C-1) IF^i <= n_max^(C-1),
    found by bisection."""
    C, IF = num_classes, Fraction(imb_factor)
    out = []
    for i in range(C):
        bound = Fraction(n_max) ** (C - 1)
        lo, hi = 0, n_max  # invariant: lo satisfies, hi + 1 does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if Fraction(mid) ** (C - 1) * IF ** i <= bound:
                lo = mid
            else:
                hi = mid - 1
        out.append(lo)
    return out


def test_cifar100_if100_counts_are_the_published_list_totalling_10847():
    counts, n_max = sm.data_counts("cifar100", 100.0)  # a float, as the command line parses it
    assert (counts, n_max) == (CIFAR100_IF100, 500) and sum(counts) == 10847


def test_cifar10_if100_counts_are_the_published_list_totalling_12406():
    counts, n_max = sm.data_counts("cifar10", 100.0)
    assert (counts, n_max) == (CIFAR10_IF100, 5000) and sum(counts) == 12406


@pytest.mark.parametrize("n_max,num_classes", [(5000, 10), (500, 100), (200, 10)])
@pytest.mark.parametrize("imb_factor", [1.0, 10.0, 12.5, 50.0, 100.0, 200.0])
def test_lt_class_counts_are_the_exact_floor_and_ldam_drws_reciprocal_counts(n_max, num_classes,
                                                                            imb_factor):
    got = sm.lt_class_counts(n_max, num_classes, imb_factor)
    assert got == exact_floor_counts(n_max, num_classes, imb_factor)
    # LDAM-DRW writes the same counts as n_max * (1 / IF)^(i / (C - 1))
    assert got == [int(n_max * (1 / imb_factor) ** (i / (num_classes - 1))) for i in range(num_classes)]


def first_n_per_class(labels, counts):
    """The first counts[c] indices of each class c in file order, class by class."""
    out = []
    for c, n in enumerate(counts):
        taken = []
        for i, label in enumerate(labels):
            if label == c and len(taken) < n:
                taken.append(i)
        out.extend(taken)
    return np.array(out, dtype=np.int64)


def ldam_subset(labels, counts, seed):
    """LDAM-DRW's IMBALANCECIFAR: np.random.seed(s); per class: np.where, shuffle, the first n."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        out = []
        for c, n in enumerate(counts):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            out.append(idx[:n])
        return np.concatenate(out)
    finally:
        np.random.set_state(state)


def write_pickle(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def random_rows(rng, n):
    """n CIFAR rows: uint8 (n, 3072), 1024 red, then green, then blue values, each row-major 32x32."""
    return rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)


def write_cifar(root, dataset, labels, rows, test_labels, test_rows):
    """The files of the official archive, in its layout: cifar-10-batches-py/data_batch_1..5,
    test_batch, batches.meta, or cifar-100-python/train, test, meta."""
    if dataset == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        for k, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
            write_pickle(os.path.join(folder, f"data_batch_{k}"), {
                "batch_label": f"training batch {k} of 5", "labels": [int(v) for v in labels[part]],
                "data": rows[part], "filenames": [f"img_{i}.png" for i in part]})
        write_pickle(os.path.join(folder, "test_batch"), {
            "batch_label": "testing batch 1 of 1", "labels": [int(v) for v in test_labels],
            "data": test_rows, "filenames": [f"t_{i}.png" for i in range(len(test_labels))]})
        write_pickle(os.path.join(folder, "batches.meta"),
                     {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 10000,
                      "num_vis": 3072})
        return
    folder = os.path.join(root, "cifar-100-python")
    for name, data, ys in (("train", rows, labels), ("test", test_rows, test_labels)):
        write_pickle(os.path.join(folder, name), {
            "filenames": [f"img_{i}.png" for i in range(len(ys))], "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": [int(v) for v in ys], "coarse_labels": [int(v) // 5 for v in ys], "data": data})
    write_pickle(os.path.join(folder, "meta"), {"fine_label_names": [f"fine{i}" for i in range(100)],
                                                "coarse_label_names": [f"coarse{i}" for i in range(20)]})


def small_cifar(root, dataset, monkeypatch, extra=3, short_class=None):
    """A CIFAR folder whose train pool holds, per class, its long-tailed count plus `extra` images,
    classes interleaved at random (class `short_class`: its count minus one). sm.data_counts is cut
    to small counts (CIFAR-10: n_max 30, CIFAR-100: 6, IF 10 and 6), so the files stay small."""
    num_classes, n_max, imb = (10, 30, 10) if dataset == "cifar10" else (100, 6, 6)
    counts = sm.lt_class_counts(n_max, num_classes, imb)
    monkeypatch.setattr(sm, "data_counts", lambda dataset, imb_factor: (counts, n_max))
    per_class = [n + extra for n in counts]
    if short_class is not None:
        per_class[short_class] = counts[short_class] - 1
    rng = np.random.RandomState(num_classes)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    test_labels = np.tile(np.arange(num_classes), 2)
    pool = SimpleNamespace(root=str(root), counts=counts, n_max=n_max, labels=labels,
                           rows=random_rows(rng, len(labels)), test_labels=test_labels,
                           test_rows=random_rows(rng, len(test_labels)))
    write_cifar(pool.root, dataset, pool.labels, pool.rows, pool.test_labels, pool.test_rows)
    return pool


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_load_data_reads_the_cifar_files_pixel_for_pixel_and_takes_each_class_first_n_in_file_order(
        dataset, tmp_path, monkeypatch):
    p = small_cifar(tmp_path, dataset, monkeypatch)
    x, y, xt, yt, counts, n_max = sm.load_data(dataset, p.root, 100.0)
    assert (counts, n_max) == (p.counts, p.n_max)
    idx = first_n_per_class(list(p.labels), counts)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(p.labels[idx]))
    # CIFAR's layout: a plane of 1024 values per channel, each row-major 32 x 32
    for k in range(0, len(idx), 7):
        for ch, r, col in ((0, 0, 0), (1, 5, 31), (2, 31, 7), (0, 17, 3)):
            assert x[k, ch, r, col].item() == p.rows[idx[k]][ch * 1024 + r * 32 + col]
    assert torch.equal(x, torch.from_numpy(p.rows[idx].reshape(-1, 3, 32, 32)))
    assert torch.equal(xt, torch.from_numpy(p.test_rows.reshape(-1, 3, 32, 32)))  # the whole test set
    assert torch.equal(yt, torch.from_numpy(p.test_labels))


@pytest.mark.parametrize("seed", [0, 9826])
def test_load_data_with_a_subset_seed_takes_the_images_ldam_drw_takes(seed, tmp_path, monkeypatch):
    p = small_cifar(tmp_path, "cifar10", monkeypatch)
    x, y, *_ = sm.load_data("cifar10", p.root, 100.0, subset_seed=seed)
    idx = ldam_subset(p.labels, p.counts, seed)
    assert not np.array_equal(idx, first_n_per_class(list(p.labels), p.counts))  # not the file order
    assert torch.equal(x, torch.from_numpy(p.rows[idx].reshape(-1, 3, 32, 32)))
    assert torch.equal(y, torch.from_numpy(p.labels[idx]))


def test_lt_indices_leaves_the_global_numpy_generator_alone():
    labels = np.repeat(np.arange(10), 5)
    state = np.random.get_state()
    try:
        np.random.seed(123)
        expected = np.random.rand()
        np.random.seed(123)
        sm.lt_indices(labels, [5, 4, 3, 2, 1, 1, 1, 1, 1, 1], subset_seed=5)
        assert np.random.rand() == expected
    finally:
        np.random.set_state(state)


def test_load_data_never_downloads_when_the_files_are_there(tmp_path, monkeypatch, no_network):
    p = small_cifar(tmp_path, "cifar100", monkeypatch)
    sm.load_data("cifar100", p.root, 100.0)
    assert no_network == []


def test_a_class_with_too_few_training_images_exits_2_with_one_line_naming_it(tmp_path, monkeypatch,
                                                                             capsys):
    p = small_cifar(tmp_path / "data", "cifar100", monkeypatch, extra=0, short_class=3)
    out = tmp_path / "out"
    line = expect_usage_exit(["--dataset", "cifar100", "--data_dir", p.root, "--out", str(out)], capsys)
    n = p.counts[3]
    assert re.search(rf"\bclass 3 has {n - 1} training images\b.*\basks for {n}\b", line), line
    assert not out.exists()


def _valid_c100_dict(n_images):
    rng = np.random.RandomState(0)
    return {"data": random_rows(rng, n_images), "fine_labels": [i % 100 for i in range(n_images)],
            "coarse_labels": [0] * n_images, "filenames": ["x"] * n_images, "batch_label": "b"}


CORRUPT_TRAIN = {
    "garbage_bytes": lambda: b"this is not a pickle file at all\n" * 10,
    "empty_file": lambda: b"",
    "truncated": lambda: pickle.dumps(_valid_c100_dict(200), protocol=2)[:5000],
    "not_a_dict": lambda: pickle.dumps([1, 2, 3], protocol=2),
    "no_label_key": lambda: pickle.dumps({"data": _valid_c100_dict(10)["data"]}, protocol=2),
    "rows_not_3072": lambda: pickle.dumps({"data": np.zeros((10, 3000), np.uint8),
                                           "fine_labels": list(range(10))}, protocol=2),
    # a pickle naming a class that does not exist here (ModuleNotFoundError when loaded)
    "unknown_module": lambda: b"cno_such_module_for_ssesam_tests\nThing\n.",
    "labels_longer_than_data": lambda: pickle.dumps({"data": np.zeros((10, 3072), np.uint8),
                                                     "fine_labels": list(range(20))}, protocol=2),
    "label_out_of_range": lambda: pickle.dumps({"data": np.zeros((10, 3072), np.uint8),
                                                "fine_labels": [0] * 9 + [100]}, protocol=2),
}


@pytest.mark.parametrize("kind", list(CORRUPT_TRAIN))
def test_a_corrupt_train_file_exits_2_with_one_line_naming_it(kind, tmp_path, capsys):
    root = tmp_path / "data"
    valid = _valid_c100_dict(100)
    write_cifar(str(root), "cifar100", np.array(valid["fine_labels"]), valid["data"],
                np.array(valid["fine_labels"]), valid["data"])
    train = root / "cifar-100-python" / "train"
    train.write_bytes(CORRUPT_TRAIN[kind]())
    out = tmp_path / "out"
    line = expect_usage_exit(["--dataset", "cifar100", "--data_dir", str(root), "--out", str(out)], capsys)
    assert f"{train} is not a readable CIFAR python file" in line, line
    assert not out.exists()


@pytest.mark.parametrize("dataset,folder,archive", [
    ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
    ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz")])
def test_missing_cifar_without_network_exits_2_naming_folder_and_archive_and_leaves_nothing(
        dataset, folder, archive, tmp_path, capsys, no_network):
    data, out = tmp_path / "data", tmp_path / "out"
    line = expect_usage_exit(["--dataset", dataset, "--data_dir", str(data), "--out", str(out)], capsys)
    assert len(no_network) == 1  # it tried, once
    assert str(data) in line and archive in line and folder in line, line
    assert os.listdir(tmp_path) == []  # the folder and the partial archive the download made are gone


# =============================================================================================
# 4. Augmentation
# =============================================================================================

def reference_crop(x, dy, dx, flip):
    """RandomCrop(32, padding=4) at a fixed offset, then an optional mirror: pad, slice, flip."""
    c = F.pad(x, (4, 4, 4, 4))[..., dy:dy + 32, dx:dx + 32]
    return c.flip(-1) if flip else c


def test_crop_flip_equals_pad_slice_flip_for_all_162_offsets_and_flips():
    g = torch.Generator().manual_seed(0)
    combos = [(dy, dx, fl) for dy in range(9) for dx in range(9) for fl in (False, True)]
    x = torch.randint(0, 256, (len(combos), 3, 32, 32), generator=g, dtype=torch.uint8)
    got = sm.crop_flip(F.pad(x, (4,) * 4), torch.tensor([c[0] for c in combos]),
                       torch.tensor([c[1] for c in combos]), torch.tensor([c[2] for c in combos]))
    assert got.shape == x.shape and got.dtype == torch.uint8
    for n, (dy, dx, fl) in enumerate(combos):
        assert torch.equal(got[n], reference_crop(x[n], dy, dx, fl)), (dy, dx, fl)


def test_random_crop_flip_draws_every_one_of_the_162_crops_of_its_own_image_and_nothing_else():
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    crops = [{reference_crop(img, dy, dx, fl).numpy().tobytes(): (dy, dx, fl)
              for dy in range(9) for dx in range(9) for fl in (False, True)} for img in imgs]
    assert all(len(c) == 162 for c in crops)  # random pixels: the 162 crops are distinct
    x = imgs.repeat(2000, 1, 1, 1)  # image 0, image 1, image 0, ...
    out = sm.random_crop_flip(F.pad(x, (4,) * 4), generator=torch.Generator().manual_seed(2))
    seen = [crops[n % 2].get(o.numpy().tobytes()) for n, o in enumerate(out)]
    assert None not in seen                          # each a crop of its own image
    assert set(seen) == set(crops[0].values())       # and every crop drawn


def test_shuffled_epoch_uses_each_image_once_with_its_own_label():
    N = 200
    ids = torch.arange(N, dtype=torch.uint8)
    x = ids.view(N, 1, 1, 1).expand(N, 3, 32, 32).contiguous()  # image n: every pixel n
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(3))
    xs, ys = sm.shuffled_epoch(F.pad(x, (4,) * 4), y, generator=torch.Generator().manual_seed(4))
    std, mean = torch.tensor(OFFICIAL_STD), torch.tensor(OFFICIAL_MEAN)
    # pixel (16, 16) lies inside the image for every offset; undo the normalisation to read n
    seen = ((xs[:, :, 16, 16] * std + mean) * 255).round().long()
    assert (seen == seen[:, :1]).all()
    seen = seen[:, 0]
    assert sorted(seen.tolist()) == list(range(N)) and seen.tolist() != list(range(N))  # permuted
    assert torch.equal(ys, y[seen])


def test_normalize_equals_torchvision_totensor_then_normalize_with_the_official_constants():
    assert tuple(sm.MEAN) == OFFICIAL_MEAN and tuple(sm.STD) == OFFICIAL_STD
    T = torchvision.transforms
    tf = T.Compose([T.ToTensor(), T.Normalize(OFFICIAL_MEAN, OFFICIAL_STD)])
    hwc = np.random.RandomState(5).randint(0, 256, size=(5, 32, 32, 3)).astype(np.uint8)
    hwc[0], hwc[1] = 0, 255
    expected = torch.stack([tf(im) for im in hwc])
    got = sm.normalize(torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# =============================================================================================
# 5. Networks
# =============================================================================================

def cifar_resnet_param_count(depth, num_classes):
    """Counted by hand: 3x3 convs without bias, BN (γ, β), option-A shortcuts, fc with bias."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + bn
    in_planes = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            total += in_planes * planes * 9 + planes * planes * 9 + 2 * 2 * planes
            in_planes = planes
    return total + 64 * num_classes + num_classes


def test_resnet32_has_the_published_0_47m_parameters_as_counted_by_hand():
    for num_classes, published in ((100, 0.470e6), (10, 0.464e6)):
        n = sum(p.numel() for p in sm.resnet32(num_classes).parameters())
        assert n == cifar_resnet_param_count(32, num_classes)
        assert abs(n - published) < 0.5e3  # LDAM-DRW: 0.47 M / 0.46 M
    for depth in (8, 20, 56):
        assert sum(p.numel() for p in sm.CifarResNet(depth, 7).parameters()) == cifar_resnet_param_count(depth, 7)


def test_resnet32_has_32_weight_layers_and_two_parameter_free_shortcuts():
    m = sm.resnet32(100)
    assert len([x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]) == 32
    shortcuts = [x for x in m.modules() if isinstance(x, sm.ShortcutA)]
    assert len(shortcuts) == 2 and all(sum(p.numel() for p in s.parameters()) == 0 for s in shortcuts)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_option_a_shortcut_takes_every_other_pixel_and_pads_planes_over_4_zero_channels_each_side():
    x = torch.randn(2, 16, 8, 8)
    out = sm.ShortcutA(32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()


def test_resnet34_is_the_official_backbone_with_21_328_292_parameters():
    m = sm.resnet34(100)
    assert sum(p.numel() for p in m.parameters()) == 21_328_292
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_normed_linear_gives_the_cosines_of_the_features_and_the_weight_columns():
    lin = sm.NormedLinear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    w = lin.weight.detach()
    want = torch.tensor([[F.cosine_similarity(x[i], w[:, c], dim=0).item() for c in range(3)]
                         for i in range(4)], dtype=torch.float64)
    assert torch.allclose(lin(x), want, rtol=0, atol=1e-12)


# =============================================================================================
# 6. Losses
# =============================================================================================

def manual_ce(z, y):
    """-log softmax(z)_y, one sample at a time."""
    return torch.stack([-(z[i, y[i]] - torch.log(torch.exp(z[i]).sum())) for i in range(len(y))])


def loss_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, C, generator=g, dtype=torch.float64), torch.randint(0, C, (8,), generator=g)


def test_ce_is_the_per_sample_cross_entropy():
    z, y = loss_inputs()
    got = sm.LongTailLoss("CE", COUNTS).double()(z, y)
    assert got.shape == (8,) and torch.allclose(got, manual_ce(z, y), rtol=0, atol=1e-12)


def test_la_adds_tau_log_prior_and_va_is_the_same_loss():  # rtol 1e-6: the buffers are float32
    z, y = loss_inputs()
    n = torch.tensor(COUNTS, dtype=torch.float64)
    want = manual_ce(z + 0.75 * torch.log(n / n.sum()), y)
    for name in ("LA", "VA"):
        assert torch.allclose(sm.LongTailLoss(name, COUNTS).double()(z, y), want, rtol=1e-6, atol=0)


def test_vs_scales_by_n_over_n_max_to_the_gamma_then_adds_tau_log_prior():
    z, y = loss_inputs()
    n = torch.tensor(COUNTS, dtype=torch.float64)
    want = manual_ce(z * (n / n.max()) ** 0.05 + 0.75 * torch.log(n / n.sum()), y)
    assert torch.allclose(sm.LongTailLoss("VS", COUNTS).double()(z, y), want, rtol=1e-6, atol=0)


def test_ldam_subtracts_s_times_the_margin_from_the_target_cosine_only():
    z, y = loss_inputs()
    z = torch.tanh(z)  # cosine logits lie in [-1, 1]
    crit = sm.LongTailLoss("LDAM", COUNTS).double()
    m = [n ** -0.25 for n in COUNTS]
    margins = [0.5 * v / max(m) for v in m]  # m_c ∝ n_c^(-1/4), the rarest class's 0.5
    assert torch.allclose(crit.margin.double(), torch.tensor(margins, dtype=torch.float64), atol=1e-7)
    want = []
    for i in range(len(y)):
        t = 30 * (z[i, y[i]] - crit.margin[y[i]])
        others = [30 * z[i, j] for j in range(C) if j != y[i]]
        want.append(-(t - torch.log(torch.exp(t) + sum(torch.exp(o) for o in others))))
    assert torch.allclose(crit(z, y), torch.stack(want), rtol=0, atol=1e-9)


def test_drw_weights_are_class_balanced_sum_to_c_and_multiply_each_loss():
    crit = sm.LongTailLoss("CE", COUNTS)
    crit.set_drw(True)
    raw = [(1 - 0.9999) / (1 - 0.9999 ** n) for n in COUNTS]
    want = torch.tensor([w * C / sum(raw) for w in raw])
    assert torch.allclose(crit.weight, want, rtol=1e-5)
    z, y = loss_inputs()
    assert torch.allclose(crit(z.float(), y), manual_ce(z, y).float() * want[y], rtol=1e-5)
    crit.set_drw(False)
    assert torch.equal(crit.weight, torch.ones(C))


# =============================================================================================
# 7. The method: SAM, ImbSAM, SSE-SAM and their steps
# =============================================================================================

METHOD_BLOCK_DEFS = ["per_sample_losses", "sample_weights", "split_losses",  # the per-sample split
                     "frozen_bn_stats", "_Climb",           # the climb
                     "SAM", "sam_step", "ImbSAM", "imbsam_step", "SSESAM", "ssesam_step"]


def test_the_method_block_is_marked_once_imports_only_torch_and_the_standard_library_in_order():
    with open(sm.__file__, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for marker in ("copy from here", "copy to here"):
        marked = [line for line in lines if marker in line]
        assert len(marked) == 1 and marked[0].startswith("# ----"), marked
    tree = ast.parse(method_block())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" in imported and imported <= {"torch"} | set(sys.stdlib_module_names), imported
    # the per-sample split, the climb, SAM + sam_step, ImbSAM + imbsam_step, SSESAM + ssesam_step
    assert [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))] == METHOD_BLOCK_DEFS


@pytest.fixture(scope="module")
def copied_block(tmp_path_factory):
    """The method block alone in a new file, imported as the module ssesam_block: its names resolve
    in its own namespace, nothing comes from ssesam_minimal."""
    path = tmp_path_factory.mktemp("copied") / "ssesam_block.py"
    path.write_text(method_block(), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("ssesam_block", path)
    block = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(block)
    return block


def block_steps(block):
    """(name, step, optimizer) of each of the block's steps, on its own classes."""
    return [(name, getattr(block, f"{name}_step"), lambda model, name=name: make_opt(name, model, ns=block))
            for name in ("sam", "imbsam", "ssesam")]


def test_the_method_block_alone_in_a_new_file_runs_the_readme_example_to_the_modules_weights_bit_for_bit(
        readme_example_run, copied_block, monkeypatch):
    monkeypatch.setitem(sys.modules, "ssesam_block", copied_block)
    imports = "from ssesam_minimal import SSESAM, resnet32, ssesam_step\n"
    example = readme_example()
    assert imports in example and "lr_scheduler" in example  # with a torch scheduler on the wrapper
    scope, printed = run_example(example.replace(
        imports, "from ssesam_block import SSESAM, ssesam_step\nfrom ssesam_minimal import resnet32\n"))
    assert scope["SSESAM"] is copied_block.SSESAM and scope["ssesam_step"] is copied_block.ssesam_step
    assert printed == readme_example_run.printed  # the same lr and rho_head per epoch
    state = scope["model"].state_dict()
    assert state.keys() == readme_example_run.state.keys()
    for k, v in readme_example_run.state.items():
        assert torch.equal(state[k], v), k  # weights and BN statistics


@pytest.mark.parametrize("on", ["wrapper", "base"])
def test_the_copied_blocks_wrappers_are_torch_optimizers_whose_scheduler_sets_the_base_lr_without_a_warning(
        on, copied_block):
    T, lr0 = 4, 0.1
    cosine = [lr0 * (1 + math.cos(math.pi * e / T)) / 2 for e in range(3)]  # CosineAnnealingLR, closed form
    criterion = nn.CrossEntropyLoss(reduction="none")
    for name, step, make in block_steps(copied_block):
        model, twin = tiny_model(), tiny_model()
        opt, twin_opt = make(model), make(twin)
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt.param_groups is opt.optimizer.param_groups and opt.defaults is opt.optimizer.defaults
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the scheduler warns if it saw no optimizer step before its own
            scheduled = opt if on == "wrapper" else opt.optimizer
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(scheduled, T)
            for epoch in range(3):
                x, y = batch(epoch + 1)
                tail = torch.isin(y, TAIL_CLASSES)
                assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(cosine[epoch], rel=1e-12)
                step(model, criterion, opt, x, y, tail)
                for group in twin_opt.param_groups:  # the twin: the same lr, set by hand
                    group["lr"] = cosine[epoch]
                step(twin, criterion, twin_opt, x, y, tail)
                assert torch.allclose(flat(model), flat(twin), rtol=0, atol=1e-14), (name, epoch)
                schedule.step()
            # the warning is live: a scheduler stepped with no optimizer step before it says so
            fresh = make(tiny_model())
            fresh = torch.optim.lr_scheduler.CosineAnnealingLR(fresh if on == "wrapper" else fresh.optimizer,
                                                               T)
            with pytest.raises(UserWarning, match="before `optimizer.step"):
                fresh.step()


def test_the_copied_blocks_wrapper_step_without_a_climb_fails_in_one_line_naming_its_step_function(
        copied_block):
    x, y = batch()
    for name, step, make in block_steps(copied_block):
        model = tiny_model()
        opt = make(model)
        F.cross_entropy(model(x), y).backward()
        w0 = flat(model).clone()
        calls = [opt.step] + ([opt.update] if name == "ssesam" else [])  # the seed API's update() too
        for after_a_step in (False, True):  # refused at first, and again after a step completed
            if after_a_step:
                step(model, nn.CrossEntropyLoss(reduction="none"), opt, x, y, torch.isin(y, TAIL_CLASSES))
                F.cross_entropy(model(x), y).backward()
                w0 = flat(model).clone()
            for call in calls:
                with pytest.raises(RuntimeError) as e:
                    call()
                line = str(e.value)
                assert "\n" not in line and f"call {name}_step(model, criterion, opt, x, y, tail)" in line
                assert "plain SGD" in line and torch.equal(flat(model), w0)  # nothing stepped


def test_the_copied_blocks_wrappers_take_torchs_zero_grad_and_sams_closure_and_share_the_base_state(
        copied_block):
    x, y = batch()
    tail = torch.isin(y, TAIL_CLASSES)
    criterion = nn.CrossEntropyLoss(reduction="none")
    for name, step, make in block_steps(copied_block):
        model = tiny_model()
        opt = make(model)
        assert opt.state is opt.optimizer.state  # from construction, not only after a load
        step(model, criterion, opt, x, y, tail)
        assert all("momentum_buffer" in opt.state[p] for p in model.parameters())
        grads = [p.grad for p in model.parameters()]
        F.cross_entropy(model(x), y).backward()
        opt.zero_grad(set_to_none=False)  # zeroed in place: the same tensors, all 0
        assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
        F.cross_entropy(model(x), y).backward()
        opt.zero_grad(set_to_none=True)   # torch's default, by keyword or not: no gradient left
        assert all(p.grad is None for p in model.parameters())
        F.cross_entropy(model(x), y).backward()
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        step(model, criterion, opt, x, y, tail)  # and the steps start from no .grad at all
        if name != "sam":  # a closure gives no per-sample losses and no tail mask: one line, no step
            w0 = flat(model).clone()
            with pytest.raises(TypeError) as e:
                opt.step(lambda: F.cross_entropy(model(x), y))
            assert "\n" not in str(e.value) and f"call {name}_step(model, criterion, opt, x, y, tail)" in str(e.value)
            assert torch.equal(flat(model), w0)
    # SAM.step(closure), the closure as torch's (zero_grad, forward, backward, return the loss):
    # SAM's whole step, the weights of sam_step bit for bit, over two steps (through the momentum)
    ours, theirs = tiny_model(), tiny_model()
    opt_ours, opt_theirs = make_opt("sam", ours, ns=copied_block), make_opt("sam", theirs, ns=copied_block)
    for seed in (1, 2):
        x, y = batch(seed)
        tail = torch.isin(y, TAIL_CLASSES)

        def closure():
            opt_theirs.zero_grad()
            loss = criterion(theirs(x), y).sum() / len(y)
            loss.backward()
            return loss

        with torch.no_grad():  # as torch's step() is called; the closure gets its grad mode back
            loss = opt_theirs.step(closure)
        _, loss_i = copied_block.sam_step(ours, criterion, opt_ours, x, y, tail)
        assert torch.equal(flat(theirs), flat(ours)) and loss.item() == (loss_i.sum() / len(y)).item()
    assert all(torch.equal(a, b) for a, b in zip(theirs.buffers(), ours.buffers()))  # BN stats of F1 only


def refused(step, opt, model, criterion, x, y, tail, error):
    """step(...) must raise error with a one-line message, before any parameter changes; the message."""
    w0 = flat(model).clone()
    with pytest.raises(error) as e:
        step(model, criterion, opt, x, y, tail)
    assert "\n" not in str(e.value) and torch.equal(flat(model), w0)
    return str(e.value)


def test_the_copied_blocks_steps_and_sgd_step_refuse_a_mean_loss_and_a_tail_that_is_no_bool_mask_of_the_batch(
        copied_block):
    x, y = batch()
    tail = torch.isin(y, TAIL_CLASSES)
    per_sample = nn.CrossEntropyLoss(reduction="none")
    steps = block_steps(copied_block) + [("sgd", sm.sgd_step, sgd)]
    for name, step, make in steps:
        model = tiny_model()
        opt = make(model)
        # the default reduction="mean": sam_step would have divided the mean by B again
        line = refused(step, opt, model, nn.CrossEntropyLoss(), x, y, tail, ValueError)
        assert "criterion" in line and "reduction='none'" in line and "got shape ()" in line, (name, line)
        for bad, shown in ((tail.long(), "torch.int64"),                 # a 0/1 int mask
                           (TAIL_CLASSES.tolist(), "list"),              # the tail classes' ids
                           (tail[:-1], "of shape (15,)"),                # another batch's mask
                           (torch.tensor(COUNTS) < ETA, "of shape (10,)")):  # per class, not per sample
            line = refused(step, opt, model, per_sample, x, y, bad, TypeError)
            assert line.startswith("tail must be a bool tensor of the batch's shape (16,)"), (name, line)
            assert shown in line, (name, line)
        step(model, per_sample, opt, x, y, tail)  # what is right still steps


def test_the_checks_read_only_dtypes_and_shapes_never_a_value():
    # tensors on the meta device have shapes and dtypes but no values: reading one would raise
    meta = dict(device="meta")
    logits, y = torch.empty(16, C, **meta), torch.empty(16, dtype=torch.long, **meta)
    loss_i = sm.per_sample_losses(nn.CrossEntropyLoss(reduction="none"), logits, y,
                                  torch.empty(16, dtype=torch.bool, **meta))
    assert loss_i.shape == (16,) and loss_i.is_meta
    with pytest.raises(TypeError, match="tail"):
        sm.per_sample_losses(nn.CrossEntropyLoss(reduction="none"), logits, y, torch.empty(16, **meta))


def test_the_copied_blocks_steps_and_sgd_step_give_the_same_update_bit_for_bit_whatever_grad_held(
        copied_block):
    criterion = nn.CrossEntropyLoss(reduction="none")
    steps = block_steps(copied_block) + [("sgd", sm.sgd_step, sgd)]
    for name, step, make in steps:
        clean, stale = tiny_model(), tiny_model()
        opt_clean, opt_stale = make(clean), make(stale)
        g = torch.Generator().manual_seed(7)
        for seed in (1, 2):  # the second step through SGD's momentum
            x, y = batch(seed)
            tail = torch.isin(y, TAIL_CLASSES)
            for p in stale.parameters():  # another loss's gradient, or a forgotten zero_grad
                p.grad = 10 * torch.randn(p.shape, generator=g, dtype=p.dtype)
            step(clean, criterion, opt_clean, x, y, tail)
            step(stale, criterion, opt_stale, x, y, tail)
            assert torch.equal(flat(clean), flat(stale)), (name, seed)


class EachForwardInAutocast(nn.Module):
    """The network with each forward in its own bf16 autocast block, logits back in fp32."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.autocast("cpu", torch.bfloat16):
            return self.net(x).float()


def test_the_copied_blocks_steps_under_autocast_around_the_whole_step_equal_autocast_around_each_forward(
        copied_block, monkeypatch):
    criterion = nn.CrossEntropyLoss(reduction="none")

    def run(step, make, whole):  # two steps (the second through the momentum); the weights moved
        net = tiny_model(torch.float32)
        opt, w0 = make(net), flat(net).clone()
        for seed in (1, 2):
            x, y = batch(seed, dtype=torch.float32)
            tail = torch.isin(y, TAIL_CLASSES)
            if whole:
                with torch.autocast("cpu", torch.bfloat16):
                    step(net, criterion, opt, x, y, tail)
            else:
                step(EachForwardInAutocast(net), criterion, opt, x, y, tail)
        return flat(net) - w0

    for name, step, make in block_steps(copied_block):
        each = run(step, make, whole=False)
        assert torch.equal(run(step, make, whole=True), each), name
        # precondition: without the cache cleared after the climb and the way back, the whole-step
        # autocast runs the convolutions and the linear layer at w + ε with its bf16 copy of w
        with monkeypatch.context() as mp:
            mp.setattr(torch, "clear_autocast_cache", lambda: None)
            assert not torch.allclose(run(step, make, whole=True), each, rtol=0, atol=1e-4), name


def test_the_seed_snippet_under_autocast_around_the_whole_step_equals_autocast_around_each_forward(
        copied_block, monkeypatch):
    # the seed snippet runs a forward at w right after each way back: a bf16 copy of w + ε kept by
    # a whole-step autocast block must not be used there. The plain arm has no autocast block
    # around it at all (nullcontext): a disabled one still nests, and stops the inner blocks
    # clearing their cache when they end.
    def run(whole):  # two steps, the second through the momentum; the weights moved
        net = tiny_model(torch.float32)
        opt, w0 = make_opt("ssesam", net, ns=copied_block), flat(net).clone()
        scope = {"torch": torch, "optim_mode": "ssesam", "optimizer": opt, "tail_classes": TAIL_CLASSES,
                 "lossFunc": nn.CrossEntropyLoss(reduction="none"),
                 "model": net if whole else EachForwardInAutocast(net)}
        for seed in (1, 2):
            scope["images"], scope["targets"] = batch(seed, dtype=torch.float32)
            with torch.autocast("cpu", torch.bfloat16) if whole else contextlib.nullcontext():
                exec(SEED_SNIPPET, scope)
        return flat(net) - w0

    each = run(whole=False)
    assert torch.equal(run(whole=True), each)
    # precondition: a way back that keeps the cache gives other weights
    def restore_keeping_the_cache(self):
        torch._foreach_copy_(self.params, self.w)
    monkeypatch.setattr(copied_block._Climb, "restore", torch.no_grad()(restore_keeping_the_cache))
    assert not torch.allclose(run(whole=True), each, rtol=0, atol=1e-4)


def test_ssesam_step_gives_the_weights_of_the_seed_snippet_run_verbatim_before_and_after_the_switch():
    # γ 0.7, T 10: no epoch done is stage 1 (our 3F+4B), 7 done is stage 2 (our 2F+3B); the seed
    # snippet runs 4F+4B in both. Two steps each, the second through SGD's momentum.
    criterion = nn.CrossEntropyLoss(reduction="none")
    for epochs_done in (0, 7):
        ours, theirs = tiny_model(), tiny_model()
        opt = sm.SSESAM(sgd(ours), ours, head_rho=0.05, tail_rho=0.10, gamma=0.7, total_epochs=10)
        scope = {"torch": torch, "optim_mode": "ssesam", "model": theirs, "tail_classes": TAIL_CLASSES,
                 "lossFunc": criterion}
        exec("from ssesam_minimal import SSESAM\n"
             "optimizer = SSESAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, "
             "weight_decay=1e-3), model, head_rho=0.05, tail_rho=0.10, gamma=0.7, total_epochs=10)", scope)
        for _ in range(epochs_done):
            opt.update_rho()
            scope["optimizer"].update_rho()
        assert opt.head_rho == (0.05 if epochs_done == 0 else 0.0)
        for seed in (1, 2):
            x, y = batch(seed)
            tail = torch.isin(y, TAIL_CLASSES)
            assert 0 < int(tail.sum()) < len(y)
            scope.update(images=x, targets=y)
            exec(SEED_SNIPPET, scope)
            sm.ssesam_step(ours, criterion, opt, x, y, tail)
            assert torch.allclose(flat(ours), flat(theirs), rtol=0, atol=1e-12), (epochs_done, seed)


def test_ssesam_step_follows_its_update_rule():
    # G = ∇L_head(w + ε_head) + ∇L_tail(w + ε_tail), ε_g = ρ_g ∇L_g(w) / ‖∇L_g(w)‖, L_g = Σ_g ℓ_i / B
    model = tiny_model()
    x, y = batch()
    B, tail = len(y), torch.isin(y, TAIL_CLASSES)
    head_loss = lambda m: ce_sum(m, x, y, ~tail, B)  # noqa: E731
    tail_loss = lambda m: ce_sum(m, x, y, tail, B)  # noqa: E731
    G = [a + b for a, b in zip(
        grads_at(shifted(model, naive_eps(grads_at(model, head_loss), 0.05)), head_loss),
        grads_at(shifted(model, naive_eps(grads_at(model, tail_loss), 0.10)), tail_loss))]
    want = sgd_update(model, G)
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.10, gamma=0.7, total_epochs=10)
    sm.ssesam_step(model, sm.LongTailLoss("CE", COUNTS).double(), opt, x, y, tail)
    assert torch.allclose(flat(model), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("weight", ["group", "batch"])
def test_imbsam_step_follows_its_update_rule(weight):
    # G = ∇L_head(w) + ∇L_tail(w + ε_tail); L_g = Σ_g ℓ_i / n_g (group) or / B (batch)
    model = tiny_model()
    x, y = batch()
    tail = torch.isin(y, TAIL_CLASSES)
    n_head, n_tail = (int((~tail).sum()), int(tail.sum())) if weight == "group" else (len(y), len(y))
    tail_loss = lambda m: ce_sum(m, x, y, tail, n_tail)  # noqa: E731
    G = [a + b for a, b in zip(
        grads_at(model, lambda m: ce_sum(m, x, y, ~tail, n_head)),
        grads_at(shifted(model, naive_eps(grads_at(model, tail_loss), 0.05)), tail_loss))]
    want = sgd_update(model, G)
    sm.imbsam_step(model, sm.LongTailLoss("CE", COUNTS).double(),
                   sm.ImbSAM(sgd(model), model, rho=0.05, imbsam_weight=weight), x, y, tail)
    assert torch.allclose(flat(model), want, rtol=0, atol=1e-12)


def test_sam_step_follows_its_update_rule():
    # G = ∇L(w + ε), ε = ρ ∇L(w) / ‖∇L(w)‖, L the batch mean
    model = tiny_model()
    x, y = batch()
    loss = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    want = sgd_update(model, grads_at(shifted(model, naive_eps(grads_at(model, loss), 0.05)), loss))
    sm.sam_step(model, sm.LongTailLoss("CE", COUNTS).double(), sm.SAM(sgd(model), model, rho=0.05),
                x, y, torch.isin(y, TAIL_CLASSES))
    assert torch.allclose(flat(model), want, rtol=0, atol=1e-12)


def test_imbsam_with_batch_weighting_is_ssesam_with_gamma_0():
    a, b = tiny_model(), tiny_model()
    opt_a = sm.ImbSAM(sgd(a), a, rho=0.1, imbsam_weight="batch")
    opt_b = sm.SSESAM(sgd(b), b, head_rho=0.05, tail_rho=0.1, gamma=0.0, total_epochs=10)
    criterion = sm.LongTailLoss("CE", COUNTS).double()
    for seed in (1, 2):  # the second step through SGD's momentum
        x, y = batch(seed)
        tail = torch.isin(y, TAIL_CLASSES)
        sm.imbsam_step(a, criterion, opt_a, x, y, tail)
        sm.ssesam_step(b, criterion, opt_b, x, y, tail)
    assert torch.allclose(flat(a), flat(b), rtol=0, atol=1e-12)


def test_split_losses_divide_each_group_by_its_documented_sum_of_weights():
    loss_i = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)  # already times ω_i
    tail = torch.tensor([False, True, False, True, True])
    split = lambda *a: [v.item() for v in sm.split_losses(loss_i, tail, *a)]  # noqa: E731
    assert split("batch") == [4 / 5, 11 / 5]           # Σ_g ℓ_i / B
    assert split("group") == [4 / 2, 11 / 3]           # Σ_g ℓ_i / n_g
    assert split("imbsam_repo") == [4 / 5, 22 / 5]     # the ImbSAM code: the tail's doubled
    w = torch.tensor([0.5, 2.0, 0.25, 1.0, 4.0], dtype=torch.float64)  # Σ 7.75, head 0.75, tail 7
    assert split("batch", w) == [4 / 7.75, 11 / 7.75]
    assert split("group", w) == [4 / 0.75, 11 / 7.0]
    assert split("imbsam_repo", w) == [4 / 7.75, 22 / 7.75]
    # an empty group has loss 0, not 0 / 0
    assert [v.item() for v in sm.split_losses(loss_i, torch.zeros(5, dtype=torch.bool), "group")] == [3.0, 0.0]
    assert [v.item() for v in sm.split_losses(loss_i, torch.ones(5, dtype=torch.bool), "group")] == [0.0, 3.0]


def long_tailed_batch(seed=3, B=32):
    """A batch whose labels are drawn with probabilities n_c / N, as a shuffled epoch draws them."""
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    y = torch.multinomial(n / n.sum(), B, replacement=True, generator=g)
    return torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64), y


@pytest.mark.parametrize("name,weighting", [("sgd", "group"), ("sam", "group"), ("imbsam", "batch"),
                                            ("imbsam", "group"), ("imbsam", "imbsam_repo"),
                                            ("ssesam", "group")])
def test_drw_steps_equal_the_same_step_written_with_cross_entropy_class_weights(name, weighting):
    crit = sm.LongTailLoss("CE", COUNTS).double()
    crit.set_drw(True)
    wc = crit.weight  # class weights, summing to C
    model = tiny_model()
    x, y = long_tailed_batch()
    tail = torch.isin(y, TAIL_CLASSES)
    W = wc[y].sum()
    assert 0 < tail.sum() < len(y) and W / len(y) < 0.8  # Σ w / B far from 1: dividing by B would differ

    def ce(m, mask, denominator):  # Σ_{i in mask} w_{y_i} ℓ_i / denominator
        return F.cross_entropy(m(x)[mask], y[mask], weight=wc, reduction="sum") / denominator

    if name in ("sgd", "sam"):
        def full(m):
            return F.cross_entropy(m(x), y, weight=wc)  # its mean: Σ w ℓ / Σ w
        G = grads_at(model, full)
        if name == "sam":
            G = grads_at(shifted(model, naive_eps(G, 0.05)), full)
    elif name == "imbsam":
        d_head = {"batch": W, "imbsam_repo": W, "group": wc[y[~tail]].sum()}[weighting]
        d_tail = {"batch": W, "imbsam_repo": W / 2, "group": wc[y[tail]].sum()}[weighting]
        g_t = grads_at(model, lambda m: ce(m, tail, d_tail))
        G = [a + b for a, b in zip(grads_at(model, lambda m: ce(m, ~tail, d_head)),
                                   grads_at(shifted(model, naive_eps(g_t, 0.05)), lambda m: ce(m, tail, d_tail)))]
    else:  # SSE-SAM, stage 1: both groups over the batch's weight sum
        g_h = grads_at(model, lambda m: ce(m, ~tail, W))
        g_t = grads_at(model, lambda m: ce(m, tail, W))
        G = [a + b for a, b in zip(grads_at(shifted(model, naive_eps(g_h, 0.05)), lambda m: ce(m, ~tail, W)),
                                   grads_at(shifted(model, naive_eps(g_t, 0.1)), lambda m: ce(m, tail, W)))]
    want = sgd_update(model, G)
    sm.STEPS[name](model, crit, make_opt(name, model, imbsam_weight=weighting), x, y, tail)
    assert torch.allclose(flat(model), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name,epochs_done,passes", [
    ("sgd", 0, (1, 1)), ("sam", 0, (2, 2)), ("imbsam", 0, (2, 3)),
    ("ssesam", 0, (3, 4)), ("ssesam", 1, (2, 3))])
def test_forward_and_backward_passes_per_step(name, epochs_done, passes):
    model = tiny_model(torch.float32)
    opt = make_opt(name, model, epochs_done)
    count = {"F": 0, "B": 0}
    model.register_forward_hook(lambda *a: count.__setitem__("F", count["F"] + 1))
    model.conv1.weight.register_hook(lambda g: count.__setitem__("B", count["B"] + 1))  # once per backward
    x, y = batch(dtype=torch.float32)
    sm.STEPS[name](model, sm.LongTailLoss("CE", COUNTS), opt, x, y, torch.isin(y, TAIL_CLASSES))
    assert (count["F"], count["B"]) == passes


@pytest.mark.parametrize("name", ["sam", "imbsam", "ssesam"])
def test_bn_running_stats_come_from_the_unperturbed_forward_only(name):
    model = tiny_model(torch.float32)
    twin = copy.deepcopy(model)
    x, y = batch(dtype=torch.float32)
    twin.train()
    twin(x)  # one forward at w: what the running statistics should hold after the step
    sm.STEPS[name](model, sm.LongTailLoss("CE", COUNTS), make_opt(name, model), x, y,
                   torch.isin(y, TAIL_CLASSES))
    bufs = dict(model.named_buffers())
    for k, v in twin.named_buffers():
        assert torch.equal(bufs[k], v), k
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name,empty,like,rho", [
    ("ssesam", "tail", "sam", 0.05),  # G = ∇L_head(w + ε_head), L_head the batch mean: SAM with ρ_head
    ("ssesam", "head", "sam", 0.10),  # G = ∇L_tail(w + ε_tail): SAM with ρ_tail
    ("imbsam", "tail", "sgd", None),  # G = ∇L_head(w), the group mean = the batch mean: SGD
    ("imbsam", "head", "sam", 0.05),  # G = ∇L_tail(w + ε_tail): SAM with ρ
])
def test_a_batch_without_tail_or_head_samples_steps_like_sam_or_sgd_without_nan(name, empty, like, rho):
    x, y = batch(labels=[0, 1, 2, 3] * 4 if empty == "tail" else [6, 7, 8, 9] * 4)
    tail = torch.isin(y, TAIL_CLASSES)
    assert tail.all() if empty == "head" else not tail.any()
    a, b = tiny_model(), tiny_model()
    criterion = nn.CrossEntropyLoss(reduction="none")
    opt = make_opt(name, a, imbsam_weight="group")  # group: 0 / 0 in the empty one
    sm.STEPS[name](a, criterion, opt, x, y, tail)
    sm.STEPS[like](b, criterion, sgd(b) if like == "sgd" else sm.SAM(sgd(b), b, rho), x, y, tail)
    assert torch.allclose(flat(a), flat(b), rtol=0, atol=1e-12)


def test_the_optimizers_refuse_a_negative_rho_and_ssesam_a_gamma_outside_0_1_or_no_epochs():
    model = tiny_model()
    for make in (lambda: sm.SAM(sgd(model), model, rho=-0.1),
                 lambda: sm.ImbSAM(sgd(model), model, rho=-0.1),
                 lambda: sm.SSESAM(sgd(model), model, head_rho=-1.0, tail_rho=0.1),
                 lambda: sm.SSESAM(sgd(model), model, head_rho=0.05, tail_rho=-0.1),
                 lambda: sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=1.0),
                 lambda: sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=-0.1),
                 lambda: sm.SSESAM(sgd(model), model, 0.05, 0.1, total_epochs=0)):
        with pytest.raises(ValueError):
            make()


# =============================================================================================
# 8. Evaluation
# =============================================================================================

def test_many_medium_few_of_cifar100_if100_are_35_35_30_classes_by_training_count():
    g = sm.shot_groups(CIFAR100_IF100, 500)
    assert [int(g[k].sum()) for k in ("many", "med", "few")] == [35, 35, 30]
    for c, n in enumerate(CIFAR100_IF100):  # many: n > 100, few: n < 20, medium: the rest
        assert (bool(g["many"][c]), bool(g["med"][c]), bool(g["few"][c])) == (n > 100, 20 <= n <= 100, n < 20)


class PredictById(nn.Module):
    """Reads an image id from pixel (0, 0) (also written at (0, 31), so a mirror keeps it), predicts
    preds[id], and records whether it ran in training mode."""

    def __init__(self, preds, C):
        super().__init__()
        self.preds, self.C, self.modes = torch.tensor(preds), C, []

    def forward(self, inp):
        self.modes.append(self.training)
        ids = ((inp[:, 0, 0, 0] * sm.STD[0] + sm.MEAN[0]) * 255).round().long()
        return F.one_hot(self.preds[ids], self.C).float()


def test_evaluate_reports_mean_per_class_accuracy_and_its_groups_in_eval_mode():
    counts = [300, 100, 50, 10, 250]  # n_max 300: many (> 60) = 0, 1, 4; medium = 2; few (< 12) = 3
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 4])
    preds = [0, 1, 1, 1, 2, 0, 3, 0, 0, 3, 4]
    x = torch.zeros(len(y), 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 0, 0] = x[:, 0, 0, 31] = torch.arange(len(y), dtype=torch.uint8)
    per_class = [100 * sum(p == c for p, t in zip(preds, y.tolist()) if t == c) / int((y == c).sum())
                 for c in range(5)]  # 50, 100, 50, 50, 100: the mean per class, not per image
    model = PredictById(preds, 5).train()
    r = sm.evaluate(model, x, y, counts, 300, batch_size=3)
    assert model.modes and not any(model.modes) and model.training  # eval mode, then restored
    for suffix in ("", "_tta"):  # the id survives mirroring, so flip-TTA changes nothing here
        assert r["avg" + suffix] == pytest.approx(sum(per_class) / 5, abs=1e-9)
        assert r["many" + suffix] == pytest.approx((per_class[0] + per_class[1] + per_class[4]) / 3, abs=1e-9)
        assert r["med" + suffix] == pytest.approx(per_class[2], abs=1e-9)
        assert r["few" + suffix] == pytest.approx(per_class[3], abs=1e-9)
    # a group without classes has no accuracy
    assert sm.evaluate(model, x, y, [300, 100, 100, 100, 250], 300)["few"] is None


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    # class 0 when the left half is brighter (logit 1), class 1 otherwise (logit 2): averaging an
    # image with its mirror always lands on class 1
    class LeftRight(nn.Module):
        def forward(self, inp):
            left = inp[:, 0, :, :16].mean((1, 2)) > inp[:, 0, :, 16:].mean((1, 2))
            return torch.stack([left.float(), 2 * (~left).float()], 1)

    x = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    x[:2, :, :, :16] = 255  # images 0, 1: bright left, label 0
    x[2, :, :, 16:] = 255   # image 2: bright right, label 1
    r = sm.evaluate(LeftRight(), x, torch.tensor([0, 0, 1]), [10, 10], 10)
    assert r["avg"] == 100.0      # plain: all three right
    assert r["avg_tta"] == 50.0   # TTA: class 0's images become class 1 (0 %), class 1 stays (100 %)


# =============================================================================================
# 9. Training
# =============================================================================================

def test_lr_is_cosine_stepped_before_each_epoch_so_the_last_epoch_trains_at_lr_0():
    cfg = sm.Config()  # lr 0.01, T 200: the official values of CosineAnnealingLR stepped first
    assert sm.lr_at(0, cfg) == pytest.approx(0.0099994, abs=1e-7)
    assert sm.lr_at(139, cfg) == pytest.approx(0.002061, abs=1e-6)
    assert sm.lr_at(199, cfg) == 0.0


@pytest.mark.parametrize("name", sm.OPTS)
def test_build_run_makes_a_channels_last_net_and_fused_sgd_that_step_like_a_plain_net_and_sgd(name):
    cfg = sm.Config(arch="resnet8", opt=name, lr=0.1, gamma=0.5, epochs=2)  # the rest: the defaults
    net, model, criterion, opt, _ = sm.build_run(cfg, COUNTS, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    plain = sm.CifarResNet(8, C)  # the initial weights come from the global generator at cfg.seed
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), plain.state_dict().values()))
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert (opt if name == "sgd" else opt.optimizer).defaults["fused"] is True
    plain_opt = make_opt(name, plain)  # the same hyperparameters on SGD's per-parameter loop
    for seed in (1, 2):  # the second step through the momentum buffers
        x, y = batch(seed, dtype=torch.float32)
        tail = torch.isin(y, TAIL_CLASSES)
        sm.STEPS[name](model, criterion, opt, x.contiguous(memory_format=torch.channels_last), y, tail)
        sm.STEPS[name](plain, criterion, plain_opt, x, y, tail)
        assert torch.allclose(flat(net), flat(plain), rtol=0, atol=1e-5), seed  # float32 rounding


def test_bf16_forward_runs_each_forward_in_its_own_bf16_autocast_on_the_inputs_device_and_returns_fp32(
        monkeypatch):
    opened, depth = [], []

    @contextlib.contextmanager
    def autocast(device_type, dtype):  # records what torch.autocast would open (no CUDA here)
        opened.append((device_type, dtype))
        depth.append(1)
        try:
            yield
        finally:
            depth.pop()

    class Net(nn.Module):
        def forward(self, x):
            self.inside = len(depth)
            return x.to(torch.bfloat16)

    monkeypatch.setattr(torch, "autocast", autocast)
    model = sm.Bf16Forward(Net())
    for n in (1, 2):
        out = model(torch.ones(2, 3))
        assert out.dtype == torch.float32 and model.net.inside == 1
        assert opened == [("cpu", torch.bfloat16)] * n  # one block per forward, on x's device


@pytest.mark.parametrize("bf16,device,expected", [(None, "cpu", "fp32"), (None, "cuda", "bf16"),
                                                  (True, "cpu", "bf16"), (False, "cuda", "fp32")])
def test_precision_is_bf16_on_cuda_and_fp32_on_the_cpu_unless_a_flag_says(bf16, device, expected):
    assert sm.precision(sm.Config(bf16=bf16), torch.device(device)) == expected
    assert sm.parse_config([] if bf16 is None else ["--bf16" if bf16 else "--no-bf16"]).bf16 is bf16


def test_precision_is_the_loops_choice_the_cpu_runs_the_net_itself_and_the_method_block_names_none(
        monkeypatch):
    net, model, *_ = sm.build_run(sm.Config(arch="resnet8"), COUNTS, torch.device("cpu"))
    assert model is net
    net, model, *_ = sm.build_run(sm.Config(arch="resnet8", bf16=True), COUNTS, torch.device("cpu"))
    assert isinstance(model, sm.Bf16Forward) and model.net is net
    # build_run follows precision(), not the flag: on CUDA an unset flag means bf16
    monkeypatch.setattr(sm, "precision", lambda cfg, device: "bf16")
    net, model, *_ = sm.build_run(sm.Config(arch="resnet8"), COUNTS, torch.device("cpu"))
    assert isinstance(model, sm.Bf16Forward) and model.net is net
    monkeypatch.setattr(sm, "precision", lambda cfg, device: "fp32")
    net, model, *_ = sm.build_run(sm.Config(arch="resnet8", bf16=True), COUNTS, torch.device("cpu"))
    assert model is net
    # the block may clear autocast's cache (right under any autocast), never open or set one
    block = method_block()
    assert "torch.clear_autocast_cache()" in block
    assert not re.search(r"autocast\(|set_autocast|bfloat16|float16|\bbf16\b|\.half\(", block)


def real_batches(n, B=64, seed=0):
    """n batches of random 32 x 32 images, normalised and channels_last as the loop feeds them."""
    g = torch.Generator().manual_seed(seed)
    xs = [sm.normalize(torch.randint(0, 256, (B, 3, 32, 32), generator=g, dtype=torch.uint8))
          for _ in range(n)]
    return [(x.contiguous(memory_format=torch.channels_last), torch.randint(0, C, (B,), generator=g))
            for x in xs]


def test_a_cpu_bf16_step_computes_its_convolutions_in_bf16_and_keeps_weights_grads_and_loss_fp32(
        one_torch_thread):
    cfg = sm.Config(arch="resnet8", opt="ssesam", bf16=True, epochs=2, gamma=0.5)
    net, model, criterion, opt, _ = sm.build_run(cfg, COUNTS, torch.device("cpu"))
    seen = []
    net.conv1.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    (x, y), = real_batches(1)
    logits, loss_i = sm.ssesam_step(model, criterion, opt, x, y, torch.isin(y, TAIL_CLASSES))
    assert seen == [torch.bfloat16] * 3  # 3 forwards before the switch, each in bf16
    assert logits.dtype == loss_i.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(b["momentum_buffer"].dtype == torch.float32 for b in opt.optimizer.state.values())


@pytest.mark.parametrize("name", sm.OPTS)
def test_four_cpu_bf16_steps_stay_within_15_percent_of_the_fp32_update(name, one_torch_thread):
    # measured (ResNet-8, batch 64, lr 0.1, torch 2.14): 4 % (sgd, sam, ssesam) to 7 % (imbsam)
    moved = {}
    for bf16 in (False, True):
        cfg = sm.Config(arch="resnet8", opt=name, bf16=bf16, lr=0.1, epochs=2, gamma=0.5)
        net, model, criterion, opt, _ = sm.build_run(cfg, COUNTS, torch.device("cpu"))
        w0 = flat(net).clone()
        for x, y in real_batches(4):
            sm.STEPS[name](model, criterion, opt, x, y, torch.isin(y, TAIL_CLASSES))
        moved[bf16] = flat(net) - w0
    assert (moved[True] - moved[False]).norm() <= 0.15 * moved[False].norm()
    assert not torch.equal(moved[True], moved[False])  # bf16 did run: its rounding shows


def test_every_step_takes_the_same_six_arguments_and_imbsam_weight_reaches_imbsam_from_the_command_line():
    for fn in sm.STEPS.values():
        assert list(inspect.signature(fn).parameters) == ["model", "criterion", "opt", "x", "y", "tail"], fn
    model = tiny_model()
    assert sm.ImbSAM(sgd(model), model).imbsam_weight == "group"  # the command line's default too
    with pytest.raises(ValueError, match="imbsam_weight must be group, batch or imbsam_repo, got 'mean'"):
        sm.ImbSAM(sgd(model), model, imbsam_weight="mean")
    for weight in ("group", "batch", "imbsam_repo"):  # --imbsam_weight reaches ImbSAM
        cfg = sm.parse_config(["--opt", "imbsam", "--imbsam_weight", weight, "--arch", "resnet8"])
        assert sm.build_run(cfg, COUNTS, torch.device("cpu"))[3].imbsam_weight == weight


def test_progress_line_rewrites_one_line_at_most_every_half_second_and_always_at_the_last_step(
        monkeypatch, capsys):
    clock = iter([1000.0, 1000.0, 1000.25, 1001.5, 1001.75, 1002.0])  # the start, then steps 1-5
    monkeypatch.setattr(sm, "time", SimpleNamespace(time=lambda: next(clock)))  # the module's clock only
    show = sm.progress_line(3, 10)
    for k in range(1, 6):
        show(k, 5)
    assert capsys.readouterr().out == ("\repoch 3/10 step 1/5 0.00 s/step, 0 s left\033[K"
                                       "\repoch 3/10 step 3/5 0.50 s/step, 1 s left\033[K"
                                       "\repoch 3/10 step 5/5 0.40 s/step, 0 s left\033[K")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_train_counts_the_steps_on_one_line_on_a_terminal_and_clears_it_for_the_epoch_line(monkeypatch):
    monkeypatch.setattr(sm, "data_counts", small_synthetic)
    data = sm.load_data("synthetic", imb_factor=10.0)  # 159 images: 3 steps of 64
    stdout = Terminal()
    monkeypatch.setattr(sys, "stdout", stdout)
    sm.train(sm.Config(dataset="synthetic", imb_factor=10.0, arch="resnet8", opt="sgd", epochs=1),
             data, torch.device("cpu"))
    text = stdout.getvalue()
    assert "\repoch 1/1 step 1/3 " in text and "\repoch 1/1 step 3/3 " in text
    line = next(line for line in text.split("\n") if "step 3/3" in line)
    assert line.rsplit("\r\033[K", 1)[1].startswith("epoch   1/1 lr ")  # what the terminal shows


# ---- One straight run through main(): ResNet-8, 3 epochs of 159 synthetic images (3 steps of 64).
# ρ_head = 0 after ⌈0.3 · 3⌉ = 1 epoch and DRW from epoch index 1: both change in epoch 2, whose lr
# is still > 0 (epoch 3's is 0). Evaluated at epochs 2 and 3 (print_freq 2). Pinned to the CPU:
# bit for bit is a claim about the CPU.

RUN = ["--dataset", "synthetic", "--imb_factor", "10", "--eta", "10", "--arch", "resnet8",
       "--epochs", "3", "--gamma", "0.3", "--drw_epoch", "1", "--lr", "0.5", "--batch_size", "64",
       "--print_freq", "2", "--device", "cpu"]
RUN_STEPS = 3  # per epoch: ⌈159 / 64⌉


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, one_torch_thread):
    """RUN to its end, with --out; records, at each step, the lr, ρ_head, DRW weights and the state
    the step starts from (through main's wrap_step, which changes nothing else)."""
    out = tmp_path_factory.mktemp("straight") / "out"
    steps = []

    def recording(step, model, opt):
        def recorded(model, criterion, opt, *args):
            steps.append(SimpleNamespace(lr=opt.param_groups[0]["lr"], rho_head=opt.head_rho,
                                         drw=criterion.weight.clone(),
                                         state={k: v.clone() for k, v in model.state_dict().items()}))
            return step(model, criterion, opt, *args)
        return recorded

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(sm, "data_counts", small_synthetic)
        summary = sm.main(RUN + ["--out", str(out)], wrap_step=recording)
    return SimpleNamespace(out=out, summary=summary, steps=steps, stdout=stdout.getvalue(),
                           ckpt=torch.load(out / "last.pt", map_location="cpu", weights_only=True))


def test_a_run_steps_at_its_epochs_lr_and_switches_rho_head_and_starts_drw_at_the_set_epochs(straight_run):
    counts, _ = small_synthetic("synthetic", 10.0)
    drw = sm.LongTailLoss("CE", counts)
    drw.set_drw(True)
    lrs = [0.375, 0.125, 0.0]  # 0.5 (1 + cos(π e / 3)) / 2 for e = 1, 2, 3: stepped before each epoch
    assert len(straight_run.steps) == 3 * RUN_STEPS
    for i, s in enumerate(straight_run.steps):
        e = i // RUN_STEPS  # 0-indexed epoch
        assert s.lr == pytest.approx(lrs[e], rel=1e-12, abs=1e-18), i
        assert s.rho_head == (0.05 if e < 1 else 0.0), i
        assert torch.equal(s.drw, torch.ones(10) if e < 1 else drw.weight), i
    assert [r["rho_head"] for r in straight_run.ckpt["history"]] == [0.05, 0.0, 0.0]


def test_the_last_epoch_at_lr_0_changes_only_the_batchnorm_statistics(straight_run):
    before = straight_run.steps[2 * RUN_STEPS].state  # at the first step of epoch 3
    after = torch.load(straight_run.out / "model.pt", map_location="cpu", weights_only=True)
    names = dict(sm.build_model("resnet8", 10).named_parameters())
    for k, v in after.items():
        if k in names:
            assert torch.equal(v, before[k]), k
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])


def test_a_run_prints_its_setting_one_line_per_epoch_and_the_final_and_best_evaluations(straight_run):
    lines = straight_run.stdout.split("\n")
    assert lines[-1] == "" and "\r" not in straight_run.stdout  # not a terminal: no progress line
    lines = lines[:-1]
    assert len(lines) == 1 + 3 + 3
    assert lines[0].startswith("synthetic IF 10: 159 train images, 10 classes, 4 tail (n < 10); "
                               "resnet8 0.08 M params; ssesam + CE; device cpu, fp32, torch threads 1")
    for line, row in zip(lines[1:4], straight_run.ckpt["history"]):
        test = (" --" if "avg" not in row else  # evaluated every 2nd epoch and the last; no class is few
                f"avg {row['avg']:5.1f} many {row['many']:5.1f} med {row['med']:5.1f} few   -- ")
        assert re.fullmatch(
            rf"epoch {row['epoch']:3d}/3 lr {row['lr']:.5f} rho_h {row['rho_head']:.3f} rho_t 0.100 "
            rf"loss {row['loss']:.4f} train {row['train_acc']:5.1f} \| test {re.escape(test)} \| "
            r"[\d.]+s, [\d.]+m left", line), line
    final, best = straight_run.summary["final"], straight_run.summary["best"]
    assert lines[4].startswith(f"final (epoch 3): avg {final['avg']:5.1f} many {final['many']:5.1f}")
    assert f"| flip-TTA avg {final['avg_tta']:5.1f}" in lines[4]
    assert lines[5].startswith(f"best of the evaluations at epochs 10, 20, ... and the last (epoch "
                               f"{best['epoch']}, chosen on the test set, optimistic): "
                               f"avg {best['avg']:5.1f}")
    assert re.fullmatch(r"[\d.]+s on cpu", lines[6])


def test_a_run_writes_metrics_per_evaluated_epoch_summary_model_and_last_pt(straight_run):
    out = straight_run.out
    assert sorted(os.listdir(out)) == ["last.pt", "metrics.jsonl", "model.pt", "summary.json"]
    history = straight_run.ckpt["history"]
    with open(out / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["epoch"] for r in rows] == [2, 3] and rows == [r for r in history if "avg" in r]
    with open(out / "summary.json") as fh:
        saved = json.load(fh)
    assert saved == straight_run.summary  # what main() returns
    assert saved["config"] == dataclasses.asdict(sm.parse_config(RUN + ["--out", str(out)]))
    keys = ("epoch", "avg", "many", "med", "few", "avg_tta", "many_tta", "med_tta", "few_tta")
    assert saved["final"] == {k: rows[-1][k] for k in keys}
    assert saved["best"] == {k: rows[-1][k] for k in keys}  # 3 epochs: no 10th, so the last
    assert saved["best_chosen_from"] == [3]
    assert (saved["device"], saved["torch"]) == ("cpu", torch.__version__)
    assert saved["params"] == sum(p.numel() for p in sm.build_model("resnet8", 10).parameters())
    assert straight_run.ckpt["epoch"] == 3 and straight_run.ckpt["optimizer"]["k"] == 3


def test_best_is_the_top_plain_avg_at_epochs_10_20_and_the_last_which_are_evaluated_whatever_print_freq(
        tmp_path, monkeypatch, capsys):
    # 25 epochs, --print_freq 7: evaluated at 7, 14, 21 (print_freq) and 10, 20, 25 (always); "best"
    # from 10, 20 and 25 only, by plain Avg: neither 21's higher Avg nor 25's higher TTA Avg counts
    avg = {7: 50.0, 10: 40.0, 14: 90.0, 20: 60.0, 21: 95.0, 25: 55.0}
    tta = {**{e: a + 1 for e, a in avg.items()}, 25: 99.0}
    done = []

    def no_training(cfg, epoch, *a):  # the row run_epoch returns, without the epoch's steps
        done.append(epoch + 1)
        return {"epoch": epoch + 1, "lr": 0.0, "rho_head": 0.0, "rho_tail": 0.0, "loss": 1.0,
                "train_acc": 0.0}

    def scores(*a):  # a KeyError for an epoch that should not be evaluated
        e = done[-1]
        return {"avg": avg[e], "many": avg[e], "med": avg[e], "few": None,
                "avg_tta": tta[e], "many_tta": tta[e], "med_tta": tta[e], "few_tta": None}

    monkeypatch.setattr(sm, "run_epoch", no_training)
    monkeypatch.setattr(sm, "evaluate", scores)
    monkeypatch.setattr(sm, "data_counts", small_synthetic)
    out = tmp_path / "out"
    summary = sm.main(["--dataset", "synthetic", "--imb_factor", "10", "--arch", "resnet8", "--opt", "sgd",
                       "--epochs", "25", "--print_freq", "7", "--device", "cpu", "--out", str(out)])
    with open(out / "metrics.jsonl") as fh:
        rows = {r["epoch"]: r for r in map(json.loads, fh)}
    assert list(rows) == [7, 10, 14, 20, 21, 25]  # every evaluation is logged
    assert summary["best_chosen_from"] == [10, 20, 25]
    want = max((rows[e] for e in (10, 20, 25)), key=lambda r: r["avg"])
    assert want["epoch"] == 20 and summary["best"] == {k: want[k] for k in summary["best"]}
    assert "best of the evaluations at epochs 10, 20, ... and the last (epoch 20," in capsys.readouterr().out
    # a tie goes to the earliest evaluation, as the official code keeps the first best checkpoint
    tied = [{**rows[e], "avg": 60.0} for e in (7, 10, 14, 20, 21, 25)]
    assert sm.best_of(tied, 25)["epoch"] == 10


def test_summary_and_last_pt_record_where_the_run_ran_its_precision_threads_cpu_and_commit(straight_run):
    with open("/proc/cpuinfo") as fh:  # the first processor's lines, read the obvious way
        lines = [line.split(":", 1) for line in fh.read().split("\n\n")[0].splitlines()]
    info = {k.strip(): v.strip() for k, v in lines}
    cpu = {"name": info["model name"], "vendor": info["vendor_id"], "family": info["cpu family"],
           "model": info["model"], "amx": "amx_bf16" in info["flags"].split(),
           "avx512_bf16": "avx512_bf16" in info["flags"].split()}
    git = lambda *a: subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "HEAD") + ("+modified" if git("status", "--porcelain", "ssesam_minimal.py") else "")
    where = {"device": "cpu", "device_name": "cpu", "precision": "fp32", "cpu": cpu, "threads": 1,
             "commit": commit or "unknown", "torch": torch.__version__}
    assert {k: straight_run.summary[k] for k in where} == where
    assert straight_run.summary["pieces"] == straight_run.ckpt["pieces"] == [{**where, "epochs": [1, 3]}]


def test_model_pt_reproduces_the_final_evaluation(straight_run, monkeypatch):
    monkeypatch.setattr(sm, "data_counts", small_synthetic)
    *_, x_test, y_test, counts, n_max = sm.load_data("synthetic", imb_factor=10.0)
    model = sm.build_model("resnet8", 10).to(memory_format=torch.channels_last)  # as train() keeps it
    model.load_state_dict(torch.load(straight_run.out / "model.pt", map_location="cpu", weights_only=True))
    r = sm.evaluate(model, x_test, y_test, counts, n_max)
    assert r == {k: v for k, v in straight_run.summary["final"].items() if k != "epoch"}


# ---- last.pt: atomic writes, interruption, resume, divergence

def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    sm._atomic_write(path, {"epoch": 1})

    def save_half_then_fail(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        sm._atomic_write(path, {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]


def same(a, b):
    """a == b, tensors bit for bit, through dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return a == b


def run_outputs(out):
    """Everything a run leaves in out, without its timings and config: model.pt, metrics.jsonl,
    summary.json and last.pt (weights, momentum, SSE-SAM's epoch count, DRW weights, generator)."""
    untimed = lambda row: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
    with open(out / "metrics.jsonl") as fh:
        rows = [untimed(json.loads(line)) for line in fh]
    with open(out / "summary.json") as fh:
        summary = {k: v for k, v in json.load(fh).items() if k not in ("seconds", "config", "pieces")}
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    ckpt = {k: v for k, v in ckpt.items() if k not in ("seconds", "config", "pieces")}
    ckpt["history"], ckpt["best"] = [untimed(row) for row in ckpt["history"]], untimed(ckpt["best"])
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True), rows, summary, ckpt


@pytest.mark.parametrize("when", ["during", "after"])
def test_a_run_stopped_by_sigterm_and_resumed_ends_bit_for_bit_like_the_straight_run(
        when, straight_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sm, "data_counts", small_synthetic)
    out = tmp_path / "out"
    args = RUN + ["--out", str(out)]
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        if when == "during":  # in the 2nd step of epoch 2: last.pt holds epoch 1
            step, where = sm.STEPS["ssesam"], "during epoch 2"

            def interrupted(*a):
                calls.append(1)
                if len(calls) == RUN_STEPS + 2:
                    os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
                return step(*a)
            mp.setitem(sm.STEPS, "ssesam", interrupted)
        else:  # while epoch 1's last.pt is made: the signal waits until it is written
            checkpoint, where = sm._checkpoint, "after epoch 1"

            def interrupted(*a):
                calls.append(1)
                if len(calls) == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                return checkpoint(*a)
            mp.setattr(sm, "_checkpoint", interrupted)
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(SystemExit) as exc:
            sm.main(args)
    assert exc.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines() == [
        f"ssesam_minimal.py: interrupted by SIGTERM {where}; {out / 'last.pt'} holds epoch 1 of 3; "
        f"continue with --resume"]
    assert signal.getsignal(signal.SIGTERM) is handler  # main() put its handler back
    assert os.listdir(out) == ["last.pt"]  # nothing half-written
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["optimizer"]["k"] == 1 and len(ckpt["history"]) == 1
    # the same command without --resume does not overwrite the unfinished run
    line = expect_usage_exit(args, capsys)
    assert "holds an unfinished run (epoch 1 of 3)" in line and "--resume" in line
    sm.main(args + ["--resume"])
    for a, b in zip(run_outputs(straight_run.out), run_outputs(out)):
        assert same(a, b)


def stopped_in_epoch_2(args, monkeypatch, opt="ssesam"):
    """sm.main(args) stopped by SIGTERM in the 2nd step of epoch 2: last.pt holds epoch 1."""
    step, calls = sm.STEPS[opt], []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == RUN_STEPS + 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(*a)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sm.STEPS, opt, interrupted)
        with pytest.raises(SystemExit) as exc:
            sm.main(args)
    assert exc.value.code == 128 + signal.SIGTERM


def test_a_cpu_bf16_run_stopped_and_resumed_at_the_same_thread_count_ends_bit_for_bit_like_its_straight_run(
        tmp_path, monkeypatch, one_torch_thread, capsys):
    monkeypatch.setattr(sm, "data_counts", small_synthetic)
    args = RUN + ["--bf16"]
    sm.main(args + ["--out", str(tmp_path / "straight")])
    stopped_in_epoch_2(args + ["--out", str(tmp_path / "out")], monkeypatch)
    capsys.readouterr()
    sm.main(args + ["--out", str(tmp_path / "out"), "--resume"])
    assert "warning" not in capsys.readouterr().err  # the same CPU and thread count: no warning
    for a, b in zip(run_outputs(tmp_path / "straight"), run_outputs(tmp_path / "out")):
        assert same(a, b)
    with open(tmp_path / "out" / "summary.json") as fh:
        pieces = json.load(fh)["pieces"]
    assert [p["epochs"] for p in pieces] == [[1, 1], [2, 3]]
    assert {p["precision"] for p in pieces} == {"bf16"} and {p["threads"] for p in pieces} == {1}


RESUME_ELSEWHERE = {  # what the last piece ran on, changed, and what the warning names
    "threads": ({"threads": 7}, "7 threads"),
    "cpu": ({"cpu": {"name": "Other CPU", "vendor": "x", "family": "1", "model": "999", "amx": False,
                     "avx512_bf16": False}}, "Other CPU (family 1 model 999)"),
    "device": ({"device": "cuda:0"}, "cuda:0"),
    "precision": ({"precision": "bf16"}, "bf16"),
    "an earlier piece only": ({}, None),  # the first piece ran elsewhere, the last one here
}


@pytest.mark.parametrize("changed", list(RESUME_ELSEWHERE))
def test_a_resume_where_the_last_piece_did_not_run_says_so_in_one_line_and_goes_on(
        changed, straight_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(straight_run.out, out)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    change, named = RESUME_ELSEWHERE[changed]
    if named is None:
        ckpt["pieces"] = [{**ckpt["pieces"][0], **RESUME_ELSEWHERE["cpu"][0]}, ckpt["pieces"][0]]
    ckpt["pieces"][-1].update(change)
    torch.save(ckpt, out / "last.pt")
    monkeypatch.setattr(sm, "data_counts", small_synthetic)
    summary = sm.main(RUN + ["--out", str(out), "--resume"])  # finished: resumes, trains nothing
    err = capsys.readouterr().err.splitlines()
    assert summary["final"] == straight_run.summary["final"]
    assert len(summary["pieces"]) == len(ckpt["pieces"]) + 1
    if named is None:
        assert err == []
        return
    assert len(err) == 1 and err[0].startswith("warning: ") and "will not be bit for bit" in err[0]
    assert named in err[0].split("the last one ran on ")[1]


def test_a_class_with_exactly_eta_images_is_head_in_the_masks_the_steps_receive(tmp_path, monkeypatch,
                                                                               one_torch_thread):
    monkeypatch.setattr(sm, "data_counts", small_synthetic)
    counts = small_synthetic("synthetic", 10.0)[0]  # 40, 30, 23, 18, 14, 11, 8, ...
    eta = 14
    assert eta in counts
    masks = []

    def recording(step, model, opt):
        def recorded(model, criterion, opt, x, y, tail, *rest):
            masks.append((y.clone(), tail.clone()))
            return step(model, criterion, opt, x, y, tail, *rest)
        return recorded

    sm.main(["--dataset", "synthetic", "--imb_factor", "10", "--eta", str(eta), "--arch", "resnet8",
             "--epochs", "1", "--device", "cpu"], wrap_step=recording)
    assert len(masks) == RUN_STEPS
    for y, tail in masks:  # tail iff n_c < η, so the class with n_c = η is head
        assert torch.equal(tail, torch.tensor([counts[c] < eta for c in y.tolist()]))
    y_all = torch.cat([y for y, _ in masks])
    assert not torch.cat([t for _, t in masks])[y_all == counts.index(eta)].any()


def test_resume_with_other_settings_exits_2_naming_each_and_run_only_settings_may_change(
        straight_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(straight_run.out, out)
    args = RUN + ["--out", str(out), "--resume"]
    line = expect_usage_exit(args + ["--lr", "0.1", "--opt", "sam"], capsys)
    assert "--lr 0.1 (last.pt: 0.5)" in line and "--opt sam (last.pt: ssesam)" in line
    assert line.count("(last.pt: ") == 2
    # where and how often it reports may change: this resumes (a finished run: nothing to train)
    monkeypatch.setattr(sm, "data_counts", small_synthetic)
    summary = sm.main(args + ["--print_freq", "3", "--test_batch_size", "7"])
    assert summary["final"] == straight_run.summary["final"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign"])
def test_a_damaged_last_pt_exits_2_with_one_line_naming_it(straight_run, damage, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(straight_run.out, out)
    path = out / "last.pt"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"model": {}}, path)  # a torch file, but not a checkpoint of this module
    line = expect_usage_exit(RUN + ["--out", str(out), "--resume"], capsys)
    assert str(path) in line and "delete it to start afresh" in line


def test_resume_without_a_last_pt_or_without_out_exits_2(tmp_path, capsys):
    line = expect_usage_exit(RUN + ["--out", str(tmp_path), "--resume"], capsys)
    assert f"there is no {tmp_path / 'last.pt'} to continue" in line
    assert "--resume needs --out" in expect_usage_exit(RUN + ["--resume"], capsys)
    assert os.listdir(tmp_path) == []


def test_a_diverging_lr_stops_with_one_line_exit_1_and_last_pt_the_last_good_epoch(tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(sm, "data_counts", small_synthetic)
    out = tmp_path / "out"
    args = ["--dataset", "synthetic", "--imb_factor", "10", "--arch", "resnet8", "--epochs", "4",
            "--opt", "sgd", "--batch_size", "16", "--save_every", "2", "--print_freq", "4", "--out", str(out)]
    steps = math.ceil(159 / 16)  # 10 per epoch
    # epochs 1-2 at a sane lr, then lr 1e12: the weights overflow within a few steps of epoch 3
    monkeypatch.setattr(sm, "lr_at", lambda epoch, cfg: 0.05 if epoch < 2 else 1e12)
    saved, finite = [], []
    checkpoint, step = sm._checkpoint, sm.STEPS["sgd"]

    def recording_checkpoint(cfg, epoch, net, *a):
        saved.append(copy.deepcopy(net.state_dict()))  # the weights of each epoch written
        return checkpoint(cfg, epoch, net, *a)

    def recording_step(*a):
        logits, loss_i = step(*a)
        finite.append(bool(torch.isfinite(loss_i.sum())))
        return logits, loss_i

    monkeypatch.setattr(sm, "_checkpoint", recording_checkpoint)
    monkeypatch.setitem(sm.STEPS, "sgd", recording_step)
    with pytest.raises(SystemExit) as exc:
        sm.main(args)
    assert exc.value.code == 1
    bad = finite.index(False)  # the first step whose loss was not finite, counted here
    assert 2 * steps <= bad < 3 * steps and len(finite) == 3 * steps  # in epoch 3, which then ends
    assert capsys.readouterr().err.splitlines() == [
        f"ssesam_minimal.py: non-finite training loss at epoch 3, step {bad - 2 * steps + 1} of {steps} "
        f"(lr 1e+12); {out / 'last.pt'} holds epoch 2 of 4; continue with --resume"]
    assert len(saved) == 1  # --save_every 2: epoch 2 only; the diverged epoch never
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and same(ckpt["model"], saved[0])
    assert os.listdir(out) == ["last.pt"]


def test_ctrl_c_in_a_real_process_exits_130_with_one_line_and_keeps_the_last_epoch(tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-u", "ssesam_minimal.py", "--dataset", "synthetic", "--imb_factor", "100",
            "--arch", "resnet8", "--epochs", "50", "--opt", "sgd", "--print_freq", "50", "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # once epoch 1's line is printed, its last.pt is on disk
        next((line for line in proc.stdout if line.startswith("epoch   1/50")), None)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    # after an epoch (or while its last.pt is written) that epoch is kept; during one, the one before
    m = re.fullmatch(r"ssesam_minimal.py: interrupted by SIGINT (during|after) epoch (\d+); .*last.pt "
                     r"holds epoch (\d+) of 50; continue with --resume\n", err)
    assert m and int(m[3]) == int(m[2]) - (m[1] == "during") >= 1, err
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == int(m[3]) and len(ckpt["history"]) == int(m[3])
    assert os.listdir(out) == ["last.pt"]


# =============================================================================================
# 10. Command line
# =============================================================================================

def _base_type(t):
    """Optional[X] -> X."""
    if typing.get_origin(t) is typing.Union:
        return next(a for a in typing.get_args(t) if a is not type(None))
    return t


def test_help_lists_every_config_field_as_a_flag_with_its_default_in_config_order(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exc:
        sm.main(["--help"])
    assert exc.value.code in (0, None)
    text = capsys.readouterr().out
    m = re.search(r"^(options|optional arguments):$", text, re.M)
    assert m, text
    body = " ".join(text[m.end():].split())  # the option list, whitespace-normalised
    fields = dataclasses.fields(sm.Config)
    starts, pos = [], 0
    for f in fields:
        found = re.compile(rf"--{f.name}[ ,]").search(body, pos)
        assert found, f"--{f.name} missing from --help"
        starts.append(found.start())
        pos = found.start() + 1
    for f, a, b in zip(fields, starts, starts[1:] + [len(body)]):
        entry = body[a:b]
        assert f"(default: {f.default})" in entry, (f.name, entry)
        if f.metadata["choices"]:
            assert "{" + ",".join(f.metadata["choices"]) + "}" in entry, (f.name, entry)


def test_parse_config_without_flags_gives_the_config_defaults():
    assert sm.parse_config([]) == sm.Config()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(sm.Config)])
def test_every_config_field_is_a_flag_that_parses_a_value_of_its_type(field, tmp_path):
    f = {f.name: f for f in dataclasses.fields(sm.Config)}[field]
    typ = _base_type(f.type)
    parse = lambda *argv: getattr(sm.build_parser().parse_args(list(argv)), field)  # noqa: E731
    if typ is bool:  # a switch: --name on, and --no-name off where it is on or unset by default
        assert parse(f"--{field}") is True
        if f.default is not False:
            assert parse(f"--no-{field}") is False
        assert parse() is f.default
        return
    if f.metadata["choices"]:
        text = value = f.metadata["choices"][-1]
    elif typ is int:
        text, value = "7", 7
    elif typ is float:
        text, value = "0.25", 0.25
    else:
        assert typ is str
        text = value = str(tmp_path / "somewhere")
    got = parse(f"--{field}", text)
    assert got == value and type(got) is type(value)


BAD_INPUTS = [  # (flags, what the one line must contain: the flag, and the value or the reason)
    (["--imb_factor", "0.01"], ["--imb_factor", "0.01 means 100 here"]),
    (["--imb_factor", "0.5"], ["--imb_factor", "0.5"]),
    (["--imb_factor", "1000"], ["--imb_factor 1000", "no training image"]),  # synthetic: 200 per class
    (["--gamma", "1.0"], ["--gamma", "1.0"]),
    (["--gamma", "-0.1"], ["--gamma", "-0.1"]),
    (["--rho", "nan"], ["--rho", "nan"]),
    (["--head_rho", "-0.1"], ["--head_rho", "-0.1"]),
    (["--tail_rho", "-0.1"], ["--tail_rho", "-0.1"]),
    (["--lr", "-0.1"], ["--lr", "-0.1"]),
    (["--momentum", "-0.5"], ["--momentum", "-0.5"]),
    (["--wd", "-0.001"], ["--wd", "-0.001"]),
    (["--tau", "-1"], ["--tau", "-1"]),
    (["--vs_gamma", "-1"], ["--vs_gamma", "-1"]),
    (["--ldam_max_m", "-0.5"], ["--ldam_max_m", "-0.5"]),
    (["--ldam_s", "-1"], ["--ldam_s", "-1"]),
    (["--eta", "0"], ["--eta", "0"]),
    (["--epochs", "0"], ["--epochs", "0"]),
    (["--batch_size", "0"], ["--batch_size", "0"]),
    (["--print_freq", "0"], ["--print_freq", "0"]),
    (["--test_batch_size", "0"], ["--test_batch_size", "0"]),
    (["--save_every", "0"], ["--save_every", "0"]),
    (["--drw_epoch", "-1"], ["--drw_epoch", "-1"]),
    (["--opt", "adam"], ["--opt", "adam"]),
    (["--loss", "foo"], ["--loss", "foo"]),
    (["--dataset", "mnist"], ["--dataset", "mnist"]),
    (["--arch", "resnet99"], ["--arch", "resnet99"]),
    (["--imbsam_weight", "mean"], ["--imbsam_weight", "mean"]),
    (["--epochs", "two"], ["--epochs", "two"]),
    (["--device", "tpu"], ["--device tpu"]),
]


@pytest.mark.parametrize("flags,needles", BAD_INPUTS, ids=[" ".join(b[0]) for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_naming_the_flag_and_writes_nothing(flags, needles, tmp_path,
                                                                            capsys):
    argv = ["--dataset", "synthetic", "--data_dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    line = expect_usage_exit(argv + flags, capsys)
    assert all(n in line for n in needles), line
    assert os.listdir(tmp_path) == []


def test_out_that_is_an_existing_file_exits_2_and_leaves_the_file(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert "--out" in expect_usage_exit(["--dataset", "synthetic", "--out", str(out)], capsys)
    assert out.read_text() == "not a folder"


def test_gpu_without_cuda_runs_on_the_cpu_with_one_warning_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sm.resolve_device(sm.parse_config(["--gpu", "0"])) == torch.device("cpu")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: ") and "--gpu 0" in line and "CPU" in line


@pytest.mark.parametrize("argv,needle", [(["--gpu", "3"], "--gpu 3: no such CUDA device (1 visible)"),
                                         (["--device", "cuda:5"], "--device cuda:5: no such CUDA device"),
                                         (["--device", "cuda"], "--device cuda: no such CUDA device (0 visible)")])
def test_a_cuda_device_that_does_not_exist_exits_2(argv, needle, monkeypatch, capsys):
    visible = 0 if argv == ["--device", "cuda"] else 1  # no CUDA at all, or one GPU (index 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert needle in expect_usage_exit(["--dataset", "synthetic"] + argv, capsys)


def test_every_ssesam_minimal_command_in_the_readme_parses():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        text = fh.read().replace("\n", " ")
    commands = re.findall(r"python ssesam_minimal\.py((?: --?[\w.]+(?: [\w.]+)?)*)", text)
    assert len(commands) >= 3  # the main command, the seed command, the smoke run
    for args in (a for a in commands if "--help" not in a):
        sm.parse_config(args.split())


def test_the_readme_and_the_module_docstring_give_one_quick_command_whose_run_switches_inside_it():
    quick = r"python ssesam_minimal\.py --dataset synthetic[^\n`]*"
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        readme = [c.strip() for c in re.findall(quick, fh.read())]
    doc = [c.strip() for c in re.findall(quick, sm.__doc__)]
    assert len(readme) == len(doc) == 1 and readme == doc, (readme, doc)
    cfg = sm.parse_config(doc[0].split()[2:])
    model = nn.Linear(2, 2)
    switch = sm.SSESAM(torch.optim.SGD(model.parameters(), lr=0.1), model, cfg.head_rho, cfg.tail_rho,
                       cfg.gamma, cfg.epochs).cut
    assert cfg.opt == "ssesam" and 0 < switch < cfg.epochs and cfg.epochs <= 5  # both stages, in seconds
    # no speed figure in the docstring: the ones that say on what and with which code are elsewhere
    assert not re.search(r"\d\s*(s|ms|min)\b|H200", sm.__doc__)


# =============================================================================================
# 11. README: SSE-SAM in your own training loop
# =============================================================================================

def test_the_readme_own_loop_example_runs_as_written_and_switches_after_gamma_t_epochs(readme_example_run):
    # T 2: the cosine schedule, stepped after each epoch, halves the lr for the second
    assert readme_example_run.printed.splitlines() == ["epoch 0: lr 0.0100, rho_head 0.05",
                                                       "epoch 1: lr 0.0050, rho_head 0.0"]
    scope = readme_example_run.scope
    assert scope["opt"].k == 2 and scope["loss_i"].shape == scope["y"].shape  # one loss per sample


# ---- What the README, results/README.md and the notebook quote of the committed runs

RESULTS = os.path.join(REPO, "results", "resnet32")
ROW_NAMES = {"sgd": "SGD", "sam": "SAM", "imbsam": "ImbSAM", "ssesam": "SSE-SAM"}


def committed_runs():
    """{(opt, precision): {seed: summary.json}} of the committed ResNet-32 runs."""
    runs = {}
    for name in sorted(os.listdir(RESULTS)):
        path = os.path.join(RESULTS, name, "summary.json")
        if os.path.isfile(path):
            with open(path) as fh:
                s = json.load(fh)
            runs.setdefault((s["config"]["opt"], s["precision"]), {})[s["config"]["seed"]] = s
    return runs


def results_table_blocks():
    """What scripts/results_table.py prints for the committed runs: its tables and its sentences."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "results_table.py"), RESULTS],
                       capture_output=True, text=True, check=True)
    blocks = [block.strip("\n") for block in r.stdout.split("\n\n") if block.startswith(("|", "- "))]
    assert len(blocks) == 5 and blocks[-1].startswith("- ")  # four tables and what they show
    return blocks


def mean_std(values):  # as the README quotes a row: the mean, ± the sample std from two seeds on
    return f"{np.mean(values):.1f}" + (f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else "")


def test_the_readme_quotes_the_last_epoch_avg_of_the_committed_runs_and_of_the_fp32_control():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        section = fh.read().split("\n## Results\n")[1].split("\n## ")[0]
    runs = committed_runs()
    quoted = {}
    for name, value in re.findall(r"(SSE-SAM|ImbSAM|SAM|SGD) (\d+\.\d(?: ± \d+\.\d)?)", section):
        quoted.setdefault(name, value)  # the first number after each row's name
    # the seeds every row has: the line compares the rows on the same seeds
    seeds = sorted(set.intersection(*(set(runs[(opt, "bf16")]) for opt in ROW_NAMES)))
    for opt, name in ROW_NAMES.items():
        assert quoted[name] == mean_std([runs[(opt, "bf16")][k]["final"]["avg"] for k in seeds]), name
    assert ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds)) in section
    control = mean_std([s["final"]["avg"] for s in runs[("sgd", "fp32")].values()])
    assert f"in fp32 ends at {control}" in section.replace("\n", " ")


def test_results_readme_holds_what_results_table_py_prints_for_the_committed_runs():
    with open(os.path.join(REPO, "results", "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    assert [block.splitlines()[0] for block in results_table_blocks() if block not in text] == []


def script_tables(tool):
    """What scripts/<tool>.py (saddle or spectrum) prints for the committed <tool>.json: its blocks."""
    spec = importlib.util.spec_from_file_location(tool, os.path.join(REPO, "scripts", f"{tool}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(os.path.join(RESULTS, f"{tool}.json")) as fh:
        return module.tables(json.load(fh))


@pytest.mark.parametrize("tool", ["saddle", "spectrum"])
def test_results_readme_holds_what_saddle_py_and_spectrum_py_print_for_their_committed_json(tool):
    with open(os.path.join(REPO, "results", "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    assert [block.splitlines()[0] for block in script_tables(tool) if block not in text] == []


# =============================================================================================
# 12. Tutorial notebook
# =============================================================================================

NOTEBOOK = os.path.join(REPO, "tutorial.ipynb")
CELL_ID = re.compile(r"s[0-9]-[a-z0-9]+(-[a-z0-9]+)*")  # section number, then a slug


def test_notebook_is_valid_small_has_readable_stable_cell_ids_and_the_outputs_of_a_real_run():
    nbformat = pytest.importorskip("nbformat")
    assert os.path.getsize(NOTEBOOK) < 2 * 1024 * 1024
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    ids = [cell.id for cell in nb.cells]
    assert len(set(ids)) == len(ids)
    assert all(CELL_ID.fullmatch(i) for i in ids), ids  # chosen names, not random uuids
    # the ids survive a write and a read, and the file is what nbformat writes (no hand edits)
    text = nbformat.writes(nb)
    assert [cell.id for cell in nbformat.reads(text, as_version=4).cells] == ids
    with open(NOTEBOOK, encoding="utf-8") as fh:
        assert fh.read().rstrip("\n") == text.rstrip("\n")
    # outputs of one run, top to bottom, without errors, with its plots
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 6
    settings = "".join(o.get("text", "") for o in next(c for c in code if c.id == "s0-settings").outputs)
    assert settings.startswith("settings: noisy8x8, IF 100, resnet8, 10 epochs")  # the defaults, not quick mode


def test_the_notebooks_saved_section_8_shows_the_committed_runs_as_they_are_now():
    nbformat = pytest.importorskip("nbformat")
    cells = {cell.id: cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells}
    shown = "".join(o.get("text", "") for o in cells["s8-results"].outputs)
    blocks = results_table_blocks() + script_tables("saddle") + script_tables("spectrum")
    assert [block.splitlines()[0] for block in blocks if block not in shown] == []


def test_the_notebooks_notes_quote_only_numbers_that_the_saved_outputs_of_their_section_show():
    # a note on a run's outputs goes stale when the cells run again elsewhere (another CPU draws
    # other batches' rounding): each decimal it quotes must be in its section's saved outputs
    nbformat = pytest.importorskip("nbformat")
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    notes = [cell for cell in cells if cell.id.endswith("-note-md")]
    assert {cell.id for cell in notes} >= {"s6-note-md", "s7-note-md"}
    for note in notes:
        section = note.id.split("-")[0] + "-"
        shown = "".join(o.get("text", "") for cell in cells if cell.cell_type == "code"
                        and cell.id.startswith(section) for o in cell.outputs)
        missing = [q for q in re.findall(r"\d+\.\d+", note.source) if q not in re.findall(r"\d+\.\d+", shown)]
        assert not missing, (note.id, missing)


def test_notebook_runs_top_to_bottom_in_quick_mode(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("SSESAM_TUTORIAL_QUICK", "1")  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # run from scratch, not on the saved outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": REPO}}).execute()  # raises on any error
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    settings = "".join(o.get("text", "") for o in code[0].outputs)
    assert settings.startswith("quick mode: noisy8x8"), settings
