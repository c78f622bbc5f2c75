"""Tests for ssesam_minimal.py. Each re-derives its result the obvious way and compares.

CPU only, no network, no real CIFAR: where CIFAR files are needed they are written small, in the
real pickle layout, into a temporary folder.
"""

import copy
import dataclasses
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
from fractions import Fraction

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


# =============================================================================================
# Fixtures and helpers
# =============================================================================================

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every download attempt fails at once, as on a machine without network; calls are recorded."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise OSError("no network")

    monkeypatch.setattr(sm.torchvision.datasets.utils, "download_and_extract_archive", refuse)
    return calls


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Train with one intra-op thread. ResNet-8 on 32 x 32 images gains little from a second
    thread, and on a busy 2-core machine two OpenMP threads were measured ~10x slower than one
    (11.5 s against 1.2 s for the same 1-epoch run). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_pickle(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def random_rows(rng, n):
    """n CIFAR rows: uint8 (n, 3072), 1024 red, then green, then blue values, each row-major 32x32."""
    return rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)


def write_cifar100(root, train_data, train_labels, test_data, test_labels):
    """cifar-100-python/{train,test,meta} in the layout of the official archive."""
    folder = os.path.join(root, "cifar-100-python")
    for name, data, labels in (("train", train_data, train_labels), ("test", test_data, test_labels)):
        write_pickle(os.path.join(folder, name), {
            "filenames": [f"img_{i}.png" for i in range(len(labels))],
            "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": [int(v) for v in labels],
            "coarse_labels": [int(v) // 5 for v in labels],
            "data": data,
        })
    write_pickle(os.path.join(folder, "meta"), {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return folder


def write_cifar10(root, train_data, train_labels, test_data, test_labels):
    """cifar-10-batches-py/data_batch_1..5, test_batch and batches.meta."""
    folder = os.path.join(root, "cifar-10-batches-py")
    parts = np.array_split(np.arange(len(train_labels)), 5)
    for k, part in enumerate(parts, start=1):
        write_pickle(os.path.join(folder, f"data_batch_{k}"), {
            "batch_label": f"training batch {k} of 5", "labels": [int(v) for v in train_labels[part]],
            "data": train_data[part], "filenames": [f"img_{i}.png" for i in part]})
    write_pickle(os.path.join(folder, "test_batch"), {
        "batch_label": "testing batch 1 of 1", "labels": [int(v) for v in test_labels],
        "data": test_data, "filenames": [f"t_{i}.png" for i in range(len(test_labels))]})
    write_pickle(os.path.join(folder, "batches.meta"),
                 {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 10000,
                  "num_vis": 3072})
    return folder


def first_n_per_class(labels, counts):
    """Reference subset: the first counts[c] indices of each class c in file order, class by class."""
    out = []
    for c, n in enumerate(counts):
        taken = []
        for i, label in enumerate(labels):
            if label == c and len(taken) < n:
                taken.append(i)
        out.extend(taken)
    return np.array(out, dtype=np.int64)


def ldam_subset(labels, counts, seed):
    """LDAM-DRW's IMBALANCECIFAR: np.random.seed(s); per class: where, shuffle, take the first n."""
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


def expect_usage_exit(argv, capsys, main=None, prog="ssesam_minimal.py"):
    """main(argv) (default: sm.main) must exit with code 2 and print exactly one line, starting
    '<prog>: error: ', and no traceback."""
    with pytest.raises(SystemExit) as exc:
        (main or sm.main)(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), \
        f"expected one stderr line, got {err!r}"
    assert "Traceback" not in err
    return lines[0]


# =============================================================================================
# 1. Long-tailed class counts
# =============================================================================================

def exact_floor_counts(n_max, num_classes, imb_factor):
    """floor(n_max / IF^(i/(C-1))) in exact integer arithmetic: the largest n with
    n^(C-1) * IF^i <= n_max^(C-1), found by bisection (no floating point at all)."""
    C, IF = num_classes, Fraction(imb_factor)
    out = []
    for i in range(C):
        bound = Fraction(n_max) ** (C - 1)
        lo, hi = 0, n_max                       # invariant: lo satisfies, hi + 1 does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if Fraction(mid) ** (C - 1) * IF ** i <= bound:
                lo = mid
            else:
                hi = mid - 1
        out.append(lo)
    return out


def test_lt_class_counts_cifar100_if100_is_the_published_list_totalling_10847():
    counts = sm.lt_class_counts(500, 100, 100)
    assert counts == CIFAR100_IF100
    assert sum(counts) == 10847


def test_lt_class_counts_cifar10_if100_is_the_published_list_totalling_12406():
    counts = sm.lt_class_counts(5000, 10, 100)
    assert counts == CIFAR10_IF100
    assert sum(counts) == 12406


@pytest.mark.parametrize("n_max,num_classes", [(5000, 10), (500, 100)])
@pytest.mark.parametrize("imb_factor", [1, 10, 50, 100, 200])
def test_lt_class_counts_equal_exact_floor_and_ldam_reciprocal_convention(n_max, num_classes, imb_factor):
    got = sm.lt_class_counts(n_max, num_classes, imb_factor)
    exact = exact_floor_counts(n_max, num_classes, imb_factor)
    ldam = [int(n_max * (1 / imb_factor) ** (i / (num_classes - 1))) for i in range(num_classes)]
    assert got == exact
    assert got == ldam
    assert got[0] == n_max and got[-1] == math.floor(n_max / imb_factor)


def test_lt_class_counts_accepts_float_imb_factor_from_the_cli():
    # the CLI parses --imb_factor as float: 100.0 must give the same list as 100
    assert sm.lt_class_counts(500, 100, 100.0) == CIFAR100_IF100


# =============================================================================================
# 2. Long-tailed subsets
# =============================================================================================

@pytest.fixture
def pool_labels():
    """500 labels, 50 per class, shuffled like CIFAR's file order."""
    return np.random.RandomState(0).permutation(np.repeat(np.arange(10), 50))


def test_lt_indices_default_takes_first_n_of_each_class_in_file_order(pool_labels):
    counts = sm.lt_class_counts(50, 10, 10)
    got = sm.lt_indices(pool_labels, counts)
    np.testing.assert_array_equal(got, first_n_per_class(list(pool_labels), counts))


def test_lt_indices_subset_seed_keeps_the_class_counts(pool_labels):
    counts = sm.lt_class_counts(50, 10, 10)
    got = sm.lt_indices(pool_labels, counts, subset_seed=3)
    assert len(np.unique(got)) == len(got) == sum(counts)
    assert np.bincount(pool_labels[got], minlength=10).tolist() == counts


def test_lt_indices_subset_seed_is_deterministic_and_differs_from_file_order(pool_labels):
    counts = sm.lt_class_counts(50, 10, 10)
    a = sm.lt_indices(pool_labels, counts, subset_seed=3)
    b = sm.lt_indices(pool_labels, counts, subset_seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sm.lt_indices(pool_labels, counts))
    assert not np.array_equal(a, sm.lt_indices(pool_labels, counts, subset_seed=4))


@pytest.mark.parametrize("seed", [0, 1, 9826])
def test_lt_indices_subset_seed_equals_ldam_drw_selection(pool_labels, seed):
    counts = sm.lt_class_counts(50, 10, 10)
    np.testing.assert_array_equal(sm.lt_indices(pool_labels, counts, subset_seed=seed),
                                  ldam_subset(pool_labels, counts, seed))


def test_lt_indices_does_not_touch_the_global_numpy_rng(pool_labels):
    state = np.random.get_state()
    try:
        np.random.seed(123)
        expected = np.random.rand()
        np.random.seed(123)
        sm.lt_indices(pool_labels, sm.lt_class_counts(50, 10, 10), subset_seed=5)
        assert np.random.rand() == expected
    finally:
        np.random.set_state(state)


def test_lt_indices_short_class_raises_usage_error_naming_the_class(pool_labels):
    labels = pool_labels.copy()
    labels[np.flatnonzero(labels == 3)[:20]] = 0          # class 3 keeps 30 of 50
    counts = [40] * 10
    with pytest.raises(sm.UsageError, match=r"\bclass 3\b.*\b30\b.*\b40\b"):
        sm.lt_indices(labels, counts)
    with pytest.raises(sm.UsageError, match=r"\bclass 3\b"):
        sm.lt_indices(labels, counts, subset_seed=0)


# =============================================================================================
# 3. Reading CIFAR pickles
# =============================================================================================

@pytest.fixture(scope="module")
def cifar10_pool(tmp_path_factory):
    """A CIFAR-10 folder whose train pool holds, per class, IF-5000 count + 3 images, interleaved."""
    rng = np.random.RandomState(10)
    imb = 5000.0
    counts = sm.lt_class_counts(5000, 10, imb)           # 5000, 1940, ..., 1 (8168 images)
    labels = rng.permutation(np.repeat(np.arange(10), [n + 3 for n in counts]))
    data = random_rows(rng, len(labels))
    test_labels = np.tile(np.arange(10), 5)
    test_data = random_rows(rng, len(test_labels))
    root = str(tmp_path_factory.mktemp("c10"))
    write_cifar10(root, data, labels, test_data, test_labels)
    return dict(root=root, imb=imb, labels=labels, data=data, test_labels=test_labels,
                test_data=test_data)


def test_load_data_cifar10_returns_the_written_pixels_labels_and_counts(cifar10_pool):
    p = cifar10_pool
    cfg = sm.Config(dataset="cifar10", data_dir=p["root"], imb_factor=p["imb"])
    x, y, xt, yt, counts, n_max = sm.load_data(cfg)
    assert n_max == 5000
    assert counts == sm.lt_class_counts(5000, 10, p["imb"])
    idx = first_n_per_class(list(p["labels"]), counts)
    assert x.dtype == torch.uint8 and x.shape == (sum(counts), 3, 32, 32)
    assert y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(p["labels"][idx]))
    assert torch.bincount(y, minlength=10).tolist() == counts
    # pixel-exact, and in CIFAR's layout: channel plane of 1024, then row-major 32 x 32
    for k in range(0, len(idx), 997):
        row = p["data"][idx[k]]
        for ch, r, col in ((0, 0, 0), (1, 5, 31), (2, 31, 7), (0, 17, 3)):
            assert x[k, ch, r, col].item() == row[ch * 1024 + r * 32 + col]
    assert torch.equal(x, torch.from_numpy(p["data"][idx].reshape(-1, 3, 32, 32)))
    assert torch.equal(xt, torch.from_numpy(p["test_data"].reshape(-1, 3, 32, 32)))
    assert torch.equal(yt, torch.from_numpy(p["test_labels"]))


def test_load_data_cifar10_subset_seed_picks_the_ldam_drw_subset(cifar10_pool):
    p = cifar10_pool
    cfg = sm.Config(dataset="cifar10", data_dir=p["root"], imb_factor=p["imb"], subset_seed=7)
    x, y, *_ = sm.load_data(cfg)
    idx = ldam_subset(p["labels"], sm.lt_class_counts(5000, 10, p["imb"]), 7)
    assert torch.equal(x, torch.from_numpy(p["data"][idx].reshape(-1, 3, 32, 32)))
    assert torch.equal(y, torch.from_numpy(p["labels"][idx]))


def test_load_data_existing_files_never_try_to_download(cifar10_pool, no_network):
    sm.load_data(sm.Config(dataset="cifar10", data_dir=cifar10_pool["root"],
                           imb_factor=cifar10_pool["imb"]))
    assert no_network == []


@pytest.fixture(scope="module")
def cifar100_lt(tmp_path_factory):
    """A pre-made long-tailed CIFAR-100: the train file holds exactly the IF-100 counts (10,847)."""
    rng = np.random.RandomState(100)
    labels = rng.permutation(np.repeat(np.arange(100), CIFAR100_IF100))
    data = random_rows(rng, len(labels))
    test_labels = np.tile(np.arange(100), 2)
    test_data = random_rows(rng, len(test_labels))
    root = str(tmp_path_factory.mktemp("c100"))
    write_cifar100(root, data, labels, test_data, test_labels)
    return dict(root=root, labels=labels, data=data, test_labels=test_labels, test_data=test_data)


def test_load_data_cifar100_already_long_tailed_train_file_loads_every_image(cifar100_lt):
    p = cifar100_lt
    x, y, xt, yt, counts, n_max = sm.load_data(sm.Config(dataset="cifar100", data_dir=p["root"],
                                                         imb_factor=100))
    assert n_max == 500 and counts == CIFAR100_IF100
    # every image is used once, grouped by class, in file order within each class
    idx = np.concatenate([np.flatnonzero(p["labels"] == c) for c in range(100)])
    assert sorted(idx.tolist()) == list(range(10847))
    assert torch.equal(x, torch.from_numpy(p["data"][idx].reshape(-1, 3, 32, 32)))
    assert torch.equal(y, torch.from_numpy(p["labels"][idx]))
    assert torch.equal(xt, torch.from_numpy(p["test_data"].reshape(-1, 3, 32, 32)))
    assert torch.equal(yt, torch.from_numpy(p["test_labels"]))


@pytest.fixture
def cifar100_short_class3(tmp_path):
    """CIFAR-100 whose classes 0-2 hold their IF-100 counts and class 3 one image too few."""
    rng = np.random.RandomState(3)
    per_class = CIFAR100_IF100[:3] + [CIFAR100_IF100[3] - 1]
    labels = rng.permutation(np.repeat(np.arange(4), per_class))
    test_labels = np.arange(100)
    root = str(tmp_path / "data")
    write_cifar100(root, random_rows(rng, len(labels)), labels, random_rows(rng, 100), test_labels)
    return root


def test_main_exits_2_naming_a_class_with_too_few_training_images(cifar100_short_class3, tmp_path, capsys):
    out = tmp_path / "out"
    line = expect_usage_exit(["--dataset", "cifar100", "--data_dir", cifar100_short_class3,
                              "--arch", "resnet8", "--epochs", "1", "--out", str(out)], capsys)
    n = CIFAR100_IF100[3]
    assert re.search(rf"\bclass 3\b.*\b{n - 1}\b.*\b{n}\b", line), line
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
    # 10 images but the labels of a full IF-500 long-tailed set: lengths disagree
    "labels_longer_than_data": lambda: pickle.dumps({
        "data": np.zeros((10, 3072), np.uint8),
        "fine_labels": [int(v) for v in np.repeat(np.arange(100), sm.lt_class_counts(500, 100, 500))]},
        protocol=2),
}


@pytest.mark.parametrize("kind", list(CORRUPT_TRAIN))
def test_main_exits_2_with_one_line_on_a_corrupt_train_pickle(kind, tmp_path, capsys):
    root = tmp_path / "data"
    valid = _valid_c100_dict(100)
    write_cifar100(str(root), valid["data"], valid["fine_labels"], valid["data"], valid["fine_labels"])
    train = root / "cifar-100-python" / "train"
    train.write_bytes(CORRUPT_TRAIN[kind]())
    out = tmp_path / "out"
    line = expect_usage_exit(["--dataset", "cifar100", "--data_dir", str(root), "--arch", "resnet8",
                              "--epochs", "1", "--imb_factor", "500", "--out", str(out)], capsys)
    assert "train" in line
    assert not out.exists()


# =============================================================================================
# 4. Augmentation
# =============================================================================================

def reference_crop(x, dy, dx, flip):
    """RandomCrop(32, padding=4) at a fixed offset, then an optional mirror: pad, slice, flip."""
    c = F.pad(x, (4, 4, 4, 4))[..., dy:dy + 32, dx:dx + 32]
    return c.flip(-1) if flip else c


def test_crop_flip_matches_pad_slice_flip_for_all_162_offset_flip_combinations():
    g = torch.Generator().manual_seed(0)
    combos = [(dy, dx, fl) for dy in range(9) for dx in range(9) for fl in (False, True)]
    x = torch.randint(0, 256, (len(combos), 3, 32, 32), generator=g, dtype=torch.uint8)
    dy = torch.tensor([c[0] for c in combos])
    dx = torch.tensor([c[1] for c in combos])
    flip = torch.tensor([c[2] for c in combos])
    got = sm.crop_flip(F.pad(x, (4,) * 4), dy, dx, flip)
    assert got.shape == x.shape and got.dtype == torch.uint8
    for n, (a, b, fl) in enumerate(combos):
        assert torch.equal(got[n], reference_crop(x[n], a, b, fl)), (a, b, fl)
    # offset (4, 4) without flip is the image itself
    centre = [n for n, c in enumerate(combos) if c == (4, 4, False)][0]
    assert torch.equal(got[centre], x[centre])


def _all_crops(img):
    """{bytes of a crop: (dy, dx, flip)} for every crop of one image at every offset, both mirrors."""
    return {reference_crop(img, dy, dx, fl).numpy().tobytes(): (dy, dx, fl)
            for dy in range(9) for dx in range(9) for fl in (False, True)}


def test_random_crop_flip_output_is_always_one_of_the_162_crops_of_its_own_image():
    torch.manual_seed(1)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    crops = [_all_crops(x[n]) for n in range(4)]
    assert all(len(c) == 162 for c in crops)              # random pixels: the crops are distinct
    for _ in range(25):
        out = sm.random_crop_flip(F.pad(x, (4,) * 4))
        assert out.shape == x.shape and out.dtype == torch.uint8
        for n in range(4):
            assert out[n].numpy().tobytes() in crops[n]


def test_random_crop_flip_reaches_every_offset_and_both_flips():
    torch.manual_seed(2)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    crops = _all_crops(img)
    assert len(crops) == 162
    out = sm.random_crop_flip(F.pad(img, (4,) * 4).expand(3000, -1, -1, -1).contiguous())
    seen = [crops.get(o.numpy().tobytes()) for o in out]
    assert None not in seen                                # each draw is one of the crops
    assert set(seen) == set(crops.values())                # and every crop is drawn


# =============================================================================================
# 5. Normalisation
# =============================================================================================

def test_normalize_equals_torchvision_totensor_then_normalize_with_official_constants():
    assert tuple(sm.MEAN) == OFFICIAL_MEAN and tuple(sm.STD) == OFFICIAL_STD
    T = torchvision.transforms
    tf = T.Compose([T.ToTensor(), T.Normalize(OFFICIAL_MEAN, OFFICIAL_STD)])
    rng = np.random.RandomState(5)
    hwc = rng.randint(0, 256, size=(5, 32, 32, 3)).astype(np.uint8)
    hwc[0] = 0
    hwc[1] = 255
    expected = torch.stack([tf(im) for im in hwc])
    got = sm.normalize(torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# =============================================================================================
# 6. CLI: --help, parsing, bad input
# =============================================================================================

def _base_type(t):
    """Optional[X] -> X."""
    if typing.get_origin(t) is typing.Union:
        return next(a for a in typing.get_args(t) if a is not type(None))
    return t


def test_help_lists_every_config_field_as_a_flag_with_its_default(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exc:
        sm.main(["--help"])
    assert exc.value.code in (0, None)
    text = capsys.readouterr().out
    m = re.search(r"^(options|optional arguments):$", text, re.M)
    assert m, text
    body = " ".join(text[m.end():].split())              # the option list, whitespace-normalised
    fields = dataclasses.fields(sm.Config)
    starts, pos = [], 0
    for f in fields:                                     # options appear in Config's order
        k = body.find(f"--{f.name} ", pos)
        assert k >= 0, f"--{f.name} missing from --help"
        starts.append(k)
        pos = k + 1
    for f, a, b in zip(fields, starts, starts[1:] + [len(body)]):
        entry = body[a:b]
        assert f"(default: {f.default})" in entry, (f.name, entry)
        if f.metadata["choices"]:
            assert "{" + ",".join(f.metadata["choices"]) + "}" in entry, (f.name, entry)


def test_parser_without_arguments_gives_the_config_defaults():
    assert sm.Config(**vars(sm.build_parser().parse_args([]))) == sm.Config()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(sm.Config)])
def test_every_config_flag_parses_a_value_of_its_type(field, tmp_path):
    f = {f.name: f for f in dataclasses.fields(sm.Config)}[field]
    typ = _base_type(f.type)
    if typ is bool:  # a switch: off by default, on when named, takes no value
        assert f.default is False and getattr(sm.build_parser().parse_args([]), field) is False
        assert getattr(sm.build_parser().parse_args([f"--{field}"]), field) is True
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
    ns = sm.build_parser().parse_args([f"--{field}", text])
    assert getattr(ns, field) == value and type(getattr(ns, field)) is type(value)


BAD_INPUTS = [
    # (argv tail, flag the message must name, extra text it must contain)
    (["--imb_factor", "0.01"], "--imb_factor", "100"),
    (["--imb_factor", "0.5"], "--imb_factor", "0.5"),
    (["--gamma", "1.0"], "--gamma", None),
    (["--gamma", "-0.1"], "--gamma", None),
    (["--rho", "-1"], "--rho", None),
    (["--head_rho", "-0.1"], "--head_rho", None),
    (["--tail_rho", "-0.1"], "--tail_rho", None),
    (["--eta", "0"], "--eta", None),
    (["--epochs", "0"], "--epochs", None),
    (["--batch_size", "0"], "--batch_size", None),
    (["--opt", "adam"], "--opt", "adam"),
    (["--loss", "foo"], "--loss", "foo"),
    (["--dataset", "mnist"], "--dataset", "mnist"),
    (["--arch", "resnet99"], "--arch", "resnet99"),
    (["--epochs", "two"], "--epochs", "two"),
    (["--imb_factor", "1000"], "--imb_factor", "no training image"),  # synthetic: 200 per class
    (["--device", "tpu"], "--device", "tpu"),
]


@pytest.mark.parametrize("tail,flag,extra", BAD_INPUTS, ids=[" ".join(b[0]) for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_naming_the_flag_and_writes_nothing(tail, flag, extra,
                                                                            tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1",
            "--data_dir", str(tmp_path / "data"), "--out", str(out)] + tail
    line = expect_usage_exit(argv, capsys)
    assert flag in line, line
    if extra is not None:
        assert extra in line, line
    assert not out.exists()
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("dataset,folder,archive", [
    ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
    ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz")])
def test_missing_cifar_without_network_exits_2_naming_folder_and_archive(
        dataset, folder, archive, tmp_path, capsys, no_network):
    data, out = tmp_path / "data", tmp_path / "out"
    line = expect_usage_exit(["--dataset", dataset, "--data_dir", str(data), "--arch", "resnet8",
                              "--epochs", "1", "--out", str(out)], capsys)
    assert len(no_network) == 1                       # it did try (and fail) to download
    assert str(data) in line and archive in line and folder in line, line
    assert not out.exists()
    assert not data.exists()                          # the data folder it would have made is gone


def test_out_that_is_an_existing_file_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    line = expect_usage_exit(["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1",
                              "--out", str(out)], capsys)
    assert "--out" in line
    assert out.read_text() == "not a folder"


NO_NET_ENV = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
              "no_proxy": "", "NO_PROXY": "", "all_proxy": "", "ALL_PROXY": ""}


SUBPROCESS_CASES = {  # id: (argv tail, text the one stderr line must contain)
    "imb_factor-0.01": (["--dataset", "synthetic", "--imb_factor", "0.01"], "100"),
    "opt-adam": (["--dataset", "synthetic", "--opt", "adam"], "--opt"),
    "missing-cifar100": (["--dataset", "cifar100"], "cifar-100-python.tar.gz"),  # download refused
}


@pytest.fixture(scope="module")
def cli_subprocesses(tmp_path_factory):
    """Run every SUBPROCESS_CASES command line as `python ssesam_minimal.py ...`, all at once (each
    spends ~3 s importing torch). A download, if tried, goes to a proxy on a closed local port and
    is refused at once: nothing leaves the machine."""
    env = dict(os.environ, **NO_NET_ENV)
    procs = {}
    for key, (tail, _) in SUBPROCESS_CASES.items():
        base = tmp_path_factory.mktemp(key)
        data, out = base / "data", base / "out"
        argv = [sys.executable, "ssesam_minimal.py", "--arch", "resnet8", "--epochs", "1",
                "--data_dir", str(data), "--out", str(out)] + tail
        procs[key] = (subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), data, out)
    results = {}
    for key, (p, data, out) in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        results[key] = (p.returncode, stdout, stderr, data, out)
    return results


@pytest.mark.parametrize("key", list(SUBPROCESS_CASES))
def test_cli_subprocess_bad_input_exits_2_with_one_line_and_no_traceback(key, cli_subprocesses):
    returncode, stdout, stderr, data, out = cli_subprocesses[key]
    assert returncode == 2, stderr
    assert "Traceback" not in stderr and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and SUBPROCESS_CASES[key][1] in lines[0], stderr
    assert not out.exists() and not data.exists()


# =============================================================================================
# 7. --gpu without CUDA
# =============================================================================================

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_flag_without_cuda_runs_on_cpu_with_one_warning_line(capsys):
    summary = sm.main(["--gpu", "0", "--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1",
                       "--opt", "sgd", "--imb_factor", "100"])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "warning" in lines[0].lower() and "--gpu 0" in lines[0] and "CPU" in lines[0]
    assert summary["device"] == "cpu"
    assert summary["config"]["gpu"] == 0


# =============================================================================================
# 8. A short synthetic run and its outputs
# =============================================================================================

RUN_ARGS = ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "2", "--imb_factor", "10",
            "--eta", "50", "--lr", "0.1", "--batch_size", "32"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = sm.main(RUN_ARGS + ["--out", str(out)])
    return summary, out


def test_two_epoch_synthetic_ssesam_run_beats_chance_clearly(synthetic_run):
    summary, _ = synthetic_run
    assert summary["config"]["opt"] == "ssesam"            # the default optimizer
    assert summary["final"]["epoch"] == 2
    assert summary["final"]["avg"] > 20.0, summary["final"]  # chance: 10 % mean per-class accuracy


def test_run_writes_one_metrics_line_per_evaluated_epoch(synthetic_run):
    summary, out = synthetic_run
    with open(out / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    assert [r["epoch"] for r in rows] == [1, 2]              # print_freq 1: every epoch
    for r in rows:
        for k in ("avg", "many", "med", "few", "loss", "lr"):
            assert k in r
    assert rows[-1]["avg"] == summary["final"]["avg"]
    assert max(r["avg"] for r in rows) == summary["best"]["avg"]


def test_summary_json_has_the_documented_keys_and_equals_the_returned_dict(synthetic_run):
    summary, out = synthetic_run
    with open(out / "summary.json") as fh:
        saved = json.load(fh)
    for k in ("config", "final", "best", "device", "seconds"):
        assert k in saved
    for part in ("final", "best"):
        for k in ("avg", "many", "med", "few"):
            assert k in saved[part]
    assert saved == summary
    expected_cfg = dataclasses.asdict(sm.Config(**vars(sm.build_parser().parse_args(
        RUN_ARGS + ["--out", str(out)]))))
    assert saved["config"] == expected_cfg


def test_model_pt_loads_into_resnet8_and_reproduces_the_final_accuracy(synthetic_run):
    summary, out = synthetic_run
    model = sm.build_model("resnet8", 10)
    model.load_state_dict(torch.load(out / "model.pt", map_location="cpu", weights_only=True))
    (x, y), (xt, yt), n_max = sm.synthetic_cifar()
    counts = sm.lt_class_counts(n_max, 10, 10)
    acc = sm.evaluate(model, xt, yt, counts, n_max)
    assert acc["avg"] == pytest.approx(summary["final"]["avg"], abs=1e-6)


def test_loss_va_is_accepted_and_trains_exactly_like_la(tmp_path):
    # 2 epochs: with --epochs 1 the only epoch runs at lr 0 and every loss would look the same
    args = ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "2", "--opt", "sgd",
            "--imb_factor", "100", "--lr", "0.1"]
    runs = {}
    for loss in ("VA", "LA"):
        summary = sm.main(args + ["--loss", loss, "--out", str(tmp_path / loss)])
        with open(tmp_path / loss / "metrics.jsonl") as fh:
            runs[loss] = summary, [json.loads(line) for line in fh]
    assert runs["VA"][0]["config"]["loss"] == "VA"
    assert runs["VA"][1][0]["lr"] > 0                        # epoch 1 really trained
    for k in ("loss", "train_acc", "avg", "many", "med", "few"):  # identical, epoch by epoch
        assert [r[k] for r in runs["VA"][1]] == [r[k] for r in runs["LA"][1]]
    assert runs["VA"][0]["final"] == runs["LA"][0]["final"]
    counts = sm.lt_class_counts(200, 10, 100)
    a, b = sm.LongTailLoss("VA", counts), sm.LongTailLoss("LA", counts)
    assert a.name == "LA"
    for buf in ("scale", "shift", "margin", "weight"):
        assert torch.equal(getattr(a, buf), getattr(b, buf))
    # and LA is not plain CE: its additive shift is tau * log(pi) (so the comparison can fail)
    n = torch.tensor(counts, dtype=torch.float32)
    torch.testing.assert_close(a.shift, 0.75 * torch.log(n / n.sum()))
    assert a.shift.abs().min() > 0


# =============================================================================================
# 8b. The static-buffer step behind --cuda_graph; the progress line
# =============================================================================================
# On the CPU GraphedStep records nothing but does everything else it does on a GPU: static input
# buffers, a tensor learning rate, zero momentum buffers made in advance, one variant per (batch
# size, rho), warm-up steps and their undoing. Its weights must be the plain step's, bit for bit.

def all_state(model, opt):
    base = opt.optimizer if isinstance(opt, sm._Climb) else opt
    return ([t.detach().clone() for t in (*model.parameters(), *model.buffers())]
            + [base.state[p]["momentum_buffer"].clone() for p in model.parameters()])


@pytest.mark.parametrize("name", sm.OPTS)
def test_static_buffer_step_with_tensor_lr_gives_the_plain_steps_weights_bit_for_bit(name):
    # 3 epochs of 45 images in batches of 16 (the last batch has 13), a new lr every epoch; SSE-SAM
    # switches after epoch 2 (gamma 0.5, T 3), so it crosses the switch and the short batch twice
    cfg = sm.Config(opt=name, lr=0.1, rho=0.05, head_rho=0.05, tail_rho=0.1, gamma=0.5, epochs=3,
                    imbsam_weight="group")
    crit = sm.LongTailLoss("CE", COUNTS)
    is_tail = torch.tensor([n < ETA for n in COUNTS])
    runs, calls = {}, []
    for graphed in (False, True):
        model = tiny_model(torch.float32)
        opt = sm.make_optimizer(cfg, model)
        step = sm.STEPS[name]
        if graphed:
            def counted(*a, **k):
                calls.append(len(a[4]))
                return sm.STEPS[name](*a, **k)
            step = sm.GraphedStep(counted, model, opt, warmup=2)
            assert all(torch.is_tensor(g["lr"]) for g in opt.param_groups)
        states = []
        g = torch.Generator().manual_seed(5)
        for epoch in range(3):
            sm.set_lr(opt, sm.lr_at(epoch, cfg) + 0.01)
            xs = torch.randn(45, 3, 8, 8, generator=g)
            ys = torch.randint(0, C, (45,), generator=g)
            step_loss, correct = sm.train_one_epoch(model, crit, opt, step, xs, ys, is_tail, 16)
            states.append((all_state(model, opt), step_loss, correct))
        runs[graphed] = states, opt
    for (plain, loss_a, correct_a), (static, loss_b, correct_b) in zip(runs[False][0], runs[True][0]):
        assert all(torch.equal(a, b) for a, b in zip(plain, static))
        assert torch.equal(loss_a, loss_b) and torch.equal(correct_a, correct_b)
    # every variant was warmed up (and its training undone): 2 warm-up steps per variant, then 9 steps
    variants = {(16,), (13,)} if name != "ssesam" else {(16, 1), (13, 1), (16, 2), (13, 2)}
    assert len(calls) == 2 * len(variants) + 9
    assert len(runs[True][1].param_groups) == 1 and float(runs[True][1].param_groups[0]["lr"]) > 0
    if name == "ssesam":
        assert runs[True][1].k == 3 and runs[True][1].head_rho == 0.0


# SSE-SAM across its switch (after epoch 1) and the start of DRW (epoch 2), with 1 short batch per
# epoch; pinned to the CPU: on a GPU machine "auto" would be CUDA, where bf16 runs are not bitwise
# repeatable (scripts/graph_check.py compares the two there)
GRAPH_RUN_ARGS = RUN_ARGS + ["--imb_factor", "100", "--eta", "20", "--gamma", "0.5", "--drw_epoch", "1",
                             "--batch_size", "64", "--device", "cpu"]  # 492 images: 7 batches of 64, one of 44


@pytest.fixture(scope="module")
def eager_ssesam_run(tmp_path_factory):
    """GRAPH_RUN_ARGS run eagerly by sm.main: the reference for --cuda_graph and for multi_run.py."""
    out = tmp_path_factory.mktemp("eager") / "out"
    sm.main(GRAPH_RUN_ARGS + ["--out", str(out)])
    return out


def test_cuda_graph_flag_on_the_cpu_trains_the_same_run_bit_for_bit(eager_ssesam_run, tmp_path):
    sm.main(GRAPH_RUN_ARGS + ["--cuda_graph", "--out", str(tmp_path / "1")])
    a, b = run_outputs(eager_ssesam_run), run_outputs(tmp_path / "1")
    assert_same_state(a[0], b[0])
    assert a[1] == b[1] and {k: v for k, v in a[2].items() if k != "history"} == \
        {k: v for k, v in b[2].items() if k != "history"}


def test_progress_line_rewrites_one_line_and_only_on_a_terminal(monkeypatch, capsys):
    bar = sm.ProgressLine(3, 10)
    bar(1, 4)
    bar(2, 4)  # within half a second of the first: not shown
    bar(4, 4)  # the last step always is
    out = capsys.readouterr().out
    assert out.count("\r") == 2 and "\n" not in out
    assert "epoch 3/10 step 1/4" in out and "step 4/4" in out and "0 s left" in out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    sm.main(RUN_ARGS + ["--epochs", "1", "--imb_factor", "100", "--batch_size", "128"])
    assert "\r" not in capsys.readouterr().out  # a pipe or a log file: one line per epoch


# =============================================================================================
# 9. Checkpoint, resume, determinism, divergence
# =============================================================================================

# 3 epochs, gamma 0.5: rho_head switches off after epoch 2; DRW from epoch 2 (0-indexed): both
# kinds of state that change between epochs are crossed by an interruption in epoch 2.
RESUME_ARGS = ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "3", "--imb_factor", "100",
               "--eta", "20", "--gamma", "0.5", "--drw_epoch", "2", "--lr", "0.05",
               "--device", "cpu"]  # bit for bit is a claim about the CPU


def run_outputs(out):
    """(state_dict of model.pt, metrics rows without timings, summary without timings)."""
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    with open(out / "metrics.jsonl") as fh:
        rows = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in fh]
    with open(out / "summary.json") as fh:
        summary = {k: v for k, v in json.load(fh).items() if k not in ("seconds", "config")}
    return state, rows, summary


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit, BN buffers included


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted reference run."""
    out = tmp_path_factory.mktemp("straight") / "out"
    sm.main(RESUME_ARGS + ["--out", str(out)])
    return out


def interrupt_at(monkeypatch, opt, call, signum):
    """Send `signum` to this process from inside the `call`-th training step (1-based)."""
    step, calls = sm.STEPS[opt], []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)  # the handler raises at the next bytecode
        return step(*args, **kwargs)

    monkeypatch.setitem(sm.STEPS, opt, counted)
    return calls


def steps_per_epoch(args):
    cfg = sm.Config(**vars(sm.build_parser().parse_args(args)))
    return math.ceil(len(sm.load_data(cfg)[1]) / cfg.batch_size)


@pytest.mark.parametrize("save_every,epoch,when", [(1, 2, "during"), (2, 3, "during"), (1, 2, "after")])
def test_run_interrupted_and_resumed_ends_bitwise_like_the_straight_run(
        straight_run, save_every, epoch, when, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = RESUME_ARGS + ["--out", str(out), "--save_every", str(save_every)]
    n = steps_per_epoch(args)
    if when == "during":  # in the 3rd step of the epoch
        calls = interrupt_at(monkeypatch, "ssesam", (epoch - 1) * n + 3, signal.SIGTERM)
    else:  # while the epoch's checkpoint is being made: the signal waits until it is written
        checkpoint, calls = sm._checkpoint, []

        def interrupted_checkpoint(*a):
            calls.append(1)
            if len(calls) == epoch:
                os.kill(os.getpid(), signal.SIGTERM)
            return checkpoint(*a)

        monkeypatch.setattr(sm, "_checkpoint", interrupted_checkpoint)
    with pytest.raises(SystemExit) as exc:
        sm.main(args)
    held = epoch - 1 if when == "during" else epoch  # save_every 2: epoch 2 is on disk, 1 never was
    assert exc.value.code == 128 + signal.SIGTERM
    assert len(calls) == ((epoch - 1) * n + 3 if when == "during" else epoch)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"ssesam_minimal.py: interrupted by SIGTERM {when} epoch {held if when == 'after' else epoch}; "
                   f"{out / 'last.pt'} holds epoch {held} of 3; continue with --resume"]
    assert sorted(os.listdir(out)) == ["last.pt"]  # nothing half-written is left
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the handlers back
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == held and ckpt["optimizer"]["k"] == held and len(ckpt["history"]) == held
    # the same command without --resume must not overwrite the unfinished run
    line = expect_usage_exit(args, capsys)
    assert f"unfinished run (epoch {held} of 3)" in line and "--resume" in line
    monkeypatch.undo()
    sm.main(args + ["--resume"])
    a, b = run_outputs(straight_run), run_outputs(out)
    assert_same_state(a[0], b[0])
    assert a[1] == b[1] and a[2] == b[2]
    assert [r["rho_head"] for r in b[1]] == [0.05, 0.05, 0.0]  # the switch survived the resume


def test_lr_set_through_the_wrapper_reaches_the_base_optimizer_after_load_state_dict():
    model = nn.Linear(3, 2)
    opt = sm.SSESAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, 0.05, 0.1)
    opt.optimizer.load_state_dict(opt.optimizer.state_dict())  # replaces the param_groups list
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    opt.optimizer.step()  # lr 0: nothing may move
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_same_seed_twice_on_cpu_gives_identical_weights_and_metrics(straight_run, tmp_path):
    sm.main(RESUME_ARGS + ["--out", str(tmp_path / "again")])
    a, b = run_outputs(straight_run), run_outputs(tmp_path / "again")
    assert_same_state(a[0], b[0])
    assert a[1] == b[1] and a[2] == b[2]


def test_resume_with_other_settings_exits_2_naming_each_difference(straight_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(straight_run, out)
    args = RESUME_ARGS + ["--out", str(out), "--resume"]
    line = expect_usage_exit(args + ["--lr", "0.1", "--opt", "sam"], capsys)
    assert "--lr 0.1 (last.pt: 0.05)" in line and "--opt sam (last.pt: ssesam)" in line
    assert "--epochs" not in line and "--print_freq" not in line
    # where and how often to report may change: this one resumes (a finished run: nothing to train)
    summary = sm.main(args + ["--print_freq", "5", "--test_batch_size", "7"])
    assert summary["final"] == run_outputs(straight_run)[2]["final"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign"])
def test_a_damaged_last_pt_gets_one_line_and_exit_2(straight_run, damage, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(straight_run, out)
    path = out / "last.pt"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"model": {}}, path)  # a torch file, but not ours
    line = expect_usage_exit(RESUME_ARGS + ["--out", str(out), "--resume"], capsys)
    assert str(path) in line and "delete it" in line


def test_resume_without_a_checkpoint_or_without_out_exits_2(tmp_path, capsys):
    line = expect_usage_exit(RESUME_ARGS + ["--out", str(tmp_path), "--resume"], capsys)
    assert "no " + str(tmp_path / "last.pt") in line
    assert "--out" in expect_usage_exit(RESUME_ARGS + ["--resume"], capsys)


@pytest.mark.parametrize("save_every", [1, 2])
def test_a_diverging_lr_stops_with_one_line_exit_1_and_last_pt_the_last_good_epoch(
        save_every, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "4", "--opt", "sgd",
            "--imb_factor", "10", "--save_every", str(save_every), "--out", str(out)]
    # epochs 1-2 at a sane lr, then lr 1e12: the weights overflow within a few steps
    monkeypatch.setattr(sm, "lr_at", lambda epoch, cfg: 0.05 if epoch < 2 else 1e12)
    saved_states, losses = [], []
    checkpoint, step = sm._checkpoint, sm.STEPS["sgd"]

    def recording_checkpoint(cfg, epoch, model, *args):
        saved_states.append(copy.deepcopy(model.state_dict()))  # the weights of each saved epoch
        return checkpoint(cfg, epoch, model, *args)

    def recording_step(*args, **kwargs):
        logits, loss_i = step(*args, **kwargs)
        losses.append(bool(torch.isfinite(loss_i.sum())))
        return logits, loss_i

    monkeypatch.setattr(sm, "_checkpoint", recording_checkpoint)
    monkeypatch.setitem(sm.STEPS, "sgd", recording_step)
    with pytest.raises(SystemExit) as exc:
        sm.main(args)
    assert exc.value.code == 1
    err = capsys.readouterr().err.splitlines()
    n = steps_per_epoch(args)
    first_bad = losses.index(False)  # the first step whose loss was not finite, counted by hand
    assert 2 * n <= first_bad < 3 * n, "the loss must go non-finite in epoch 3"
    assert err == [f"ssesam_minimal.py: non-finite training loss at epoch 3, step {first_bad - 2 * n + 1} "
                   f"of {n} (lr 1e+12); {out / 'last.pt'} holds epoch 2 of 4; continue with --resume"]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and len(saved_states) == 2 // save_every  # the diverged epoch: never
    assert_same_state(ckpt["model"], saved_states[-1])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert sorted(os.listdir(out)) == ["last.pt"]


def sigint_once(proc, ready):
    """Send SIGINT to proc once ready() returns, and wait: it must exit with 130 and print exactly
    one line on stderr, no traceback. Returns that line."""
    try:
        ready()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_ctrl_c_in_a_real_process_saves_and_exits_130_with_one_line(tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-u", "ssesam_minimal.py", "--dataset", "synthetic", "--arch", "resnet8",
            "--epochs", "50", "--opt", "sgd", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # once the first epoch's line is printed, its checkpoint is on disk
    line = sigint_once(proc, lambda: next((l for l in proc.stdout if l.startswith("epoch   1/50")), None))
    # after an epoch (or while its checkpoint is written) that epoch is kept; during one, the one before
    m = re.fullmatch(r"ssesam_minimal.py: interrupted by SIGINT (during|after) epoch (\d+); .*last.pt "
                     r"holds epoch (\d+) of 50; continue with --resume", line)
    assert m and int(m[3]) == int(m[2]) - (m[1] == "during") >= 1, line
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == int(m[3]) and len(ckpt["history"]) == int(m[3])
    assert sorted(os.listdir(out)) == ["last.pt"]


# =============================================================================================
# 10. scripts/reproduce.sh and scripts/results_table.py
# =============================================================================================

def test_reproduce_sh_runs_a_row_into_its_folder_skips_it_when_done_and_prints_the_table(tmp_path):
    env = dict(os.environ, OUT_ROOT=str(tmp_path / "results"), EPOCHS="2", ROWS="sgd", JOBS="1",
               OMP_NUM_THREADS="1", EXTRA="--dataset synthetic --imb_factor 10 --eta 50 --lr 0.1")
    cmd = ["bash", "scripts/reproduce.sh", "resnet8", "3"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "results" / "resnet8" / "sgd-seed3"
    assert sorted(os.listdir(run)) == ["last.pt", "metrics.jsonl", "model.pt", "summary.json", "train.log"]
    with open(run / "summary.json") as fh:
        summary = json.load(fh)
    cfg = summary["config"]
    assert (cfg["opt"], cfg["seed"], cfg["arch"], cfg["epochs"], cfg["print_freq"]) == ("sgd", 3, "resnet8", 2, 10)
    avg = f"{summary['final']['avg']:.1f}"
    assert re.search(rf"^\| CE \(SGD\) \| 1 \| .* \| {re.escape(avg)} \| 44.6 \|", first.stdout, re.M), first.stdout
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and f"done already: {run}" in again.stdout


@pytest.mark.parametrize("args,env", [([], {}), (["resnet32", "0"], {"ROWS": "sgd adam"})])
def test_reproduce_sh_rejects_bad_usage_with_exit_2_before_running_anything(args, env, tmp_path):
    env = dict(os.environ, OUT_ROOT=str(tmp_path / "results"), **env)
    r = subprocess.run(["bash", "scripts/reproduce.sh"] + args, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.strip() and not (tmp_path / "results").exists()


def test_reproduce_sh_mode_threads_runs_the_seeds_in_one_process_and_skips_them_when_done(tmp_path):
    # two seeds of one row, JOBS 2: one multi_run.py process, one thread per run (IF 100: the
    # smallest synthetic set)
    env = dict(os.environ, OUT_ROOT=str(tmp_path / "results"), EPOCHS="2", ROWS="sgd", JOBS="2",
               MODE="threads", OMP_NUM_THREADS="1",
               EXTRA="--dataset synthetic --imb_factor 100 --eta 20 --lr 0.1")
    cmd = ["bash", "scripts/reproduce.sh", "resnet8", "3 4"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "all runs:" in first.stdout and "2 of 2 finished" in first.stdout  # multi_run.py's last line
    for seed in (3, 4):
        run = tmp_path / "results" / "resnet8" / f"sgd-seed{seed}"
        assert sorted(os.listdir(run)) == ["last.pt", "metrics.jsonl", "model.pt", "summary.json", "train.log"]
        log = (run / "train.log").read_text()
        assert "run " in log and " of 2 in one process" in log and "epoch   2/2" in log
        assert json.loads((run / "summary.json").read_text())["config"]["seed"] == seed
    assert re.search(r"^\| CE \(SGD\) \| 2 \| ", first.stdout, re.M), first.stdout
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.count("done already:") == 2, again.stdout
    assert "start:" not in again.stdout


@pytest.mark.parametrize("env", [{"MODE": "fibers"}, {"MODE": "threads", "JOBS": "0"}])
def test_reproduce_sh_rejects_a_bad_mode_or_jobs_with_exit_2(env, tmp_path):
    env = dict(os.environ, OUT_ROOT=str(tmp_path / "results"), **env)
    r = subprocess.run(["bash", "scripts/reproduce.sh", "resnet8", "0"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.strip() and not (tmp_path / "results").exists()


def test_results_table_gives_mean_and_sample_std_over_seeds(tmp_path):
    avgs = {"ssesam": [48.0, 50.0, 49.0], "sgd": [44.0]}
    for opt, values in avgs.items():
        for seed, avg in enumerate(values):
            run = tmp_path / f"{opt}-seed{seed}"
            run.mkdir()
            metrics = {"avg": avg, "many": 70.0 + seed, "med": 50.0, "few": 17.0}
            metrics.update({k + "_tta": v + 1 for k, v in metrics.items()})
            summary = {"config": {"opt": opt, "arch": "resnet32", "epochs": 200}, "params": 470000,
                       "device_name": "cpu", "torch": "x", "seconds": 600.0 * (seed + 1),
                       "final": metrics, "best": {k: v + 0.5 for k, v in metrics.items()}}
            (run / "summary.json").write_text(json.dumps(summary))
    r = subprocess.run([sys.executable, "scripts/results_table.py", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    headline, best = r.stdout.split("Best test evaluation")
    # mean 49.0, sample std of (48, 50, 49) = 1.0; many: 70, 71, 72 -> 71.0 ± 1.0; minutes 10, 20, 30
    assert "| +SSE-SAM | 3 | 71.0 ± 1.0 | 50.0 ± 0.0 | 17.0 ± 0.0 | 49.0 ± 1.0 | 49.3 | 20.0 ± 10.0 |" in headline
    assert "| CE (SGD) | 1 | 70.0 | 50.0 | 17.0 | 44.0 | 44.6 | 10.0 |" in headline
    assert "| +SSE-SAM | 3 | 72.5 ± 1.0 | 51.5 ± 0.0 | 18.5 ± 0.0 | 50.5 ± 1.0 | 49.3 | 20.0 ± 10.0 |" in best
    assert "+SAM" not in r.stdout  # rows without runs are left out, not shown empty


# =============================================================================================
# 10b. scripts/multi_run.py: several runs in one process, one thread (and CUDA stream) each
# =============================================================================================

_spec = importlib.util.spec_from_file_location("multi_run", os.path.join(REPO, "scripts", "multi_run.py"))
multi_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(multi_run)

MULTI_ARGS = "--dataset synthetic --arch resnet8 --epochs 2 --imb_factor 100 --eta 20 --device cpu"


def expect_multi_run_exit(argv, capsys):
    return expect_usage_exit(argv, capsys, multi_run.main, "multi_run.py")


def test_multi_run_gives_each_run_bit_for_bit_what_ssesam_minimal_py_gives(eager_ssesam_run, tmp_path):
    # run 1: SGD; run 2: SSE-SAM across its switch and the start of DRW. The references are the same
    # runs made alone by sm.main: SSE-SAM's shared with the --cuda_graph test, SGD's in a process of
    # its own that runs meanwhile. The CPU is deterministic: bit for bit.
    sgd_args = MULTI_ARGS + " --opt sgd"
    ssesam_args = " ".join(GRAPH_RUN_ARGS)
    ref = tmp_path / "ref_sgd"
    proc = subprocess.Popen([sys.executable, "-c", "import sys, ssesam_minimal as sm; sm.main(sys.argv[1:])"]
                            + sgd_args.split() + ["--out", str(ref)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        outs = {"sgd": tmp_path / "sgd", "ssesam": tmp_path / "ssesam"}
        summaries = multi_run.main([f"{sgd_args} --out {outs['sgd']}", f"{ssesam_args} --out {outs['ssesam']}"])
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    for (name, out), reference, summary in zip(outs.items(), (ref, eager_ssesam_run), summaries):
        a, b = run_outputs(reference), run_outputs(out)
        assert_same_state(a[0], b[0])
        assert a[1] == b[1], name                                   # metrics rows, epoch by epoch
        assert a[2]["final"] == b[2]["final"] and a[2]["best"] == b[2]["best"], name
        assert summary == json.loads((out / "summary.json").read_text())
        assert summary["config"]["opt"] == name
        assert sorted(os.listdir(out)) == ["last.pt", "metrics.jsonl", "model.pt", "summary.json", "train.log"]
        log = (out / "train.log").read_text().splitlines()
        assert log[0].startswith("multi_run.py: run ") and log[2].startswith("epoch   1/2")
        assert log[-1].endswith("s on cpu")                         # finish()'s last line
    assert [r["rho_head"] for r in run_outputs(outs["ssesam"])[1]] == [0.05, 0.0]


@pytest.mark.parametrize("runs,needle", [
    ([], "no run given"),
    ([MULTI_ARGS, MULTI_ARGS + " --imb_factor 10"], "run 2 differs from run 1 in --imb_factor"),
    ([MULTI_ARGS, MULTI_ARGS + " --dataset cifar10"], "run 2 differs from run 1 in --dataset"),
    ([MULTI_ARGS + " --subset_seed 1", MULTI_ARGS], "in --subset_seed"),
    ([MULTI_ARGS + " --device cpu", MULTI_ARGS + " --device cuda:7"], "run 2: --device cuda:7: no such"),
    ([MULTI_ARGS + " --out {tmp}/a", MULTI_ARGS + " --out {tmp}/b/../a"], "both write --out"),
    ([MULTI_ARGS, MULTI_ARGS + " --opt adam"], "run 2: argument --opt"),
    ([MULTI_ARGS, MULTI_ARGS + " --out {tmp}/x --resume"], "run 2: --resume: there is no"),
    ([MULTI_ARGS + " --lr '0.1"], "run 1: cannot split"),
])
def test_multi_run_bad_input_exits_2_with_one_line_before_anything_trains(runs, needle, tmp_path, capsys,
                                                                        monkeypatch):
    trained = []
    monkeypatch.setattr(sm, "train", lambda *a, **k: trained.append(1))
    line = expect_multi_run_exit([r.format(tmp=tmp_path) for r in runs], capsys)
    assert needle in line, line
    assert not trained and os.listdir(tmp_path) == []  # nothing written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_multi_run_on_cuda_rejects_runs_on_two_devices(capsys):
    line = expect_multi_run_exit([MULTI_ARGS + " --device cpu", MULTI_ARGS + " --device cuda"], capsys)
    assert "run 2 differs from run 1 in its device" in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_multi_run_on_cuda_trains_graphed_and_eager_runs_side_by_side(tmp_path):
    # three runs, each on its own CUDA stream, two of them recording their steps as CUDA graphs
    # while the others train: every run must learn (no bitwise claim on CUDA)
    args = " ".join(RUN_ARGS) + " --device cuda"
    summaries = multi_run.main([f"{args} --cuda_graph --out {tmp_path / 'g1'}", f"{args} --out {tmp_path / 'e'}",
                                f"{args} --cuda_graph --seed 1 --out {tmp_path / 'g2'}"])
    for s in summaries:
        assert s["device"].startswith("cuda") and s["final"]["epoch"] == 2
        assert s["final"]["avg"] > 20.0, s["final"]  # chance: 10 %


def test_a_failing_run_does_not_stop_the_other_and_the_exit_code_is_1(tmp_path, capsys):
    # IF 100: the smallest synthetic set; run 2 diverges in its first epoch (lr 1e12 / 2), run 1
    # (no --out: its lines go to stdout as "[1] ...") trains on to its end
    args = "--dataset synthetic --arch resnet8 --imb_factor 100 --opt sgd --epochs 2"
    bad = tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        multi_run.main([args, f"{args} --lr 1e12 --out {bad}"])
    assert exc.value.code == 1
    out, err = capsys.readouterr()
    assert "[1] final (epoch 2)" in out and "[1]: final avg" in out and "1 of 2 finished" in out
    assert len(err.splitlines()) == 1 and re.fullmatch(
        rf"multi_run.py: run 2 \({re.escape(str(bad))}\) failed: non-finite training loss at epoch 1, "
        rf"step \d of 8 \(lr 5e\+11\); no epoch saved yet", err.strip()), err
    assert sorted(os.listdir(bad)) == ["train.log"]                  # no epoch finished: nothing saved
    assert (bad / "train.log").read_text().splitlines()[-1] == err.splitlines()[0].replace(
        f"run 2 ({bad}) failed: ", "")


def test_multi_run_ctrl_c_exits_130_with_one_line_and_every_run_resumes(tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    args = "--dataset synthetic --arch resnet8 --imb_factor 100 --opt sgd --epochs 50"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "scripts", "multi_run.py")]
                            + [f"{args} --seed {k} --out {out}" for k, out in enumerate(outs)],
                            cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def both_saved():
        deadline = time.time() + 60
        while not all((out / "last.pt").exists() for out in outs) and time.time() < deadline:
            time.sleep(0.1)

    line = sigint_once(proc, both_saved)
    assert line.startswith("multi_run.py: interrupted by SIGINT;") and "--resume" in line
    for out in outs:
        ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)  # whole, readable
        assert 1 <= ckpt["epoch"] < 50 and len(ckpt["history"]) == ckpt["epoch"]
        assert "summary.json" not in os.listdir(out)
    # the command without --resume refuses to overwrite them (exactly main()'s check)
    with pytest.raises(SystemExit) as exc:
        multi_run.main([f"{args} --seed {k} --out {out}" for k, out in enumerate(outs)])
    assert exc.value.code == 2


# =============================================================================================
# 10c. scripts/graph_check.py and scripts/gpu_check.sh
# =============================================================================================

_spec = importlib.util.spec_from_file_location("graph_check", os.path.join(REPO, "scripts", "graph_check.py"))
graph_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph_check)


def test_graph_check_on_the_cpu_finds_exactly_no_difference_across_the_switch_and_short_batches(tmp_path):
    # 4 epochs of 2 steps (a batch of 16, then one of 10), SSE-SAM's switch after epoch 2
    result = graph_check.main(["--device", "cpu", "--dataset", "synthetic", "--arch", "resnet8",
                               "--imb_factor", "10", "--eta", "50", "--gamma", "0.5", "--steps", "8",
                               "--epochs", "4", "--batch_size", "16", "--out", str(tmp_path)])
    assert result["passed"] and result["why"] == ""
    assert result["max_rel_diff_1_step"] == 0.0 and result["max_rel_diff"] == 0.0
    assert result["bitwise_equal_1_step"] and result["bitwise_equal"]
    assert result["max_abs_diff_step_loss_sums"] == 0.0 and result["weights_moved"] > 0
    assert result["steps_per_epoch"] == [2, 2, 2, 2] and result["batch_sizes"] == [16, 10]
    assert result["switch_after_epoch"] == 2 and not result["recorded"]
    assert set(result["ms_per_step"]["plain"]) == set(result["ms_per_step"]["graphed"]) == {"stage 1", "stage 2"}
    assert json.loads((tmp_path / "graph_check.json").read_text()) == result


def test_graph_check_compare_finds_a_difference_and_names_its_tensor():
    a = {"w": torch.ones(4), "v": torch.ones(2)}
    b = {"w": torch.ones(4), "v": torch.tensor([1.0, 1.1])}
    worst, where, equal, finite = graph_check.compare(a, b)
    assert worst == pytest.approx(0.1 / math.sqrt(2)) and where == "v" and not equal and finite


@pytest.mark.parametrize("argv,needle", [
    (["--epochs", "3"], "--gamma 0.7 puts SSE-SAM's switch after the last of the 3 epochs"),
    (["--steps", "5", "--epochs", "4"], "--steps must be >= 2 * --epochs"),
    (["--batch_size", "1"], "--batch_size must be >= 2"),
])
def test_graph_check_bad_input_exits_2_with_one_line(argv, needle, capsys):
    line = expect_usage_exit(["--dataset", "synthetic"] + argv, capsys, graph_check.main, "graph_check.py")
    assert needle in line, line


def test_gpu_check_sh_is_valid_bash():
    r = subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", "gpu_check.sh")], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr


# =============================================================================================
# Model, losses, optimizers
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

# The seed README's usage snippet, verbatim: our SSESAM must run it unchanged.
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

C = 10
COUNTS = [200, 154, 119, 92, 71, 55, 42, 33, 25, 20]  # synthetic IF 10; tail (n < 50) = classes 6..9
ETA = 50
TAIL_CLASSES = torch.tensor([c for c, n in enumerate(COUNTS) if n < ETA])


def tiny_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return sm.CifarResNet(8, C).to(dtype)


def batch(seed=1, B=16, dtype=torch.float64, labels=None, size=8):
    """Random images (small: the network pools globally, and float64 convolutions are slow)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g) if labels is None else torch.as_tensor(labels)
    return x, y


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def grads_at(model, loss_fn):
    """Plain autograd: the gradient of loss_fn(model) w.r.t. every parameter, as a list."""
    return list(torch.autograd.grad(loss_fn(model), list(model.parameters())))


def naive_eps(grads, rho):
    """eps = rho * g / (||g|| + 1e-16), written as a per-parameter Python loop."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    return [rho * g / (norm + 1e-16) for g in grads]


def shifted(model, eps):
    """A copy of model with w + eps."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(m.parameters(), eps):
            p.add_(e)
    return m


def ce_sum(model, x, y, mask, B):
    return F.cross_entropy(model(x)[mask], y[mask], reduction="sum") / B


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

def cifar_resnet_param_count(depth, num_classes):
    """Count by hand: 3x3 convs without bias, BN (gamma, beta), option-A shortcuts, fc with bias."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16                      # stem conv + bn
    in_planes = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            total += in_planes * planes * 9 + planes * planes * 9 + 2 * 2 * planes
            in_planes = planes
    return total + 64 * num_classes + num_classes


def test_resnet32_has_the_published_parameter_count():
    for num_classes, published in ((100, 0.470e6), (10, 0.464e6)):
        n = sum(p.numel() for p in sm.resnet32(num_classes).parameters())
        assert n == cifar_resnet_param_count(32, num_classes)
        assert abs(n - published) < 0.5e3  # LDAM-DRW: 0.47 M / 0.46 M
    for depth in (8, 20, 56):
        assert sum(p.numel() for p in sm.CifarResNet(depth, 7).parameters()) == cifar_resnet_param_count(depth, 7)


def test_resnet32_has_32_weight_layers_and_parameter_free_shortcuts():
    m = sm.resnet32(100)
    layers = [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 32
    shortcuts = [x for x in m.modules() if isinstance(x, sm.ShortcutA)]
    assert len(shortcuts) == 2 and all(sum(p.numel() for p in s.parameters()) == 0 for s in shortcuts)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 100)


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(2, 16, 8, 8)
    out = sm.ShortcutA(32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()


def test_resnet34_is_the_official_21_3m_backbone():
    m = sm.resnet34(100)
    assert sum(p.numel() for p in m.parameters()) == 21_328_292
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_normed_linear_gives_cosines():
    lin = sm.NormedLinear(5, 3)
    x = torch.randn(4, 5, dtype=torch.float64)
    w = lin.weight.detach().double()
    want = torch.stack([torch.stack([F.cosine_similarity(x[i], w[:, c], dim=0) for c in range(3)])
                        for i in range(4)])
    assert torch.allclose(lin.double()(x), want, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------

def manual_ce(z, y):
    """-log softmax(z)_y, one sample at a time."""
    return torch.stack([-(z[i, y[i]] - torch.log(torch.exp(z[i]).sum())) for i in range(len(y))])


def loss_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, C, generator=g, dtype=torch.float64), torch.randint(0, C, (8,), generator=g)


def test_ce_is_per_sample_cross_entropy():
    z, y = loss_inputs()
    got = sm.LongTailLoss("CE", COUNTS).double()(z, y)
    assert got.shape == (8,) and torch.allclose(got, manual_ce(z, y), atol=1e-12)


def test_la_adds_tau_log_prior_and_va_is_its_alias():
    z, y = loss_inputs()
    n = torch.tensor(COUNTS, dtype=torch.float64)
    want = manual_ce(z + 0.75 * torch.log(n / n.sum()), y)
    for name in ("LA", "VA"):
        assert torch.allclose(sm.LongTailLoss(name, COUNTS).double()(z, y), want, atol=1e-12)


def test_vs_scales_then_shifts_and_reduces_to_ce():
    z, y = loss_inputs()
    n = torch.tensor(COUNTS, dtype=torch.float64)
    want = manual_ce(z * (n / n.max()) ** 0.05 + 0.75 * torch.log(n / n.sum()), y)
    assert torch.allclose(sm.LongTailLoss("VS", COUNTS).double()(z, y), want, atol=1e-12)
    plain = sm.LongTailLoss("VS", COUNTS, tau=0.0, vs_gamma=0.0).double()(z, y)
    assert torch.allclose(plain, manual_ce(z, y), atol=1e-12)


def test_ldam_margins_and_closed_form():
    z, y = loss_inputs()
    z = torch.tanh(z)  # cosine logits lie in [-1, 1]
    crit = sm.LongTailLoss("LDAM", COUNTS).double()
    m = [n ** -0.25 for n in COUNTS]
    margins = [0.5 * v / max(m) for v in m]
    assert torch.allclose(crit.margin.double(), torch.tensor(margins, dtype=torch.float64), atol=1e-7)
    assert abs(max(margins) - 0.5) < 1e-12 and margins.index(0.5) == C - 1  # the rarest class
    want = []
    for i in range(len(y)):
        t = 30 * (z[i, y[i]] - crit.margin[y[i]].double())
        others = [30 * z[i, j] for j in range(C) if j != y[i]]
        want.append(-(t - torch.log(torch.exp(t) + sum(torch.exp(o) for o in others))))
    assert torch.allclose(crit(z, y), torch.stack(want), atol=1e-9)
    plain = sm.LongTailLoss("LDAM", COUNTS, max_m=0.0, s=1.0).double()(z, y)
    assert torch.allclose(plain, manual_ce(z, y), atol=1e-12)


def test_drw_weights_are_class_balanced_and_sum_to_c():
    crit = sm.LongTailLoss("CE", COUNTS)
    crit.set_drw(True)
    raw = [(1 - 0.9999) / (1 - 0.9999 ** n) for n in COUNTS]
    want = torch.tensor([w * C / sum(raw) for w in raw])
    assert torch.allclose(crit.weight, want, rtol=1e-5)
    z, y = loss_inputs()
    assert torch.allclose(crit(z.float(), y), manual_ce(z, y).float() * want[y], rtol=1e-5)
    crit.set_drw(False)
    assert torch.equal(crit.weight, torch.ones(C))


# ---------------------------------------------------------------------------------------------
# perturbation: ||eps|| = rho, eps = rho g / ||g|| as a plain loop would compute it, exact restore
# ---------------------------------------------------------------------------------------------

def backward_head_tail(model, x, y, which):
    tail = torch.isin(y, TAIL_CLASSES)
    mask = tail if which == "tail" else ~tail
    ce_sum(model, x, y, mask, len(y)).backward()


@pytest.mark.parametrize("kind", ["sam", "imbsam", "ssesam-head", "ssesam-tail"])
def test_climb_moves_w_by_rho_along_the_normalised_gradient(kind):
    model = tiny_model()
    x, y = batch()
    w0 = [p.detach().clone() for p in model.parameters()]
    if kind == "sam":
        opt, rho = sm.SAM(sgd(model), model, rho=0.05), 0.05
        F.cross_entropy(model(x), y).backward()
    elif kind == "imbsam":
        opt, rho = sm.ImbSAM(sgd(model), model, rho=0.07), 0.07
        backward_head_tail(model, x, y, "tail")
    else:
        opt = sm.SSESAM(sgd(model), model, head_rho=0.05, tail_rho=0.1, gamma=0.7, total_epochs=10)
        rho = 0.05 if kind == "ssesam-head" else 0.1
        backward_head_tail(model, x, y, kind.split("-")[1])
    want = naive_eps([p.grad.clone() for p in model.parameters()], rho)
    if kind == "sam":
        opt.first_step()
    elif kind == "imbsam":
        opt.second_step()
    else:
        opt.compute_and_add_epsilon(n_i=0 if kind == "ssesam-head" else 1)
    eps = [p.detach() - w for p, w in zip(model.parameters(), w0)]
    assert abs(math.sqrt(sum(float((e * e).sum()) for e in eps)) - rho) < 1e-12
    for e, e_want in zip(eps, want):
        assert torch.allclose(e, e_want, atol=1e-15, rtol=1e-10)
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_restore_gives_back_w_bit_for_bit():
    model = tiny_model(torch.float32)
    x, y = batch(dtype=torch.float32)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.5, total_epochs=4)
    F.cross_entropy(model(x), y).backward()
    opt.compute_and_add_epsilon(0)
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    opt.compute_grad_sum_and_restore_p()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


def test_zero_gradient_gives_zero_eps_not_nan():
    model = tiny_model()
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.5, total_epochs=4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w0 = flat(model).clone()
    opt.compute_and_add_epsilon(0)
    assert torch.equal(flat(model), w0)


# ---------------------------------------------------------------------------------------------
# stage switch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma,T", [(0.7, 200), (0.7, 10), (0.7, 15), (0.5, 4), (0.33, 7), (0.0, 5),
                                     (0.99, 3)])
def test_head_rho_is_zero_iff_update_rho_was_called_at_least_gamma_T_times(gamma, T):
    model = tiny_model()
    opt = sm.SSESAM(sgd(model), model, head_rho=0.05, tail_rho=0.1, gamma=gamma, total_epochs=T)
    cut = round(gamma * T, 9)  # gamma * T as a decimal: 0.7 * 10 is 7, not 7.000000000000001
    for k in range(T + 2):
        assert opt.head_rho == (0.0 if k >= cut else 0.05), (k, cut)
        assert opt.tail_rho == 0.1 and opt.rho_is == [opt.head_rho, 0.1]
        opt.update_rho()


def test_official_switch_points():
    model = tiny_model()
    # gamma 0.7, T 200: epochs 1-140 perturb the head, 141-200 do not
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.7, total_epochs=200)
    on = []
    for _ in range(200):
        on.append(opt.head_rho > 0)
        opt.update_rho()
    assert on == [True] * 140 + [False] * 60
    # gamma 0.7, T 10: head rho 0.05 after 1-6 calls, 0 from the 7th on (as checked on the official code)
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.7, total_epochs=10)
    after = []
    for _ in range(10):
        opt.update_rho()
        after.append(opt.head_rho)
    assert after == [0.05] * 6 + [0.0] * 4


def test_optimizer_state_dict_round_trip_keeps_momentum_and_the_stage_counter():
    model = tiny_model(torch.float32)
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.5, total_epochs=4)
    x, y = batch(dtype=torch.float32)
    sm.ssesam_step(model, sm.LongTailLoss("CE", COUNTS), opt, x, y, torch.isin(y, TAIL_CLASSES))
    for _ in range(2):
        opt.end_epoch()  # = update_rho()
    state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = sm.SSESAM(sgd(twin), twin, 0.05, 0.1, gamma=0.5, total_epochs=4)
    assert twin_opt.head_rho == 0.05
    twin_opt.load_state_dict(state)
    assert twin_opt.k == 2 and twin_opt.head_rho == 0.0 and twin_opt.rhos == (0.0, 0.1)
    bufs = [twin_opt.optimizer.state[p]["momentum_buffer"] for p in twin.parameters()]
    assert all(torch.equal(a, opt.optimizer.state[p]["momentum_buffer"])
               for a, p in zip(bufs, model.parameters()))


def test_split_losses_refuses_a_mean_reduced_loss():
    tail = torch.tensor([False, True, True])
    with pytest.raises(ValueError, match="reduction='none'"):
        sm.split_losses(torch.tensor(1.5), tail)


def test_bad_ssesam_arguments_raise():
    model = tiny_model()
    for kwargs in ({"gamma": 1.0}, {"gamma": -0.1}, {"head_rho": -1.0}, {"total_epochs": 0}):
        args = {"head_rho": 0.05, "tail_rho": 0.1, **kwargs}
        with pytest.raises(ValueError):
            sm.SSESAM(sgd(model), model, **args)


# ---------------------------------------------------------------------------------------------
# the efficient steps give the same new weights as the definitions (float64)
# ---------------------------------------------------------------------------------------------

def run_seed_snippet(model, x, y, head_rho, tail_rho, gamma, T, epochs_done=0):
    optimizer = sm.SSESAM(sgd(model), model, head_rho, tail_rho, gamma=gamma, total_epochs=T)
    for _ in range(epochs_done):
        optimizer.update_rho()
    scope = {"torch": torch, "optim_mode": "ssesam", "targets": y, "images": x, "model": model,
             "tail_classes": TAIL_CLASSES, "lossFunc": nn.CrossEntropyLoss(reduction="none"),
             "optimizer": optimizer}
    exec(SEED_SNIPPET, scope)
    return scope


def run_step(step, opt, model, x, y, imbsam_weight="group"):
    crit = sm.LongTailLoss("CE", COUNTS).double()
    tail = torch.isin(y, TAIL_CLASSES)
    return step(model, crit, opt, x, y, tail, imbsam_weight)


@pytest.mark.parametrize("epochs_done", [0, 7])  # stage 1 (3F+4B) and stage 2 (2F+3B)
def test_efficient_ssesam_step_equals_the_seed_snippets_4_pass_order(epochs_done):
    ref, fast = tiny_model(), tiny_model()
    ref_opt_args = dict(head_rho=0.05, tail_rho=0.1, gamma=0.7, T=10, epochs_done=epochs_done)
    fast_opt = sm.SSESAM(sgd(fast), fast, 0.05, 0.1, gamma=0.7, total_epochs=10)
    for _ in range(epochs_done):
        fast_opt.update_rho()
    assert fast_opt.head_rho == (0.05 if epochs_done == 0 else 0.0)
    x, y = batch()
    scope = run_seed_snippet(ref, x, y, **ref_opt_args)
    run_step(sm.ssesam_step, fast_opt, fast, x, y)
    assert torch.allclose(flat(fast), flat(ref), rtol=0, atol=1e-10)
    # a second step, through SGD's momentum buffers too
    x2, y2 = batch(seed=2)
    scope.update(images=x2, targets=y2)
    exec(SEED_SNIPPET, scope)
    run_step(sm.ssesam_step, fast_opt, fast, x2, y2)
    assert torch.allclose(flat(fast), flat(ref), rtol=0, atol=1e-10)


def test_ssesam_step_follows_the_update_rule():
    # G = grad L_head(w + eps_head) + grad L_tail(w + eps_tail), eps_g = rho_g grad L_g(w) / ||.||
    model = tiny_model()
    x, y = batch()
    B, tail = len(y), torch.isin(y, TAIL_CLASSES)
    g_h = grads_at(model, lambda m: ce_sum(m, x, y, ~tail, B))
    g_t = grads_at(model, lambda m: ce_sum(m, x, y, tail, B))
    G = [a + b for a, b in zip(grads_at(shifted(model, naive_eps(g_h, 0.05)), lambda m: ce_sum(m, x, y, ~tail, B)),
                               grads_at(shifted(model, naive_eps(g_t, 0.1)), lambda m: ce_sum(m, x, y, tail, B)))]
    lr, wd = 0.1, 1e-3
    want = torch.cat([(p.detach() - lr * (g + wd * p.detach())).reshape(-1)  # first SGD step: buf = g
                      for p, g in zip(model.parameters(), G)])
    run_step(sm.ssesam_step, sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.7, total_epochs=10), model, x, y)
    assert torch.allclose(flat(model), want, rtol=0, atol=1e-10)


def test_imbsam_step_follows_its_rule_for_both_weightings():
    # G = grad L_head(w) + grad L_tail(w + eps_tail)
    for weight in ("group", "batch"):
        model = tiny_model()
        x, y = batch()
        tail = torch.isin(y, TAIL_CLASSES)
        n_h, n_t = (int((~tail).sum()), int(tail.sum())) if weight == "group" else (len(y), len(y))
        g_h = grads_at(model, lambda m: ce_sum(m, x, y, ~tail, n_h))
        g_t = grads_at(model, lambda m: ce_sum(m, x, y, tail, n_t))
        g_tp = grads_at(shifted(model, naive_eps(g_t, 0.05)), lambda m: ce_sum(m, x, y, tail, n_t))
        want = torch.cat([(p.detach() - 0.1 * (a + b + 1e-3 * p.detach())).reshape(-1)
                          for p, a, b in zip(model.parameters(), g_h, g_tp)])
        run_step(sm.imbsam_step, sm.ImbSAM(sgd(model), model, rho=0.05), model, x, y, weight)
        assert torch.allclose(flat(model), want, rtol=0, atol=1e-10), weight


def test_imbsam_batch_weighting_equals_ssesam_with_gamma_0():
    a, b = tiny_model(), tiny_model()
    opt_a = sm.ImbSAM(sgd(a), a, rho=0.1)
    opt_b = sm.SSESAM(sgd(b), b, head_rho=0.05, tail_rho=0.1, gamma=0.0, total_epochs=10)
    assert opt_b.head_rho == 0.0  # gamma = 0: no head perturbation from the very first step
    for seed in (1, 2):
        x, y = batch(seed)
        run_step(sm.imbsam_step, opt_a, a, x, y, "batch")
        run_step(sm.ssesam_step, opt_b, b, x, y)
    assert torch.allclose(flat(a), flat(b), rtol=0, atol=1e-12)


def test_sam_step_follows_its_rule():
    model = tiny_model()
    x, y = batch()
    g = grads_at(model, lambda m: F.cross_entropy(m(x), y))
    g_p = grads_at(shifted(model, naive_eps(g, 0.05)), lambda m: F.cross_entropy(m(x), y))
    want = torch.cat([(p.detach() - 0.1 * (a + 1e-3 * p.detach())).reshape(-1)
                      for p, a in zip(model.parameters(), g_p)])
    run_step(sm.sam_step, sm.SAM(sgd(model), model, rho=0.05), model, x, y)
    assert torch.allclose(flat(model), want, rtol=0, atol=1e-10)


# DRW: a re-weighted batch averages by its weights, as F.cross_entropy(weight=w) does


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
    assert 0 < tail.sum() < len(y) and W / len(y) < 0.8  # sum w / B is far from 1: 1/B would differ

    def ce(m, mask, denom):  # plain autograd: sum_{i in mask} w_{y_i} l_i / denom
        return F.cross_entropy(m(x)[mask], y[mask], weight=wc, reduction="sum") / denom

    if name in ("sgd", "sam"):
        def full(m):
            return F.cross_entropy(m(x), y, weight=wc)  # its mean: sum w l / sum w
        G = grads_at(model, full)
        if name == "sam":
            G = grads_at(shifted(model, naive_eps(G, 0.05)), full)
    elif name == "imbsam":
        d_head = {"batch": W, "imbsam_repo": W, "group": wc[y[~tail]].sum()}[weighting]
        d_tail = {"batch": W, "imbsam_repo": W / 2, "group": wc[y[tail]].sum()}[weighting]
        g_t = grads_at(model, lambda m: ce(m, tail, d_tail))
        G = [a + b for a, b in zip(grads_at(model, lambda m: ce(m, ~tail, d_head)),
                                   grads_at(shifted(model, naive_eps(g_t, 0.05)), lambda m: ce(m, tail, d_tail)))]
    else:  # SSE-SAM, stage 1: rho_head 0.05, rho_tail 0.1, both groups over the batch's weight sum
        g_h = grads_at(model, lambda m: ce(m, ~tail, W))
        g_t = grads_at(model, lambda m: ce(m, tail, W))
        G = [a + b for a, b in zip(grads_at(shifted(model, naive_eps(g_h, 0.05)), lambda m: ce(m, ~tail, W)),
                                   grads_at(shifted(model, naive_eps(g_t, 0.1)), lambda m: ce(m, tail, W)))]
    want = torch.cat([(p.detach() - 0.1 * (g + 1e-3 * p.detach())).reshape(-1)  # first step: buf = g
                      for p, g in zip(model.parameters(), G)])
    sm.STEPS[name](model, crit, make_opt(name, model), x, y, tail, weighting)
    assert torch.allclose(flat(model), want, rtol=0, atol=1e-10)


def test_split_losses_divide_by_sums_of_weights_and_imbsam_repo_doubles_the_tail():
    loss_i = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    tail = torch.tensor([False, True, False, True, True])
    h, t = sm.split_losses(loss_i, tail, "imbsam_repo")  # the ImbSAM code: head / B, 2 * tail / B
    assert h.item() == (1 + 3) / 5 and t.item() == 2 * (2 + 4 + 5) / 5
    w = torch.tensor([0.5, 2.0, 0.25, 1.0, 4.0], dtype=torch.float64)
    assert [v.item() for v in sm.split_losses(loss_i, tail, "batch", w)] == [4 / 7.75, 11 / 7.75]
    assert [v.item() for v in sm.split_losses(loss_i, tail, "group", w)] == [4 / 0.75, 11 / 7.0]
    assert [v.item() for v in sm.split_losses(loss_i, tail, "imbsam_repo", w)] == [4 / 7.75, 22 / 7.75]


# ---------------------------------------------------------------------------------------------
# passes per step, BN statistics, empty groups
# ---------------------------------------------------------------------------------------------

def make_opt(name, model, epochs_done=0):
    if name == "sgd":
        return sgd(model)
    if name == "sam":
        return sm.SAM(sgd(model), model, 0.05)
    if name == "imbsam":
        return sm.ImbSAM(sgd(model), model, 0.05)
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.5, total_epochs=2)
    for _ in range(epochs_done):
        opt.update_rho()
    return opt


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


@pytest.mark.parametrize("name", ["sgd", "sam", "imbsam", "ssesam"])
@pytest.mark.parametrize("group", ["head", "tail"])
def test_a_batch_with_an_empty_group_gives_no_nan(name, group):
    model = tiny_model(torch.float32)
    labels = [0, 1, 2, 3] * 4 if group == "head" else [6, 7, 8, 9] * 4
    x, y = batch(dtype=torch.float32, labels=labels)
    opt = make_opt(name, model)
    _, loss_i = sm.STEPS[name](model, sm.LongTailLoss("CE", COUNTS), opt, x, y,
                               torch.isin(y, TAIL_CLASSES))
    assert torch.isfinite(loss_i).all() and torch.isfinite(flat(model)).all()
    h, t = sm.split_losses(loss_i, torch.isin(y, TAIL_CLASSES), "group")
    assert torch.isfinite(h) and torch.isfinite(t)


def test_split_losses_weightings():
    loss_i = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    tail = torch.tensor([False, True, False, True, True])
    h, t = sm.split_losses(loss_i, tail, "batch")
    assert h.item() == (1 + 3) / 5 and t.item() == (2 + 4 + 5) / 5
    h, t = sm.split_losses(loss_i, tail, "group")
    assert h.item() == (1 + 3) / 2 and t.item() == (2 + 4 + 5) / 3


# ---------------------------------------------------------------------------------------------
# schedule and evaluation
# ---------------------------------------------------------------------------------------------

def test_cosine_lr_is_stepped_before_each_epoch_as_officially():
    cfg = sm.Config()
    assert abs(sm.lr_at(0, cfg) - 0.005 * (1 + math.cos(math.pi / 200))) < 1e-15
    assert abs(sm.lr_at(0, cfg) - 0.0099994) < 1e-7
    assert abs(sm.lr_at(139, cfg) - 0.002061) < 1e-6
    assert abs(sm.lr_at(199, cfg)) < 1e-15  # the last epoch trains at lr 0


def test_many_medium_few_for_cifar100_if100():
    counts = sm.lt_class_counts(500, 100, 100)
    g = sm.shot_groups(counts, 500)
    assert [int(g[k].sum()) for k in ("many", "med", "few")] == [35, 35, 30]
    assert all((n > 100) == bool(g["many"][c]) and (n < 20) == bool(g["few"][c]) for c, n in enumerate(counts))


class PredictById(nn.Module):
    """Reads an image id from pixel (0, 0) (also written at (0, 31), so mirroring keeps it) and
    predicts preds[id]."""

    def __init__(self, preds, C):
        super().__init__()
        self.preds, self.C = torch.tensor(preds), C

    def forward(self, inp):
        ids = ((inp[:, 0, 0, 0] * sm.STD[0] + sm.MEAN[0]) * 255).round().long()
        return F.one_hot(self.preds[ids], self.C).float()


def test_evaluate_reports_mean_per_class_accuracy_and_groups():
    counts = [300, 100, 50, 10]  # n_max 300: many (> 60) = classes 0, 1; med = 2; few (< 12) = 3
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
    preds = [0, 1, 1, 1, 2, 0, 3, 0, 0, 3]
    x = torch.zeros(len(y), 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 0, 0] = x[:, 0, 0, 31] = torch.arange(len(y), dtype=torch.uint8)
    per_class = [100 * sum(p == c for p, t in zip(preds, y.tolist()) if t == c) / int((y == c).sum())
                 for c in range(4)]  # 50, 100, 50, 50
    model = PredictById(preds, 4).eval()
    r = sm.evaluate(model, x, y, counts, 300, batch_size=3)
    assert not model.training  # evaluate leaves the mode as it found it
    for suffix in ("", "_tta"):  # the id survives mirroring, so flip-TTA changes nothing here
        assert abs(r["avg" + suffix] - sum(per_class) / 4) < 1e-9
        assert abs(r["many" + suffix] - (per_class[0] + per_class[1]) / 2) < 1e-9
        assert abs(r["med" + suffix] - per_class[2]) < 1e-9
        assert abs(r["few" + suffix] - per_class[3]) < 1e-9


def test_flip_tta_averages_the_logits_of_image_and_mirror():
    # class 0 when the left half is brighter (logit 1), class 1 otherwise (logit 2): averaging an
    # image with its mirror always lands on class 1
    class LeftRight(nn.Module):
        def forward(self, inp):
            left = inp[:, 0, :, :16].mean((1, 2)) > inp[:, 0, :, 16:].mean((1, 2))
            return torch.stack([left.float(), 2 * (~left).float()], 1)

    x = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    x[:2, :, :, :16] = 255  # images 0, 1: bright left, label 0
    x[2, :, :, 16:] = 255   # image 2: bright right, label 1
    y = torch.tensor([0, 0, 1])
    r = sm.evaluate(LeftRight(), x, y, [10, 10], 10)
    assert r["avg"] == 100.0      # plain: all three right
    assert r["avg_tta"] == 50.0   # TTA: class 0 images become class 1 (0 %), class 1 stays (100 %)


def test_seed_snippet_runs_verbatim_after_importing_from_ssesam_minimal():
    model = tiny_model()
    x, y = batch()
    w0 = flat(model).clone()
    scope = {"torch": torch, "optim_mode": "ssesam", "targets": y, "images": x, "model": model,
             "tail_classes": TAIL_CLASSES, "lossFunc": nn.CrossEntropyLoss(reduction="none")}
    exec("from ssesam_minimal import SSESAM\n"
         "optimizer = SSESAM(torch.optim.SGD(model.parameters(), lr=0.1), model, head_rho=0.05, "
         "tail_rho=0.1, gamma=0.7, total_epochs=10)\n" + SEED_SNIPPET, scope)
    assert torch.isfinite(scope["loss"]) and not torch.equal(flat(model), w0)
    scope["optimizer"].update_rho()


def readme_code_blocks(lang):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        return re.findall(rf"```{lang}\n(.*?)```", fh.read(), re.S)


def test_readme_example_for_your_own_training_loop_runs_as_written(tmp_path, monkeypatch, capsys):
    (example,) = readme_code_blocks("python")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(example, scope)
    out = capsys.readouterr().out.splitlines()
    assert out == ["epoch 0: rho_head 0.05, rho_tail 0.1", "epoch 1: rho_head 0.0, rho_tail 0.1"]
    assert scope["opt"].k == 2 and scope["loss_i"].shape == scope["y"].shape  # per-sample losses
    assert all(torch.isfinite(p).all() for p in scope["model"].parameters())


def test_every_ssesam_minimal_command_in_the_readme_parses():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        text = fh.read().replace("\n", " ")
    commands = re.findall(r"python ssesam_minimal\.py((?: --?[\w.]+(?: [\w.]+)?)*)", text)
    assert len(commands) >= 3  # the main command, the seed command, the smoke run
    for args in (a for a in commands if "--help" not in a):
        sm.check_config(sm.Config(**vars(sm.build_parser().parse_args(args.split()))))


@pytest.mark.parametrize("argv,needle", [(["--gpu", "3"], "--gpu 3"), (["--device", "cuda:5"], "cuda:5")])
def test_a_gpu_that_does_not_exist_exits_2(argv, needle, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend: one GPU, index 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = expect_usage_exit(["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1"] + argv, capsys)
    assert needle in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_exits_2(capsys):
    line = expect_usage_exit(["--dataset", "synthetic", "--device", "cuda"], capsys)
    assert "--device cuda" in line


# =============================================================================================
# Step-path speed-ups: foreach SGD, channels_last
# =============================================================================================

@pytest.mark.parametrize("name", sm.OPTS)
def test_make_optimizers_fused_sgd_gives_the_weights_of_the_per_parameter_loop(name):
    cfg = sm.Config(opt=name, lr=0.1, rho=0.05, head_rho=0.05, tail_rho=0.1, gamma=0.5, epochs=2)
    fast, plain = tiny_model(), tiny_model()
    fast_opt, plain_opt = sm.make_optimizer(cfg, fast), make_opt(name, plain)  # make_opt: SGD's default
    assert (fast_opt if name == "sgd" else fast_opt.optimizer).defaults["fused"] is True
    assert (plain_opt if name == "sgd" else plain_opt.optimizer).defaults["foreach"] is None  # CPU: a loop
    for seed in (1, 2):  # the second step uses the momentum buffers
        x, y = batch(seed)
        run_step(sm.STEPS[name], fast_opt, fast, x, y)
        run_step(sm.STEPS[name], plain_opt, plain, x, y)
        assert torch.allclose(flat(fast), flat(plain), rtol=0, atol=1e-12), (name, seed)


def test_a_channels_last_network_takes_the_steps_of_a_contiguous_one():
    # train() keeps the network and the images channels_last on every device: a layout, not maths
    plain = tiny_model(torch.float32)
    fast = tiny_model(torch.float32).to(memory_format=torch.channels_last)
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    opts = {m: sm.make_optimizer(sm.Config(lr=0.1), m) for m in (plain, fast)}
    crit = sm.LongTailLoss("CE", COUNTS)
    for seed in (1, 2):
        x, y = batch(seed, dtype=torch.float32)
        tail = torch.isin(y, TAIL_CLASSES)
        sm.ssesam_step(plain, crit, opts[plain], x, y, tail)
        sm.ssesam_step(fast, crit, opts[fast], x.contiguous(memory_format=torch.channels_last), y, tail)
        assert torch.allclose(flat(fast), flat(plain), rtol=0, atol=1e-5), seed
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the steps keep it


# =============================================================================================
# scripts/bench.py: pass and operator counts, the official baseline step, the CLI
# =============================================================================================

_spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "scripts", "bench.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def expect_bench_exit(argv, capsys):
    return expect_usage_exit(argv, capsys, bench.main, "bench.py")


BENCH_PASSES = {"sgd": (1, 1), "sam": (2, 2), "imbsam": (2, 3), "ssesam before the switch": (3, 4),
                "ssesam after the switch": (2, 3), "ssesam before the switch, contiguous": (3, 4),
                "official ssesam": (4, 4)}  # (forwards, backwards)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """scripts/bench.py at its smallest, on the CPU: ResNet-8, batch 4, augmentation over 492 images."""
    base = tmp_path_factory.mktemp("bench")
    result = bench.main(["--device", "cpu", "--arch", "resnet8", "--batch_size", "4",
                         "--dataset", "synthetic", "--data_dir", str(base / "data"), "--out", str(base / "out")])
    return result, base


def test_bench_reads_no_data_and_reports_the_passes_of_every_step(tiny_bench):
    result, base = tiny_bench
    steps = {k: (r["forwards"], r["backwards"]) for k, r in result["rows"].items() if "forwards" in r}
    assert steps == BENCH_PASSES
    assert not (base / "data").exists()
    assert json.loads((base / "out" / "bench.json").read_text()) == result
    counts, _ = sm.data_counts(sm.Config(dataset="synthetic"))
    assert result["rows"]["augmentation, ours"]["images"] == sum(counts) == 492
    for name, r in result["rows"].items():
        assert len(r["ms"]) == result["repeats"] and all(t > 0 for t in r["ms"]), name
        assert r["median_ms"] == float(np.median(r["ms"])), name
    # every optimizer also through GraphedStep: eager on static buffers here, no kernel times
    graphed = {k: r["passes"] for k, r in result["rows"].items() if k.endswith(", graphed")}
    assert graphed == {f"{k}, graphed": "static" for k in BENCH_PASSES
                       if k not in ("official ssesam", "ssesam before the switch, contiguous")}
    assert all(r.get("kernel_ms", None) is None for r in result["rows"].values())


def test_bench_sam_family_steps_dispatch_fewer_ops_than_the_official_step(tiny_bench):
    rows = tiny_bench[0]["rows"]
    official = rows["official ssesam"]
    for name in ("sam", "imbsam", "ssesam before the switch", "ssesam after the switch",
                 "ssesam before the switch, contiguous"):
        assert rows[name]["ops"] < official["ops"], name
        assert rows[name]["own_ops"] < official["own_ops"], name
        assert 0 < rows[name]["own_ops"] < rows[name]["ops"], name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_on_cuda_reports_the_passes_of_every_step():
    result = bench.main(["--device", "cuda", "--arch", "resnet8", "--batch_size", "4",
                         "--dataset", "synthetic"])
    assert result["device"].startswith("cuda")
    assert {k: (r["forwards"], r["backwards"]) for k, r in result["rows"].items()
            if "forwards" in r} == BENCH_PASSES
    assert all(t > 0 for r in result["rows"].values() for t in r["ms"])
    assert all(r["passes"] == "graph" for k, r in result["rows"].items() if k.endswith(", graphed"))
    assert all(r["kernel_ms"] > 0 for r in result["rows"].values() if "forwards" in r)


def test_bench_with_a_bad_imb_factor_exits_2_before_timing_anything(capsys):
    line = expect_bench_exit(["--dataset", "synthetic", "--imb_factor", "1000"], capsys)
    assert "--imb_factor" in line and "no training image" in line


def test_bench_out_that_is_an_existing_file_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    line = expect_bench_exit(["--dataset", "synthetic", "--arch", "resnet8", "--out", str(out)], capsys)
    assert "--out" in line
    assert out.read_text() == "not a folder"


BENCH_SUBPROCESS_CASES = {"bad-imb_factor": ["--imb_factor", "1000", "--dataset", "synthetic"],
                          "help": ["--help"]}


@pytest.fixture(scope="module")
def bench_subprocesses(tmp_path_factory):
    """Run `python <repo>/scripts/bench.py ...` for every BENCH_SUBPROCESS_CASES, all at once, from a
    folder outside the repo and with the repo off PYTHONPATH: the script must find ssesam_minimal.py
    from its own location."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    env = dict(os.environ, **NO_NET_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and os.path.abspath(p) != REPO)
    procs = {key: subprocess.Popen([sys.executable, os.path.join(REPO, "scripts", "bench.py")] + argv,
                                   cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, argv in BENCH_SUBPROCESS_CASES.items()}
    results = {}
    for key, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        results[key] = (p.returncode, stdout, stderr)
    return results


def test_bench_script_from_another_folder_exits_2_with_one_line_and_no_traceback(bench_subprocesses):
    returncode, stdout, stderr = bench_subprocesses["bad-imb_factor"]
    assert returncode == 2, stderr
    assert "Traceback" not in stderr and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench.py: error: --imb_factor 1000"), stderr


def test_bench_script_help_exits_0_and_lists_no_bench_flag(bench_subprocesses):
    returncode, stdout, stderr = bench_subprocesses["help"]
    assert returncode == 0 and stderr == "", stderr
    assert stdout.startswith("usage: bench.py") and "--out" in stdout
    assert "--bench" not in stdout


def test_count_step_counts_passes_and_one_own_op_per_dispatched_call():
    model = tiny_model(torch.float32)
    x, _ = batch(dtype=torch.float32)
    params = list(model.parameters())

    def step():
        model(x).sum().backward()          # own: the sum and the backward's seed (ones_like)
        with torch.no_grad():
            for p in params:               # own: one op per tensor
                p.add_(1)
            torch._foreach_add_(params, 1)  # own: one op for all of them
    forwards, backwards, ops, own = bench.count_step(step, model, nn.Identity())
    assert (forwards, backwards) == (1, 1)
    assert own == 2 + len(params) + 1
    model.zero_grad(set_to_none=True)      # as before the counted step: no .grad to accumulate into
    counter = bench.OpCounter()
    with counter:
        model(x).sum().backward()
    assert ops - own == counter.ops - 2    # the rest are exactly the forward's and backward's ops


@pytest.mark.parametrize("epochs_done", [0, 7])  # before and after the switch (gamma 0.7, T 10)
def test_official_baseline_step_gives_the_weights_of_ssesam_step(epochs_done):
    ours, official = tiny_model(), tiny_model()
    opt = sm.SSESAM(sgd(ours), ours, 0.05, 0.1, gamma=0.7, total_epochs=10)
    for _ in range(epochs_done):
        opt.update_rho()
    # the official update_rho() sets rho_head to 0 at the switch
    off = bench.OfficialSSESAM(sgd(official), official, opt.head_rho, 0.1)
    for seed in (1, 2):  # a second step goes through SGD's momentum buffers
        x, y = batch(seed)
        run_step(sm.ssesam_step, opt, ours, x, y)
        bench.official_ssesam_step(official, nn.CrossEntropyLoss(reduction="none"), off, x, y,
                                   torch.isin(y, TAIL_CLASSES))
        # restoring w by subtracting eps leaves rounding residue; copying back leaves none
        assert torch.allclose(flat(ours), flat(official), rtol=0, atol=1e-10)
    # BN running statistics differ by design: the official step updates them in all 4 forwards
    assert int(ours.bn1.num_batches_tracked) == 2 and int(official.bn1.num_batches_tracked) == 8


class SyncCounter(bench.OpCounter):
    """Also counts reads of a tensor's value back to the host (.item(), bool(), float())."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_our_steps_add_no_op_per_parameter_tensor_and_no_sync_the_official_step_does_both():
    own, syncs, n_tensors = {}, {}, {}
    for depth in (8, 14):
        for name in ("sgd", "sam", "imbsam", "ssesam", "official"):
            model = sm.CifarResNet(depth, C)
            n_tensors[depth] = len(list(model.parameters()))
            crit = sm.LongTailLoss("CE", COUNTS)
            x, y = batch(dtype=torch.float32)
            tail = torch.isin(y, TAIL_CLASSES)
            if name == "official":
                opt = bench.OfficialSSESAM(sgd(model), model, 0.05, 0.1)
                step = lambda: bench.official_ssesam_step(model, crit, opt, x, y, tail)
            else:
                opt = sm.make_optimizer(sm.Config(opt=name), model)
                step = lambda: sm.STEPS[name](model, crit, opt, x, y, tail)
            step()  # the first step makes SGD's momentum buffers, one per tensor
            own[name, depth] = bench.count_step(step, model, crit)[3]
            with SyncCounter() as counter:
                step()
            syncs[name] = counter.syncs
    assert n_tensors[14] > n_tensors[8]
    for name in ("sgd", "sam", "imbsam", "ssesam"):
        assert own[name, 14] == own[name, 8], name
        assert syncs[name] == 0, name
    assert own["official", 14] - own["official", 8] >= 10 * (n_tensors[14] - n_tensors[8])
    assert syncs["official"] >= 1


# =============================================================================================
# Saddle analysis: Hessian eigenvalues against the exact ones of a tiny model
# =============================================================================================

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
    """n uint8 8 x 8 images (the network pools globally) and labels over all C classes."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8),
            torch.randint(0, C, (n,), generator=g))


def mean_ce(model, x, y):
    """The obvious group loss: mean CE over all images, no augmentation."""
    return F.cross_entropy(model(sm.normalize(x).double()), y)


def exact_hessian(model, x, y):
    """The full P x P Hessian of mean_ce in eval mode, over the flattened parameters."""
    model.eval()
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()])
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    xn = sm.normalize(x).double()

    def L(w):
        parts = w.split([s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return F.cross_entropy(torch.func.functional_call(model, params, (xn,)), y)

    return torch.autograd.functional.hessian(L, w)


def ce_criterion():
    return sm.LongTailLoss("CE", COUNTS).double()


def test_hessian_model_is_tiny_and_its_hessian_is_indefinite():
    model = hessian_model()
    assert sum(p.numel() for p in model.parameters()) == 3 * 4 * 9 + 2 * 4 + 4 * C + C
    H = exact_hessian(model, *hessian_data())
    assert torch.allclose(H, H.T, rtol=0, atol=1e-14)
    ev = torch.linalg.eigvalsh(H)
    assert ev[0] < -0.1 and ev[-1] > 0.1  # a saddle: so lambda_min and lambda_max are both tested


@pytest.mark.parametrize("batch_size", [7, 16, 40, 100])
def test_group_loss_terms_sum_to_the_mean_loss_over_all_images(batch_size):
    model = hessian_model()
    x, y = hessian_data()
    terms = list(sm.group_loss_terms(model, ce_criterion(), x, y, batch_size))
    assert len(terms) == math.ceil(len(y) / batch_size)  # one term (one graph) per batch
    assert torch.allclose(sum(terms), mean_ce(model, x, y), rtol=0, atol=1e-14)


def test_hvp_equals_the_exact_hessian_times_v():
    model = hessian_model()
    x, y = hessian_data()
    H = exact_hessian(model, x, y)
    for seed in (0, 1):
        v = torch.randn(len(H), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        Hv = sm.hvp(model, ce_criterion(), x, y, v, batch_size=16)  # 16 + 16 + 8 images
        assert torch.allclose(Hv, H @ v, rtol=0, atol=1e-13)
        with torch.no_grad():  # works where the caller switched autograd off
            assert torch.allclose(sm.hvp(model, ce_criterion(), x, y, v, batch_size=16), Hv, rtol=0, atol=1e-15)
    assert all(p.grad is None for p in model.parameters())  # .grad is left alone


def test_hessian_extremes_equal_the_exact_extreme_eigenvalues():
    model = hessian_model()
    x, y = hessian_data()
    ev = torch.linalg.eigvalsh(exact_hessian(model, x, y))
    lo, hi = ev[0].item(), ev[-1].item()
    # converged: power iteration to a 1e-12 change, 40 Lanczos steps (P = 166)
    r = sm.hessian_extremes(model, ce_criterion(), x, y, max_iter=1000, tol=1e-12, k=40, batch_size=16)
    assert abs(r["lambda_max"] - hi) < 1e-8 * abs(hi)
    assert abs(r["lambda_min"] - lo) < 1e-8 * abs(lo)
    assert abs(r["ratio"] - lo / hi) < 1e-7
    # the defaults (tol 1e-3, k 30): lambda_max to the tolerance, lambda_min never below the truth
    r = sm.hessian_extremes(model, ce_criterion(), x, y, batch_size=16)
    assert abs(r["lambda_max"] - hi) < 1e-3 * abs(hi)
    assert lo - 1e-10 <= r["lambda_min"] < lo + 1e-6 * abs(lo)


def rotated(eigenvalues, seed=0):
    """A symmetric matrix Q diag(eigenvalues) Q^T with a random orthogonal Q (float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T


def test_lambda_max_is_found_also_when_the_most_negative_eigenvalue_dominates():
    A = rotated([-5.0, -1.0, 0.5, 2.0, 3.0])
    v0 = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # plain power iteration finds the eigenvalue of largest |lambda|, here lambda_min
    assert abs(sm.power_iteration(lambda v: A @ v, v0, 1000, 1e-14) - -5.0) < 1e-9
    assert abs(sm.lambda_max(lambda v: A @ v, v0, 1000, 1e-14) - 3.0) < 1e-9
    B = rotated([-1.0, 0.5, 2.0, 3.0])  # lambda_max dominates: one run
    v0 = v0[:4]
    assert abs(sm.lambda_max(lambda v: B @ v, v0, 1000, 1e-14) - 3.0) < 1e-9


def test_lanczos_ritz_values_are_the_eigenvalues_after_n_steps_and_stop_on_an_invariant_space():
    ev = torch.linspace(-2, 7, 12, dtype=torch.float64)
    A = rotated(ev.tolist())
    v0 = torch.randn(12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(sm.lanczos(lambda v: A @ v, v0, k=12), ev, rtol=0, atol=1e-10)
    assert len(sm.lanczos(lambda v: A @ v, v0, k=5)) == 5
    # repeated eigenvalues: the Krylov space has dimension 3 (one per distinct eigenvalue), so
    # Lanczos stops after 3 steps with the exact distinct eigenvalues, not with noise
    R = rotated([1.0, 1.0, 1.0, 2.0, 2.0, 5.0])
    ritz = sm.lanczos(lambda v: R @ v, v0[:6], k=6)
    assert torch.allclose(ritz, torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("train_mode", [True, False])
def test_hessian_extremes_uses_eval_mode_restores_the_mode_and_changes_nothing(train_mode):
    model = hessian_model()
    x, y = hessian_data()
    reference = sm.hessian_extremes(model, ce_criterion(), x, y, max_iter=5, k=5)  # model in eval mode
    model.train(train_mode)
    state = copy.deepcopy(model.state_dict())
    r = sm.hessian_extremes(model, ce_criterion(), x, y, max_iter=5, k=5)
    assert model.training == train_mode
    assert r == reference  # BN used its running statistics in both calls
    for k, v in model.state_dict().items():  # weights and BN statistics untouched
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_saddle_analysis_takes_head_and_tail_by_eta_and_subsets_without_repeats(monkeypatch):
    model = hessian_model()
    x, y = hessian_data(n=60)
    tail = torch.isin(y, TAIL_CLASSES)  # COUNTS with ETA 50: classes 6..9
    assert 0 < int(tail.sum()) < len(y)
    r = sm.saddle_analysis(model, ce_criterion(), x, y, COUNTS, ETA, max_iter=5, k=5)
    assert r["head"] == sm.hessian_extremes(model, ce_criterion(), x[~tail], y[~tail], max_iter=5, k=5)
    assert r["tail"] == sm.hessian_extremes(model, ce_criterion(), x[tail], y[tail], max_iter=5, k=5)
    seen = []
    monkeypatch.setattr(sm, "hessian_extremes", lambda model, criterion, x, y, **kw: seen.append((x, y)))
    sm.saddle_analysis(model, ce_criterion(), x, y, COUNTS, ETA, max_images=8)
    (xh, yh), (xt, yt) = seen
    assert len(yh) == 8 and len(yt) == min(8, int(tail.sum()))
    assert not torch.isin(yh, TAIL_CLASSES).any() and torch.isin(yt, TAIL_CLASSES).all()
    for xs, group in ((xh, x[~tail]), (xt, x[tail])):  # distinct images of the group, none twice
        rows = {tuple(r.flatten().tolist()) for r in group}
        picked = [tuple(r.flatten().tolist()) for r in xs]
        assert len(set(picked)) == len(picked) and set(picked) <= rows


# =============================================================================================
# Tutorial notebook
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
    assert settings.startswith("settings: synthetic, IF 100, resnet8, 10 epochs")  # the defaults, not quick mode


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
    assert settings.startswith("quick mode: synthetic"), settings
