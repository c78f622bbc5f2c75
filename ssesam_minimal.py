"""ssesam_minimal.py -- SSE-SAM in one file: long-tailed CIFAR, ResNet, losses, SAM / ImbSAM / SSE-SAM.

Paper: Xingyu Lyu, Qianqian Xu, Zhiyong Yang, Shaojie Lyu, Qingming Huang. "SSE-SAM: Balancing Head
and Tail Classes Gradually through Stage-Wise SAM". AAAI 2025. https://arxiv.org/abs/2412.13715
Official code (the "seed"): https://github.com/Zemdalk/SSE-SAM. Its README's command and its
SSESAM usage snippet run here unchanged.

The method. In a long-tailed training set a few head classes hold most images. SAM minimises the
loss at the worst nearby point w + ε, ε = ρ·g/‖g‖; ImbSAM does so for the tail-class loss only.
SSE-SAM splits every batch by class into head (training count n_c ≥ η) and tail, perturbs each
group along its own gradient, and sets ρ_head = 0 after γ·T of the T epochs (ImbSAM from there on):

    G = ∇L_head(w + ε_head) + ∇L_tail(w + ε_tail),      L_group = Σ_{i in group} ℓ_i / B
    ε_group = ρ_group · ∇L_group(w) / ‖∇L_group(w)‖,     ρ_head = 0 after ⌈γT⌉ epochs

Reading map: sections in dependency order, each using only what is above it.
    Long-tailed CIFAR      lt_class_counts, lt_indices, load_data
    Augmentation           random_crop_flip, normalize, shuffled_epoch (on the device)
    Networks               CifarResNet / resnet32, resnet34 (the official code's backbone)
    Losses                 LongTailLoss: CE, LDAM, LA, VS per sample, DRW class weights
    The method             SAM, ImbSAM, SSE-SAM and their steps (ssesam_step is the update): one
                           marked block that runs alone on torch, to copy into your own code
    Evaluation             Avg and Many / Medium / Few
    Training               Config, build_run, lr_at, train_one_epoch, run_epoch: one epoch
    ---- the divider: a first reading may stop there; below it, the machinery of a run ----
    A run                  provenance of each piece, last.pt and resume, train(), finish()
    Command line           the flags (made from Config), checks, main()

Run: python ssesam_minimal.py (the seed command's settings: CIFAR-100-LT IF 100, ResNet-32, 200
epochs), or in seconds on a CPU, with the switch after epoch 2 of 4 and no download:
    python ssesam_minimal.py --dataset synthetic --arch resnet8 --epochs 4 --gamma 0.5
results/README.md has the table this file made (ResNet-32, CIFAR-100-LT, 200 epochs, bf16 on a
CPU), and README.md lists where this file differs from the official code.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import platform
import re
import signal
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class UsageError(Exception):
    """Bad input: main() prints it as one line and exits with code 2."""


# =============================================================================================
# Long-tailed CIFAR
# =============================================================================================

CIFAR = {  # folder, train files, test files, label key, images per class, classes, archive, md5
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 5000, 10, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python", ["train"], ["test"],
                 "fine_labels", 500, 100, "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


def lt_class_counts(n_max: int, num_classes: int, imb_factor: float) -> list:
    """n_i = ⌊n_max / IF^(i / (C - 1))⌋: class 0 keeps n_max images, class C-1 keeps n_max / IF."""
    if num_classes < 2:
        return [n_max] * num_classes
    return [int(n_max / imb_factor ** (i / (num_classes - 1))) for i in range(num_classes)]


def lt_indices(labels: np.ndarray, counts: list, subset_seed: Optional[int] = None) -> np.ndarray:
    """Indices of the first counts[c] images of each class c (file order, or a seeded shuffle)."""
    rng = np.random.RandomState(subset_seed) if subset_seed is not None else None
    picked = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise UsageError(f"class {c} has {len(idx)} training images but the imbalance factor "
                             f"asks for {n}")
        if rng is not None:
            rng.shuffle(idx)  # one shuffle per class, in class order, from one seed
        picked.append(idx[:n])
    return np.concatenate(picked)


def _read_cifar_files(folder: str, files: list, label_key: str, num_classes: int):
    """Read CIFAR python pickles into uint8 (N, 3, 32, 32) and int64 (N,) tensors."""
    xs, ys = [], []
    for name in files:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
        except Exception as e:  # whatever a damaged or foreign file raises, the user gets one line
            raise UsageError(f"{path} is not a readable CIFAR python file ({type(e).__name__})")
        if len(x) != len(y) or not ((0 <= y) & (y < num_classes)).all():
            raise UsageError(f"{path} is not a readable CIFAR python file ({len(x)} images, "
                             f"{len(y)} labels, labels must lie in 0..{num_classes - 1})")
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def ensure_cifar(data_dir: str, dataset: str) -> str:
    """Return the CIFAR folder, downloading (md5-checked) into data_dir if its files are missing."""
    folder, train, test, _, _, _, archive, md5 = CIFAR[dataset]
    path = os.path.join(data_dir, folder)
    if all(os.path.isfile(os.path.join(path, f)) for f in train + test):
        return path
    existed, had_archive = os.path.isdir(data_dir), os.path.isfile(os.path.join(data_dir, archive))
    try:
        torchvision.datasets.utils.download_and_extract_archive(
            CIFAR_URL + archive, download_root=data_dir, filename=archive, md5=md5)
    except Exception as e:  # no network, a bad archive: leave nothing behind, say what to place
        if not had_archive and os.path.isfile(os.path.join(data_dir, archive)):
            os.remove(os.path.join(data_dir, archive))
        if not existed and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)
        raise UsageError(f"{dataset} is not in {data_dir} and could not be downloaded "
                         f"({type(e).__name__}): place {archive} from {CIFAR_URL} (or its unpacked "
                         f"{folder}/ folder) in {data_dir}")
    return path


def synthetic_cifar(seed: int = 0, num_classes: int = 10, n_max: int = 200, n_test: int = 40):
    """A small, learnable, CIFAR-shaped data set made in memory: each class a smooth random colour
    pattern, each image that pattern plus pixel noise. Classes interleave as in CIFAR's files."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=32, mode="bilinear",
                           align_corners=False)  # (C, 3, 32, 32) in [0, 1]

    def sample(n_per_class):
        y = torch.arange(n_per_class * num_classes) % num_classes
        x = 40 + 175 * protos[y] + 40 * torch.randn(len(y), 3, 32, 32, generator=g)
        return x.round().clamp(0, 255).to(torch.uint8), y

    return sample(n_max), sample(n_test)


def data_counts(dataset: str, imb_factor: float):
    """The per-class training counts and n_max of a long-tailed data set; reads no data, so a bad
    imbalance factor is rejected before anything is read or downloaded."""
    n_max, num_classes = (200, 10) if dataset == "synthetic" else CIFAR[dataset][4:6]
    counts = lt_class_counts(n_max, num_classes, imb_factor)
    if min(counts) < 1:
        raise UsageError(f"--imb_factor {imb_factor:g} leaves class {counts.index(0)} with no "
                         f"training image ({dataset} has {n_max} per class: IF <= {n_max})")
    return counts, n_max


def load_data(dataset="cifar100", data_dir="./datasets", imb_factor=100.0, subset_seed=None):
    """(x, y, x_test, y_test, counts, n_max): the long-tailed train set and the whole test set as
    CPU tensors (uint8 images), the per-class training counts and n_max."""
    counts, n_max = data_counts(dataset, imb_factor)
    if dataset == "synthetic":
        (x, y), (xt, yt) = synthetic_cifar(num_classes=len(counts), n_max=n_max)
    else:
        folder, train, test, key, _, num_classes, _, _ = CIFAR[dataset]
        path = ensure_cifar(data_dir, dataset)
        x, y = _read_cifar_files(path, train, key, num_classes)
        xt, yt = _read_cifar_files(path, test, key, num_classes)
    idx = torch.from_numpy(lt_indices(y.numpy(), counts, subset_seed))
    return x[idx], y[idx], xt, yt, counts, n_max


# =============================================================================================
# Augmentation on the device: random crop (4-pixel zero padding) + flip, a whole epoch at once
# =============================================================================================

MEAN = (0.4914, 0.4822, 0.4465)  # the official constants (CIFAR-10's, used for CIFAR-100 too)
STD = (0.2023, 0.1994, 0.2010)
PAD = 4


def crop_flip(x_padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              size: int = 32) -> torch.Tensor:
    """Crop image n of (N, C, H+2p, W+2p) at offset (dy[n], dx[n]), mirrored where flip[n]."""
    N, C, _, Wp = x_padded.shape
    ar = torch.arange(size, device=x_padded.device)
    rows = dy[:, None] + ar                                             # (N, size)
    cols = dx[:, None] + torch.where(flip[:, None], size - 1 - ar, ar)  # mirrored column order
    x = x_padded.gather(2, rows[:, None, :, None].expand(N, C, size, Wp))  # (N, C, size, W+2p)
    return x.gather(3, cols[:, None, None, :].expand(N, C, size, size))    # (N, C, size, size)


def random_crop_flip(x_padded: torch.Tensor, generator=None) -> torch.Tensor:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip(0.5), batched, drawn from `generator` (a
    torch.Generator on x_padded's device; None: the global one)."""
    N, dev = x_padded.shape[0], x_padded.device
    dy = torch.randint(0, 2 * PAD + 1, (N,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (N,), device=dev, generator=generator)
    flip = torch.rand(N, device=dev, generator=generator) < 0.5
    return crop_flip(x_padded, dy, dx, flip)


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (x / 255 - mean) / std."""
    mean = torch.tensor(MEAN, device=x_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x_uint8.device).view(1, 3, 1, 1)
    return (x_uint8.float() / 255 - mean) / std


def shuffled_epoch(x_padded: torch.Tensor, y: torch.Tensor, memory_format=torch.contiguous_format,
                   generator=None):
    """One epoch of training images, permuted, cropped, flipped and normalised in a few batched ops."""
    perm = torch.randperm(len(y), device=y.device, generator=generator)
    xs = normalize(random_crop_flip(x_padded[perm], generator)).contiguous(memory_format=memory_format)
    return xs, y[perm]  # (N, 3, 32, 32) float32, (N,)


# =============================================================================================
# Networks: the CIFAR ResNet of He et al. (ResNet-32) and the official code's backbone
# =============================================================================================

class NormedLinear(nn.Module):
    """Cosine classifier of LDAM: logits_c = <x / ‖x‖, w_c / ‖w_c‖>, in [-1, 1]."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-1, 1)
                                   .renorm_(2, 1, 1e-5).mul_(1e5))

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


class ShortcutA(nn.Module):
    """Option-A shortcut: no parameters; halve H and W, zero-pad the channels (planes / 4 each side)."""

    def __init__(self, planes):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        same = stride == 1 and in_planes == planes
        self.shortcut = nn.Identity() if same else ShortcutA(planes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem (16), three stages of (depth - 2) / 6 basic blocks (16, 32, 64), global pool, fc."""

    def __init__(self, depth, num_classes, normed=False):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for s in [stride] + [1] * (n - 1):
                stages.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.fc = NormedLinear(64, num_classes) if normed else nn.Linear(64, num_classes)
        for m in self.modules():  # Kaiming-normal conv and linear weights
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):                                 # (B, 3, 32, 32)
        x = self.layers(F.relu(self.bn1(self.conv1(x))))  # (B, 64, 8, 8)
        return self.fc(x.mean((2, 3)))                    # (B, C)


def resnet32(num_classes, normed=False):
    """ResNet-32 of He et al. for CIFAR: 0.47 M parameters for 100 classes."""
    return CifarResNet(32, num_classes, normed)


def resnet34(num_classes, normed=False):
    """The official code's backbone ("ResNet-32" there): torchvision's ResNet-34 with a 3x3 stride-1
    stem and no max-pool, 21.33 M parameters for 100 classes. Stem and fc keep PyTorch's default
    init: they are built after torchvision's init loop."""
    m = torchvision.models.resnet34(weights=None)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()  # feature maps 32 -> 32 -> 16 -> 8 -> 4, then global average pool
    m.fc = NormedLinear(512, num_classes) if normed else nn.Linear(512, num_classes)
    return m


ARCHS = tuple(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)) + ("resnet34",)


def build_model(arch: str, num_classes: int, normed: bool = False) -> nn.Module:
    if arch == "resnet34":
        return resnet34(num_classes, normed)
    if arch in ARCHS:
        return CifarResNet(int(arch[len("resnet"):]), num_classes, normed)
    raise UsageError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")


# =============================================================================================
# Losses: one loss per sample (no reduction), so that a batch can be split into head and tail
# =============================================================================================

class LongTailLoss(nn.Module):
    """CE, LDAM, LA or VS on logits z (B, C) and labels y (B,); returns (B,) losses.

    n_c: training count of class c, π_c = n_c / Σn, n_max = max(n).
      CE:   CE(z, y)
      LA:   CE(z + τ log π, y)                                  (logit adjustment)
      VS:   CE(z · (n_c / n_max)^vs_gamma + τ log π, y)          (vector scaling)
      LDAM: CE(s · (z - m_y e_y), y),  m_c ∝ n_c^(-1/4), max_c m_c = max_m,  z cosine logits
    DRW multiplies loss i by ω_{y_i}, ω_c ∝ (1 - β) / (1 - β^n_c) with Σ_c ω_c = C (Cui et al.).
    """

    def __init__(self, name, counts, tau=0.75, vs_gamma=0.05, max_m=0.5, s=30.0):
        super().__init__()
        self.name = "LA" if name == "VA" else name
        self.s = s
        n = torch.tensor(counts, dtype=torch.float32)
        log_pi = torch.log(n / n.sum())
        scale, shift = torch.ones_like(n), torch.zeros_like(n)
        if self.name == "LA":
            shift = tau * log_pi
        elif self.name == "VS":
            scale, shift = (n / n.max()) ** vs_gamma, tau * log_pi
        m = n ** -0.25
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.register_buffer("margin", m * (max_m / m.max()))
        self.register_buffer("weight", torch.ones_like(n))  # DRW class weights ω_c (1 = off)
        self.counts = n

    def set_drw(self, on: bool, beta: float = 0.9999):
        """Deferred re-weighting: class-balanced weights once `on`, else all ones."""
        w = (1 - beta) / (1 - beta ** self.counts) if on else torch.ones_like(self.counts)
        self.weight.copy_(w * len(w) / w.sum())

    def forward(self, z, y):
        if self.name == "LDAM":  # subtract s · m_y from the target logit only
            z = self.s * (z - F.one_hot(y, z.shape[1]) * self.margin[y][:, None])
        else:
            z = z * self.scale + self.shift
        return F.cross_entropy(z, y, reduction="none") * self.weight[y]


# =============================================================================================
# The method: SAM, ImbSAM and SSE-SAM, each with its training step
# =============================================================================================
# ---- copy from here: this block runs alone, on torch and the standard library -------------
import contextlib
import math

import torch
from torch import nn

# A step (model, criterion, opt, x, y, tail) updates w and returns the logits and per-sample
# losses at w. It takes a criterion with one loss per sample (reduction="none") and the (B,) bool
# mask tail[i] = (n_{y_i} < η), and refuses anything else in one line; with SSESAM, call
# opt.update_rho() after every epoch (the switch). What .grad holds on entry plays no part.
# Shapes are static and nothing is read back to the host, so a GPU never waits. The block never
# chooses a precision: torch.autocast may go around each forward or around the whole step.

HEAD, TAIL = 0, 1  # the group index n_i of the official API


# ---- The per-sample split
def per_sample_losses(criterion, logits, y, tail):
    """ℓ_i = criterion(logits, y), (B,), after refusing what would go silently wrong: a tail that
    is no (B,) bool mask, a criterion without one loss per sample (a mean would be divided by B
    again). Dtypes and shapes only: a value read back to the host would make a GPU wait."""
    if not (isinstance(tail, torch.Tensor) and tail.dtype == torch.bool and tail.shape == y.shape):
        got = (f"{tail.dtype} of shape {tuple(tail.shape)}" if isinstance(tail, torch.Tensor)
               else type(tail).__name__)
        raise TypeError(f"tail must be a bool tensor of the batch's shape {tuple(y.shape)}, tail[i] = "
                        f"(n_(y_i) < eta), got {got}")
    loss_i = criterion(logits, y)
    if loss_i.shape != y.shape:
        raise ValueError(f"criterion must return one loss per sample (reduction='none'), shape "
                         f"{tuple(y.shape)}, got shape {tuple(loss_i.shape)}")
    return loss_i


def sample_weights(criterion, y):
    """ω_i, the class weight by which the criterion multiplied loss i (1 if it has none)."""
    omega = getattr(criterion, "weight", None)
    return torch.ones(len(y), device=y.device) if omega is None else omega[y]


def split_losses(loss_i, tail, weight="batch", omega=None):
    """L_head, L_tail from per-sample losses (B,), each already multiplied by its class weight ω_i
    (DRW; None: all 1); each denominator sums weights, so it counts samples when all ω_i = 1:
        batch:        L_g = Σ_{i in g} ℓ_i / Σ_{i in batch} ω_i   (SSE-SAM: L_head + L_tail = L)
        group:        L_g = Σ_{i in g} ℓ_i / Σ_{i in g} ω_i       (the SSE-SAM code's ImbSAM)
        imbsam_repo:  as batch, with L_tail doubled               (the ImbSAM authors' code)
    torch.where, not indexing: shapes stay static, and an empty group gives 0, never NaN."""
    omega = torch.ones_like(loss_i) if omega is None else omega
    L_head = torch.where(tail, 0, loss_i).sum()
    L_tail = torch.where(tail, loss_i, 0).sum()
    if weight == "group":  # an empty group has L = 0 and Σω = 0: divide by 1 there
        W_head, W_tail = torch.where(tail, 0, omega).sum(), torch.where(tail, omega, 0).sum()
        return L_head / torch.where(W_head > 0, W_head, 1), L_tail / torch.where(W_tail > 0, W_tail, 1)
    W = omega.sum()
    return L_head / W, L_tail / W * (2 if weight == "imbsam_repo" else 1)


# ---- The climb: w -> w + ε and back
@contextlib.contextmanager
def frozen_bn_stats(model):
    """Forwards inside normalise by their batch but leave the BN running statistics alone: only
    the forward at w, the weights that are kept, feeds the statistics used at test time."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in bns]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, t in zip(bns, saved):
            m.track_running_stats = t


class _Climb(torch.optim.Optimizer):
    """What the three share: a base optimizer (SGD), the climb w -> w + ε along a gradient g, and
    the way back to w, where the base optimizer steps (momentum and weight decay act at w). A torch
    Optimizer with the base's param_groups, defaults and state: a torch lr_scheduler built on it or
    on the base sets the lr that the base step uses, and counts the calls of step()."""

    rhos = (0.0, 0.0)  # (ρ_head, ρ_tail) in effect, indexed by n_i, for the logs
    _own_state = ()    # what state_dict() keeps besides the base optimizer's state

    def __init__(self, optimizer, model, *rhos):
        if min(rhos) < 0:
            raise ValueError(f"rho must be >= 0, got {rhos}")
        self.model, self.params = model, [p for p in model.parameters() if p.requires_grad]
        super().__init__(self.params, {})  # torch's hooks; the groups are the base's, below
        self.optimizer, self.param_groups = optimizer, optimizer.param_groups
        self.defaults, self.state = optimizer.defaults, optimizer.state
        self.w = [torch.empty_like(p) for p in self.params]  # w, saved before each climb
        self.ready = False  # a climb (or SSE-SAM's G) since the last base step

    def state_dict(self):
        return {"base": self.optimizer.state_dict(), **{k: getattr(self, k) for k in self._own_state}}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["base"])  # which makes its param_groups and state anew
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state
        for k in self._own_state:
            setattr(self, k, state[k])

    def step(self, closure=None):  # the base step at w; through here, so that a scheduler counts it
        name = type(self).__name__
        if closure is not None:  # SAM overrides this; the others need the per-sample losses
            raise TypeError(f"{name}.step(closure): a closure gives no per-sample losses and no tail "
                            f"mask; call {name.lower()}_step(model, criterion, opt, x, y, tail)")
        if not self.ready:
            raise RuntimeError(f"{name}.step() without a climb before it would be plain SGD: call "
                               f"{name.lower()}_step(model, criterion, opt, x, y, tail)")
        self.ready = False
        self.optimizer.step()

    def grads(self):
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]

    @torch.no_grad()
    def zero_grad(self, set_to_none=True):  # as torch's; the steps zero in place (False), so that
        if set_to_none:                     # a recorded CUDA graph keeps its .grad buffers
            for p in self.params:
                p.grad = None
        elif grads := [p.grad for p in self.params if p.grad is not None]:
            torch._foreach_zero_(grads)

    @torch.no_grad()
    def climb(self, rho, g):  # save w, then w <- w + ε; foreach: one op for all the tensors
        # ‖g‖₂ over all parameters at once: the norm of the per-tensor norms
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
        # ε = ρ · g / (‖g‖₂ + 1e-16); a zero g gives ε = 0, not NaN
        eps = torch._foreach_mul(g, rho / (norm + 1e-16))
        torch._foreach_copy_(self.w, self.params)
        torch._foreach_add_(self.params, eps)
        self.ready = True
        # an autocast block keeps the low-precision copy of w it made first: let it copy w + ε
        torch.clear_autocast_cache()

    @torch.no_grad()
    def restore(self):  # w <- the saved w, bit for bit (w + ε - ε need not be w in floating point)
        torch._foreach_copy_(self.params, self.w)
        torch.clear_autocast_cache()  # and no copy of w + ε is used at w


# ---- SAM: 2F+2B per step
class SAM(_Climb):
    """SAM (Foret et al., ICLR 2021): step with ∇L(w + ε), ε = ρ · g / ‖g‖, g = ∇L(w).
        L(model(x)).backward();  sam.first_step()    # w -> w + ε
        L(model(x)).backward();  sam.second_step()   # back to w, base step with ∇L(w + ε)
    or sam.step(closure), the closure a torch closure (forward, backward, return the loss)."""

    def __init__(self, optimizer, model, rho=0.05):
        super().__init__(optimizer, model, rho)
        self.rho, self.rhos = rho, (rho, rho)

    def first_step(self):
        self.climb(self.rho, self.grads())
        self.zero_grad(False)  # the backward at w + ε starts from 0

    def second_step(self):
        self.restore()
        self.step()
        self.zero_grad(False)

    def step(self, closure=None):  # with a closure: SAM's whole step; returns the loss at w
        if closure is None:
            return super().step()
        self.zero_grad(False)                          # g is the closure's gradient only
        with torch.enable_grad():
            loss = closure()                           # F1, B1 at w: g = ∇L(w)
            self.first_step()                          # w -> w + ε
            with frozen_bn_stats(self.model):
                closure()                              # F2, B2: ∇L(w + ε)
        self.second_step()                             # back to w, step with ∇L(w + ε)
        return loss


def sam_step(model, criterion, opt, x, y, tail):
    opt.zero_grad(False)                                   # g is this batch's gradient only
    logits = model(x)                                      # F1 at w
    loss_i = per_sample_losses(criterion, logits, y, tail)  # (B,); tail: checked as by the others
    W = sample_weights(criterion, y).sum()                 # B, or Σ ω_i with class weights
    (loss_i.sum() / W).backward()                          # B1: g = ∇L(w)
    opt.first_step()                                       # w -> w + ε
    with frozen_bn_stats(model):
        (criterion(model(x), y).sum() / W).backward()      # F2, B2: ∇L(w + ε)
    opt.second_step()                                      # back to w, step with ∇L(w + ε)
    return logits.detach(), loss_i.detach()


# ---- ImbSAM: 2F+3B per step
class ImbSAM(_Climb):
    """ImbSAM (Zhou et al., ICCV 2023): SAM on the tail loss only.
        G = ∇L_head(w) + ∇L_tail(w + ε_tail),   ε_tail = ρ · g_tail / ‖g_tail‖
        L_head.backward(retain_graph=True); imbsam.first_step()   # keep ∇L_head(w) aside
        L_tail.backward();                  imbsam.second_step()  # w -> w + ε_tail
        L_tail(model(x)).backward();        imbsam.third_step()   # back to w, step with G
    imbsam_weight: how imbsam_step divides each group's loss (split_losses: group, batch or
    imbsam_repo)."""

    def __init__(self, optimizer, model, rho=0.05, imbsam_weight="group"):
        if imbsam_weight not in ("group", "batch", "imbsam_repo"):
            raise ValueError(f"imbsam_weight must be group, batch or imbsam_repo, got {imbsam_weight!r}")
        super().__init__(optimizer, model, rho)
        self.rho, self.rhos, self.imbsam_weight = rho, (0.0, rho), imbsam_weight
        self.g_head = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def first_step(self):
        torch._foreach_copy_(self.g_head, self.grads())
        self.zero_grad(False)

    def second_step(self):
        self.climb(self.rho, self.grads())
        self.zero_grad(False)

    @torch.no_grad()
    def third_step(self):
        self.restore()
        torch._foreach_add_(self.grads(), self.g_head)  # G = ∇L_tail(w + ε_tail) + ∇L_head(w)
        self.step()
        self.zero_grad(False)


def imbsam_step(model, criterion, opt, x, y, tail):
    opt.zero_grad(False)                                   # ∇L_head(w) is this batch's only
    logits = model(x)                                      # F1 at w
    loss_i = per_sample_losses(criterion, logits, y, tail)
    omega = sample_weights(criterion, y)
    L_head, L_tail = split_losses(loss_i, tail, opt.imbsam_weight, omega)
    L_head.backward(retain_graph=True)                     # B1: ∇L_head(w) ...
    opt.first_step()                                       # ... kept aside
    L_tail.backward()                                      # B2: ∇L_tail(w), through the same graph
    opt.second_step()                                      # w -> w + ε_tail
    with frozen_bn_stats(model):                           # F2, B3: ∇L_tail(w + ε_tail)
        split_losses(criterion(model(x), y), tail, opt.imbsam_weight, omega)[TAIL].backward()
    opt.third_step()                                       # back to w, step with G
    return logits.detach(), loss_i.detach()


# ---- SSE-SAM: 3F+4B per step, then 2F+3B once ρ_head = 0 (the official code: 4F+4B)
class SSESAM(_Climb):
    """SSE-SAM (Lyu et al., AAAI 2025): SAM on the head and on the tail loss, each along its own
    gradient, and no head perturbation after the first ⌈γT⌉ epochs (stage 2 = ImbSAM):
        G = ∇L_head(w + ε_head) + ∇L_tail(w + ε_tail),   ε_g = ρ_g · ∇L_g(w) / ‖∇L_g(w)‖
    head_rho and tail_rho are the radii in effect: update_rho() sets head_rho to 0 at the switch.
    The seed API (its README's snippet, 4F+4B) passes gradients through .grad; ssesam_step does not."""

    _own_state = ("k",)

    def __init__(self, optimizer, model, head_rho, tail_rho, gamma=0, total_epochs=200):
        super().__init__(optimizer, model, head_rho, tail_rho)
        if not (0 <= gamma < 1 and total_epochs >= 1):
            raise ValueError(f"need 0 <= gamma < 1 and total_epochs >= 1, got {gamma}, {total_epochs}")
        self.head_rho, self.tail_rho, self.gamma, self.total_epochs = head_rho, tail_rho, gamma, total_epochs
        # the switch after ⌈γT⌉ epochs, γT rounded as a decimal (0.07 · 100 is 7.000000000000001)
        self.cut = math.ceil(round(gamma * total_epochs, 9))
        self.k = 0                                           # epochs finished (update_rho() calls)
        self.G = [torch.zeros_like(p) for p in self.params]  # the gradient summed over the groups
        self.update_rho(0)                                   # γ = 0: no head climb at all

    def update_rho(self, epochs=1):  # once after every epoch: ρ_head = 0 from epoch ⌈γT⌉ + 1 on
        self.k += epochs
        if self.k >= self.cut:
            self.head_rho = 0.0

    def load_state_dict(self, state):  # k, and so the switch, into an optimizer built as the run's
        super().load_state_dict(state)
        self.update_rho(0)

    @property
    def rhos(self):  # (ρ_head, ρ_tail), indexed by n_i (the official rho_is)
        return (self.head_rho, self.tail_rho)

    # ---- the seed API: gradients pass through .grad
    def compute_and_add_epsilon(self, n_i):  # w <- w + ε_g along .grad; then .grad = 0
        self.climb(self.rhos[n_i], self.grads())
        self.zero_grad(False)

    def compute_grad_sum_and_restore_p(self):  # G <- G + .grad, the gradient at w + ε; back to w
        self.add_grad(self.grads())
        self.restore()
        self.zero_grad(False)

    @torch.no_grad()
    def add_grad(self, g):  # G <- G + g
        torch._foreach_add_(self.G, g)
        self.ready = True

    @torch.no_grad()
    def update(self):  # base step with .grad = G; then .grad = 0 and G = 0 for the next batch
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_copy_([p.grad for p in self.params], self.G)
        self.step()
        self.zero_grad(False)
        torch._foreach_zero_(self.G)


def ssesam_step(model, criterion, opt, x, y, tail):
    """G = ∇L_head(w + ε_head) + ∇L_tail(w + ε_tail), head then tail, then the base step with G.
    3F+4B, 2F+3B once ρ_head = 0: the seed's forward at w for the tail repeats the head's (same w,
    same batch), so one forward gives both gradients at w. All gradients come from autograd.grad:
    what .grad held plays no part."""
    logits = model(x)                                       # F1 at w, the one pass that feeds BN stats
    loss_i = per_sample_losses(criterion, logits, y, tail)  # (B,) ℓ_i
    omega = sample_weights(criterion, y)                    # (B,) ω_i, all 1 unless DRW re-weights
    L = split_losses(loss_i, tail, "batch", omega)          # (L_head, L_tail), L_g = Σ_{i in g} ℓ_i / B
    # g_head = ∇L_head(w), g_tail = ∇L_tail(w): two backwards through F1's graph (B1, B2)
    g = [torch.autograd.grad(L[HEAD], opt.params, retain_graph=True, materialize_grads=True),
         torch.autograd.grad(L[TAIL], opt.params, materialize_grads=True)]
    for n_i in (HEAD, TAIL):
        # G += ∇L_g(w + ε_g); where ρ_g = 0 (the head in stage 2) ε_g = 0, and that is g_g itself
        if opt.rhos[n_i] > 0:
            opt.climb(opt.rhos[n_i], g[n_i])                # w -> w + ε_g, ε_g = ρ_g · g_g / ‖g_g‖
            with frozen_bn_stats(model):                    # F2 (head), F3 (tail) at w + ε_g
                L_climbed = split_losses(criterion(model(x), y), tail, "batch", omega)[n_i]
            g[n_i] = torch.autograd.grad(L_climbed, opt.params, materialize_grads=True)  # B3, B4
            opt.restore()                                   # back to w
        opt.add_grad(g[n_i])
    opt.update()                                            # base step with G; then G = 0
    return logits.detach(), loss_i.detach()
# ---- copy to here --------------------------------------------------------------------------


# =============================================================================================
# Evaluation: mean per-class accuracy, and Many / Medium / Few by training count
# =============================================================================================

def shot_groups(counts, n_max):
    """Many: n > n_max / 5, Few: n < n_max / 25, Medium: the rest (CIFAR-100: > 100, < 20)."""
    n = torch.tensor(counts)
    many, few = n > n_max / 5, n < n_max / 25
    return {"many": many, "med": ~many & ~few, "few": few}


@torch.no_grad()
def evaluate(model, x_test, y_test, counts, n_max, batch_size=1000):
    """Accuracies in percent: avg (mean per class), many, med, few; *_tta with flip averaging."""
    was_training = model.training
    model.eval()  # BN uses its running statistics
    C = len(counts)
    hits = torch.zeros(2, C, device=x_test.device)
    for i in range(0, len(y_test), batch_size):
        x, y = normalize(x_test[i:i + batch_size]), y_test[i:i + batch_size]
        z = model(x)
        z_tta = (z + model(x.flip(3))) / 2  # the logits of the image and its mirror, averaged
        for j, logits in enumerate((z, z_tta)):
            hits[j].index_add_(0, y, (logits.argmax(1) == y).float())
    per_class = hits.cpu().double() / torch.bincount(y_test.cpu(), minlength=C).clamp(min=1) * 100
    model.train(was_training)
    out = {}
    for j, suffix in enumerate(("", "_tta")):
        out["avg" + suffix] = per_class[j].mean().item()
        for name, mask in shot_groups(counts, n_max).items():
            out[name + suffix] = per_class[j][mask].mean().item() if mask.any() else None
    return out


# =============================================================================================
# Training
# =============================================================================================

OPTS = ("sgd", "sam", "imbsam", "ssesam")
LOSSES = ("CE", "LDAM", "LA", "VA", "VS")  # VA: the seed README's spelling of LA
DATASETS = ("cifar10", "cifar100", "synthetic")


def _arg(default, help, choices=None):
    """A dataclass field that also carries its --help text (the command line is made from these)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    # data
    dataset: str = _arg("cifar100", "data set", DATASETS)
    data_dir: str = _arg("./datasets", "folder holding (or receiving) the CIFAR python files")
    imb_factor: float = _arg(100.0, "imbalance factor IF = n_max / n_min (>= 1; 100, not 0.01)")
    subset_seed: Optional[int] = _arg(None, "take each class's first n_i images after a shuffle "
                                            "with this seed (LDAM-DRW); None: file order")
    # model and loss
    arch: str = _arg("resnet32", "network; resnet34 is the official code's backbone", ARCHS)
    loss: str = _arg("CE", "per-sample loss", LOSSES)
    tau: float = _arg(0.75, "LA/VS: weight tau of the additive log-prior tau * log(pi_c)")
    vs_gamma: float = _arg(0.05, "VS: multiplicative scale (n_c / n_max)^vs_gamma")
    ldam_max_m: float = _arg(0.5, "LDAM: margin of the rarest class")
    ldam_s: float = _arg(30.0, "LDAM: logit scale s")
    drw_epoch: Optional[int] = _arg(None, "deferred re-weighting (beta 0.9999) from this 0-indexed epoch")
    # optimizer
    opt: str = _arg("ssesam", "optimizer", OPTS)
    rho: float = _arg(0.05, "SAM / ImbSAM: perturbation radius rho")
    head_rho: float = _arg(0.05, "SSE-SAM: rho_head, the head classes' radius until the switch")
    tail_rho: float = _arg(0.10, "SSE-SAM: rho_tail, the tail classes' radius (constant)")
    gamma: float = _arg(0.70, "SSE-SAM: rho_head = 0 after the first gamma * epochs epochs (0 <= gamma < 1)")
    eta: int = _arg(100, "ImbSAM / SSE-SAM: a class is tail iff its training count < eta")
    imbsam_weight: str = _arg("group", "ImbSAM: each group's loss divided by its size in the batch "
                                       "(group), by B (batch), or by B with the tail's doubled "
                                       "(imbsam_repo)", ("group", "batch", "imbsam_repo"))
    # schedule
    epochs: int = _arg(200, "training epochs T")
    batch_size: int = _arg(64, "training batch size B")
    lr: float = _arg(0.01, "SGD learning rate, cosine-annealed to 0 per epoch")
    momentum: float = _arg(0.9, "SGD momentum")
    wd: float = _arg(1e-3, "SGD weight decay")
    seed: int = _arg(9826, "seed of the initial weights and of the data order, crops and flips")
    # run
    gpu: Optional[int] = _arg(None, "CUDA device index (without CUDA: the CPU, with a warning)")
    device: str = _arg("auto", "auto, cpu, cuda or cuda:N (--gpu wins when given)")
    bf16: Optional[bool] = _arg(None, "the network's forwards in bf16 autocast, weights, loss and SGD "
                                      "in fp32 (--bf16), or fp32 throughout (--no-bf16); unset: bf16 "
                                      "on CUDA, fp32 on the CPU")
    print_freq: int = _arg(1, "evaluate on the test set every this many epochs; epochs 10, 20, ... and the "
                              "last, which 'best' is chosen from, are always evaluated")
    test_batch_size: int = _arg(1000, "evaluation batch size")
    out: Optional[str] = _arg(None, "folder for metrics.jsonl, summary.json, model.pt and last.pt")
    save_every: int = _arg(1, "with --out: write last.pt every this many epochs (and at the last)")
    resume: bool = _arg(False, "continue the run whose last.pt is in --out (same settings)")


def precision(cfg: Config, device) -> str:
    """"bf16" or "fp32": --bf16 / --no-bf16, else bf16 on CUDA only (a CPU without bf16 instructions
    runs it slower than fp32, and the tests' bit-for-bit checks are fp32)."""
    return "bf16" if (device.type == "cuda" if cfg.bf16 is None else cfg.bf16) else "fp32"


class Bf16Forward(nn.Module):
    """The network as the loop runs it in bf16: each forward in its own bf16 autocast block on the
    input's device (CUDA or CPU), logits back in fp32. One block per forward, because autocast keeps
    bf16 copies of the weights for the length of a block, and the climb changes the weights in place
    between two forwards."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.autocast(x.device.type, torch.bfloat16):
            return self.net(x).float()


def sgd_step(model, criterion, opt, x, y, tail):
    """The baseline: one plain SGD step on the batch mean Σℓ_i / Σω_i (1F+1B), with the method
    block's checks and the same independence of what .grad held on entry."""
    opt.zero_grad()
    logits = model(x)
    loss_i = per_sample_losses(criterion, logits, y, tail)
    (loss_i.sum() / sample_weights(criterion, y).sum()).backward()
    opt.step()
    opt.zero_grad()
    return logits.detach(), loss_i.detach()


STEPS = {"sgd": sgd_step, "sam": sam_step, "imbsam": imbsam_step, "ssesam": ssesam_step}


def build_run(cfg: Config, counts, device):
    """(net, model, criterion, opt, rng) of a fresh run: the network, with initial weights from the
    global generator seeded with cfg.seed; what the steps call (the net, or the net in bf16); the loss;
    the optimizer; the run's own generator for its data order, crops and flips."""
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.arch, len(counts), normed=cfg.loss == "LDAM")
    # channels_last stores (N, C, H, W) as N, H, W, C, the layout convolution kernels prefer
    net = net.to(device, memory_format=torch.channels_last)
    model = Bf16Forward(net) if precision(cfg, device) == "bf16" else net
    criterion = LongTailLoss(cfg.loss, counts, cfg.tau, cfg.vs_gamma, cfg.ldam_max_m, cfg.ldam_s)
    # fused: SGD's whole update in one kernel for all parameters
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd,
                          fused=True)
    if cfg.opt == "sam":
        opt = SAM(opt, net, cfg.rho)
    elif cfg.opt == "imbsam":
        opt = ImbSAM(opt, net, cfg.rho, cfg.imbsam_weight)
    elif cfg.opt == "ssesam":
        opt = SSESAM(opt, net, cfg.head_rho, cfg.tail_rho, cfg.gamma, cfg.epochs)
    return net, model, criterion.to(device), opt, torch.Generator(device).manual_seed(cfg.seed)


def lr_at(epoch: int, cfg: Config) -> float:
    """Cosine to 0, stepped before each epoch as the official code does: lr·(1 + cos(π(e+1)/T))/2.
    So the last epoch trains at lr 0 and only refreshes the BN statistics."""
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch + 1) / cfg.epochs))


def train_one_epoch(model, criterion, opt, step, xs, ys, is_tail, batch_size, progress=None):
    """One pass over the shuffled epoch (xs, ys), a step per batch of B (the last may be shorter).
    Returns the per-step loss sums and the count of correct predictions at w as device tensors,
    read once per epoch by the caller: a read per step would stall a GPU every step."""
    model.train()
    N, B = len(ys), batch_size
    step_loss = torch.zeros(math.ceil(N / B), device=ys.device)
    correct = torch.zeros((), device=ys.device)
    for s, i in enumerate(range(0, N, B)):
        xb, yb = xs[i:i + B], ys[i:i + B]
        logits, loss_i = step(model, criterion, opt, xb, yb, is_tail[yb])
        step_loss[s] = loss_i.sum()
        correct += (logits.argmax(1) == yb).sum()
        if progress is not None:
            progress(s + 1, len(step_loss))
    if isinstance(opt, SSESAM):
        opt.update_rho()  # one epoch done: the stage switch counts it
    return step_loss, correct


class Diverged(Exception):
    """The training loss turned non-finite."""


def run_epoch(cfg: Config, epoch, model, criterion, opt, step, data, rng, progress=None):
    """Epoch `epoch` (0-indexed) on data = (x_pad, y, is_tail): its lr and DRW weights, then one pass
    over freshly augmented images. Returns its log row; raises Diverged on a non-finite loss."""
    x_pad, y, is_tail = data
    lr = lr_at(epoch, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    if cfg.drw_epoch is not None:
        criterion.set_drw(epoch >= cfg.drw_epoch)
    rho_head, rho_tail = getattr(opt, "rhos", (0.0, 0.0))  # SGD has none; read before update_rho()
    xs, ys = shuffled_epoch(x_pad, y, torch.channels_last, rng)  # the whole epoch, on the device
    step_loss, correct = train_one_epoch(model, criterion, opt, step, xs, ys, is_tail, cfg.batch_size,
                                         progress)
    loss, train_acc = step_loss.sum().item() / len(ys), correct.item() / len(ys) * 100
    if not math.isfinite(loss):
        bad = (~torch.isfinite(step_loss)).nonzero()
        where = f"step {int(bad[0]) + 1} of {len(step_loss)}" if len(bad) else "its loss sum overflowed"
        raise Diverged(f"non-finite training loss at epoch {epoch + 1}, {where} (lr {lr:.3g})")
    return {"epoch": epoch + 1, "lr": lr, "rho_head": rho_head, "rho_tail": rho_tail, "loss": loss,
            "train_acc": train_acc}


# #############################################################################################
# ---- A first reading may stop here. -----------------------------------------------------------
# Everything above is the method and one epoch of its training. Below is the machinery that turns
# epochs into a run of the command line: the progress line, where each piece of a run was made,
# the checkpoint last.pt and resume, signals, logs and the summary, and the command line itself.
# #############################################################################################

# =============================================================================================
# A run: progress, provenance, last.pt, train() and finish()
# =============================================================================================

def progress_line(epoch, epochs):
    """(k, n) -> None: rewrites one terminal line, step k/n, s/step and the time left in the epoch.
    Host clock only: once a GPU's queue of launched kernels is full, the host keeps its pace."""
    t0, shown = time.time(), [0.0]

    def show(k, n):
        now = time.time()
        if now - shown[0] >= 0.5 or k == n:
            shown[0], rate = now, (now - t0) / k
            sys.stdout.write(f"\repoch {epoch}/{epochs} step {k}/{n} {rate:.2f} s/step, "
                             f"{rate * (n - k):.0f} s left\033[K")
            sys.stdout.flush()
    return show


# ---- Where each piece of a run was made: bf16 repeats bit for bit only on one CPU at one thread count

def cpu_info() -> dict:
    """The CPU: /proc/cpuinfo's model name (which can be as generic as "AMD EPYC"), so also the
    vendor, family and model numbers, and whether it has the bf16 instructions AMX and AVX512-BF16."""
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:  # the first processor's entries (all processors are alike)
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        pass
    flags = info.get("flags", "").split()
    return {"name": info.get("model name") or platform.processor() or "unknown",
            "vendor": info.get("vendor_id", "unknown"), "family": info.get("cpu family", "unknown"),
            "model": info.get("model", "unknown"), "amx": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags}


def git_commit() -> str:
    """The commit of the checkout this file is in, "+modified" if the file differs from it; else
    "unknown"."""
    here, name = os.path.split(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        return git("rev-parse", "HEAD") + ("+modified" if git("status", "--porcelain", "--", name) else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def piece_info(cfg: Config, device) -> dict:
    """What this piece of the run ran on and with: device, precision, CPU, threads, code, torch."""
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": precision(cfg, device), "cpu": cpu_info(), "threads": torch.get_num_threads(),
            "commit": git_commit(), "torch": str(torch.__version__)}


def _new_piece(cfg: Config, device, pieces, done) -> dict:
    """This piece's record (piece_info, its first and last epoch), after one line on stderr where it
    will not continue the last piece bit for bit, or where bf16 may run slower than fp32."""
    piece = {**piece_info(cfg, device), "epochs": [done + 1, done]}
    if pieces and (warning := _not_bit_for_bit(pieces[-1], piece)):
        print(warning, file=sys.stderr)
    cpu = piece["cpu"]
    if device.type == "cpu" and piece["precision"] == "bf16" and not (cpu["amx"] or cpu["avx512_bf16"]):
        print(f"warning: {cpu['name']} has neither AMX nor AVX512-BF16: bf16 may run slower than fp32",
              file=sys.stderr)
    return piece


def _not_bit_for_bit(last, now):
    """One line if this piece runs where the last one did not, or None."""
    what = lambda p: (f"{p['cpu']['name']} (family {p['cpu']['family']} model {p['cpu']['model']}), "  # noqa: E731
                      f"{p['threads']} threads, {p['device']}, {p['precision']}")
    if what(last) == what(now):
        return None
    return (f"warning: this piece runs on {what(now)}, the last one ran on {what(last)}: the "
            f"continuation will not be bit for bit like an unbroken run")


# ---- The rolling checkpoint last.pt: everything the next epoch depends on

CKPT_FORMAT = "ssesam-minimal last.pt 5"


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived (raised by the handler main() installs)."""

    def __init__(self, signum):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


_SIGNAL = {"hold": False, "pending": None}  # while last.pt is written, a signal waits


def _on_signal(signum, frame):
    if not _SIGNAL["hold"]:
        raise Interrupted(signum)
    _SIGNAL["pending"] = signum


@contextlib.contextmanager
def _signals_held():
    """SIGINT / SIGTERM, as main() handles them, take effect after the block: a Ctrl-C while
    last.pt is written lets the epoch just finished reach the disk."""
    _SIGNAL.update(hold=True, pending=None)
    try:
        yield
    finally:
        _SIGNAL["hold"] = False
    if _SIGNAL["pending"] is not None:
        raise Interrupted(_SIGNAL["pending"])


def _atomic_write(path, data):
    """Write data (str: as text, else torch.save) to path.tmp, then rename it over path: path holds
    the old file or the whole new one, never a part."""
    tmp = path + ".tmp"
    try:
        if isinstance(data, str):
            with open(tmp, "w") as fh:
                fh.write(data)
        else:
            torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _checkpoint(cfg, epoch, net, opt, criterion, rng, history, seconds, pieces):
    """last.pt's content after `epoch` finished epochs."""
    return {"format": CKPT_FORMAT, "config": dataclasses.asdict(cfg), "epoch": epoch,
            "model": net.state_dict(),            # weights and BN running statistics
            "optimizer": opt.state_dict(),        # SGD momentum (and SSE-SAM's epoch counter)
            "criterion": criterion.state_dict(),  # DRW class weights
            "rng": rng.get_state(),               # the run's data order, crops and flips to come
            "history": history, "best": best_of(history, cfg.epochs), "seconds": seconds,
            "pieces": pieces}                     # where each piece ran: piece_info() and its epochs


def _restore(ckpt, net, opt, criterion, rng, path):
    """Load a checkpoint into the live objects; returns (history, epochs done, seconds, pieces).
    Its "best" is not returned: train() chooses it again from the history."""
    try:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        criterion.load_state_dict(ckpt["criterion"])
        rng.set_state(ckpt["rng"])
        return ckpt["history"], ckpt["epoch"], ckpt["seconds"], ckpt["pieces"]
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{path} does not fit this run ({type(e).__name__}); delete it to start afresh")


# ---- train(): schedule, evaluation, logs and last.pt around train_one_epoch

def best_from(epochs: int) -> list:
    """The epochs whose evaluations "best" is chosen from, as the official code chooses its
    checkpoint (at epoch % 10 == 9, 0-indexed): 10, 20, ... and the last, whatever --print_freq."""
    return sorted({*range(10, epochs + 1, 10), epochs})


def best_of(history, epochs: int):
    """The evaluation with the highest plain Avg (no TTA) among those at best_from(epochs), the
    earliest on a tie; None before the first of them."""
    chosen = set(best_from(epochs))
    return max((row for row in history if row["epoch"] in chosen and "avg" in row),
               key=lambda row: row["avg"], default=None)


def _fmt(v):
    return "  -- " if v is None else f"{v:5.1f}"


def _epoch_line(cfg, row, seconds_left):
    test = " ".join(f"{k} {_fmt(row[k])}" for k in ("avg", "many", "med", "few")) if "avg" in row else " --"
    return (f"epoch {row['epoch']:3d}/{cfg.epochs} lr {row['lr']:.5f} rho_h {row['rho_head']:.3f} "
            f"rho_t {row['rho_tail']:.3f} loss {row['loss']:.4f} train {row['train_acc']:5.1f} | "
            f"test {test} | {row['seconds']:.1f}s, {seconds_left / 60:.1f}m left")


def _stop_note(e, cfg, ckpt_path, saved, epoch):
    """Where an interrupted or diverged run stopped and what it left, for its one line."""
    where = ""
    if isinstance(e, Interrupted):
        where = f" after epoch {saved}" if saved == epoch + 1 else f" during epoch {epoch + 1}"
    if ckpt_path is None:
        return f"{where}; nothing saved (no --out)"
    if saved == 0:
        return f"{where}; no epoch saved yet"
    return f"{where}; {ckpt_path} holds epoch {saved} of {cfg.epochs}; continue with --resume"


def train(cfg: Config, data, device, log=print, ckpt_path=None, resume=None, progress=None,
          wrap_step=None):
    """Train per cfg on data = (x, y, x_test, y_test, counts, n_max); returns (net, summary dict).
    ckpt_path: where to keep last.pt; resume: a checkpoint dict to continue; progress: count the
    steps on one line (default: when log is print and stdout a terminal); wrap_step: (step, model,
    opt) -> the step to call instead (scripts/cuda_graph.py records it as a CUDA graph).
    The global generator is drawn from only for the initial weights, before the first log line."""
    x, y, x_test, y_test, counts, n_max = data
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # time the convolution kernels once per shape
    net, model, criterion, opt, rng = build_run(cfg, counts, device)
    history, done, seconds, pieces = [], 0, 0.0, []
    if resume is not None:
        history, done, seconds, pieces = _restore(resume, net, opt, criterion, rng, ckpt_path)
    piece = _new_piece(cfg, device, pieces, done)
    pieces = pieces + [piece]
    step = STEPS[cfg.opt] if wrap_step is None else wrap_step(STEPS[cfg.opt], model, opt)
    is_tail = torch.tensor([n < cfg.eta for n in counts], device=device)  # tail iff n_c < η
    epoch_data = (F.pad(x, (PAD,) * 4).to(device), y.to(device), is_tail)  # zero padding, uint8
    x_test, y_test = x_test.to(device), y_test.to(device)
    show = (log is print and sys.stdout.isatty()) if progress is None else progress
    n_params = sum(p.numel() for p in net.parameters())
    log(f"{cfg.dataset} IF {cfg.imb_factor:g}: {len(y)} train images, {len(counts)} classes, "
        f"{int(is_tail.sum())} tail (n < {cfg.eta}); {cfg.arch} {n_params / 1e6:.2f} M params; "
        f"{cfg.opt} + {cfg.loss}; device {device}, {piece['precision']}, torch threads {piece['threads']}"
        + (f"; resumed after epoch {done}" if done else ""))
    t_start, saved, epoch = time.time() - seconds, done, done
    try:
        for epoch in range(done, cfg.epochs):
            t0, bar = time.time(), progress_line(epoch + 1, cfg.epochs) if show else None
            row = run_epoch(cfg, epoch, model, criterion, opt, step, epoch_data, rng, bar)
            last = epoch == cfg.epochs - 1
            if (epoch + 1) % cfg.print_freq == 0 or epoch + 1 in best_from(cfg.epochs):
                row.update(evaluate(model, x_test, y_test, counts, n_max, cfg.test_batch_size))
            row["seconds"] = time.time() - t0
            history.append(row)
            piece["epochs"][1] = epoch + 1
            if ckpt_path is not None and ((epoch + 1) % cfg.save_every == 0 or last):
                with _signals_held():
                    _atomic_write(ckpt_path, _checkpoint(cfg, epoch + 1, net, opt, criterion, rng, history,
                                                         time.time() - t_start, pieces))
                    saved = epoch + 1
            if bar is not None:
                sys.stdout.write("\r\033[K")  # clear the progress line
            log(_epoch_line(cfg, row, (time.time() - t_start) / (epoch + 1) * (cfg.epochs - epoch - 1)))
    except (Interrupted, Diverged) as e:  # an unfinished epoch is dropped, never saved
        e.args = (f"{e}{_stop_note(e, cfg, ckpt_path, saved, epoch)}",)
        raise
    return net, _summary(cfg, history, pieces, n_params, time.time() - t_start)


def _summary(cfg: Config, history, pieces, n_params, seconds) -> dict:
    """What summary.json holds (and, until finish() takes it out, the history of every epoch)."""
    keys = ("epoch", "avg", "many", "med", "few", "avg_tta", "many_tta", "med_tta", "few_tta")
    best = best_of(history, cfg.epochs)
    return {"config": dataclasses.asdict(cfg), "final": {k: history[-1][k] for k in keys},
            "best": {k: best[k] for k in keys}, "best_chosen_from": best_from(cfg.epochs),
            **{k: v for k, v in pieces[-1].items() if k != "epochs"},
            "params": n_params, "seconds": seconds, "pieces": pieces, "history": history}


def finish(cfg: Config, net, summary, log=print) -> dict:
    """Report the last and the best evaluation; write metrics.jsonl (one line per evaluated epoch),
    model.pt and summary.json into --out, each whole or not at all. Returns the summary without
    its history."""
    history = summary.pop("history")
    f, b = summary["final"], summary["best"]
    log(f"final (epoch {f['epoch']}): avg {_fmt(f['avg'])} many {_fmt(f['many'])} med {_fmt(f['med'])} "
        f"few {_fmt(f['few'])} | flip-TTA avg {_fmt(f['avg_tta'])} many {_fmt(f['many_tta'])} "
        f"med {_fmt(f['med_tta'])} few {_fmt(f['few_tta'])}")
    log(f"best of the evaluations at epochs 10, 20, ... and the last (epoch {b['epoch']}, chosen on "
        f"the test set, optimistic): avg {_fmt(b['avg'])} | flip-TTA avg {_fmt(b['avg_tta'])}")
    log(f"{summary['seconds']:.1f}s on {summary['device_name']}")
    if cfg.out is not None:  # summary.json last: its presence says the run is complete
        rows = "".join(json.dumps(row) + "\n" for row in history if "avg" in row)
        with _signals_held():
            _atomic_write(os.path.join(cfg.out, "metrics.jsonl"), rows)
            _atomic_write(os.path.join(cfg.out, "model.pt"), net.state_dict())
            _atomic_write(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=2))
    return summary


# =============================================================================================
# Command line: the flags (made from Config), checks, main()
# =============================================================================================

# settings a --resume may change: where the run happens and how often it reports, not what it computes
RUN_ONLY = ("data_dir", "gpu", "device", "print_freq", "test_batch_size", "out", "save_every", "resume")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line, made field by field from Config, so that each setting is declared once."""
    p = _Parser(prog="ssesam_minimal.py", description="SSE-SAM on long-tailed CIFAR.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type in (bool, Optional[bool]):  # a switch: never type=bool ("False" would read as true)
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            p.add_argument(f"--{f.name}", action=action, default=f.default, help=f.metadata["help"])
            continue
        typ = {Optional[int]: int, Optional[str]: str}.get(f.type, f.type)  # Optional[X] -> X
        p.add_argument(f"--{f.name}", type=typ, default=f.default,
                       choices=f.metadata["choices"], help=f.metadata["help"])
    return p


def parse_config(argv=None) -> Config:
    """Flags -> a Config, after rejecting settings that would run but mean nothing, each with one
    line that says why."""
    cfg = Config(**vars(build_parser().parse_args(argv)))
    if not cfg.imb_factor >= 1:
        raise UsageError(f"--imb_factor must be >= 1 (the ratio n_max / n_min), got {cfg.imb_factor}"
                         + ("; 0.01 means 100 here" if 0 < cfg.imb_factor < 1 else ""))
    if not 0 <= cfg.gamma < 1:
        raise UsageError(f"--gamma must lie in [0, 1), got {cfg.gamma}")
    for name in ("rho", "head_rho", "tail_rho", "lr", "momentum", "wd", "tau", "vs_gamma",
                 "ldam_max_m", "ldam_s"):
        if not getattr(cfg, name) >= 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("eta", "epochs", "batch_size", "print_freq", "test_batch_size", "save_every"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.drw_epoch is not None and cfg.drw_epoch < 0:
        raise UsageError(f"--drw_epoch must be >= 0, got {cfg.drw_epoch}")
    if cfg.resume and cfg.out is None:
        raise UsageError("--resume needs --out: the folder whose last.pt it continues")
    data_counts(cfg.dataset, cfg.imb_factor)  # every class keeps at least one image
    return cfg


def resolve_device(cfg: Config) -> torch.device:
    """--gpu N (the official flag; without CUDA: the CPU, with a warning), else --device."""
    if cfg.gpu is not None and not torch.cuda.is_available():
        print(f"warning: no CUDA on this machine; --gpu {cfg.gpu} ignored, running on the CPU",
              file=sys.stderr)
        return torch.device("cpu")
    name = f"cuda:{cfg.gpu}" if cfg.gpu is not None else cfg.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flag = f"--gpu {cfg.gpu}" if cfg.gpu is not None else f"--device {cfg.device}"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UsageError(f"{flag}: expected auto, cpu, cuda or cuda:N")
    dev = torch.device(name)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"{flag}: no such CUDA device ({torch.cuda.device_count()} visible)")
    return dev


def load_checkpoint(path: str) -> dict:
    """Read last.pt (tensors and plain Python only), or say in one line what is wrong with it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, not a torch file: one line, no traceback
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it to "
                         f"start afresh")
    if not (isinstance(ckpt, dict) and ckpt.get("format") == CKPT_FORMAT):
        raise UsageError(f"{path} is not a checkpoint of this version of ssesam_minimal.py; delete "
                         f"it to start afresh")
    return ckpt


def prepare_out(cfg: Config):
    """Check --out before any work; return the checkpoint that --resume continues, else None."""
    if cfg.out is None:
        return None
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} exists and is not a folder")
    path = os.path.join(cfg.out, "last.pt")
    if cfg.resume:
        if not os.path.isfile(path):
            raise UsageError(f"--resume: there is no {path} to continue")
        ckpt, now, absent = load_checkpoint(path), dataclasses.asdict(cfg), "(absent)"
        # every setting that changes what the run computes must be what it was
        diff = [f"--{k} {now.get(k, absent)} (last.pt: {ckpt['config'].get(k, absent)})"
                for k in dict.fromkeys([*now, *ckpt["config"]])
                if k not in RUN_ONLY and now.get(k, absent) != ckpt["config"].get(k, absent)]
        if diff:
            raise UsageError(f"--resume: these settings differ from {path}'s: {', '.join(diff)}")
        return ckpt
    if os.path.isfile(path):  # an unfinished run is not overwritten by accident
        try:
            ckpt = load_checkpoint(path)
        except UsageError:
            return None  # unreadable: nothing to keep, the new run overwrites it
        if ckpt["epoch"] < ckpt["config"]["epochs"]:
            raise UsageError(f"{path} holds an unfinished run (epoch {ckpt['epoch']} of "
                             f"{ckpt['config']['epochs']}): add --resume to continue it, or choose "
                             f"another --out")
    return None


def main(argv=None, wrap_step=None) -> dict:
    """The command line: parse, check, load, train, report, write --out. Returns the summary.
    Exit codes: 2 bad input, 1 non-finite loss, 128 + signal number when interrupted.
    wrap_step: as in train()."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in handlers:  # SIGINT / SIGTERM -> Interrupted: train() stops, main() prints one line
        signal.signal(s, _on_signal)
    try:
        cfg = parse_config(argv)
        device = resolve_device(cfg)
        resume = prepare_out(cfg)
        data = load_data(cfg.dataset, cfg.data_dir, cfg.imb_factor, cfg.subset_seed)
        if cfg.out is not None:
            os.makedirs(cfg.out, exist_ok=True)
        ckpt_path = None if cfg.out is None else os.path.join(cfg.out, "last.pt")
        net, summary = train(cfg, data, device, ckpt_path=ckpt_path, resume=resume, wrap_step=wrap_step)
        return finish(cfg, net, summary)
    except (UsageError, Interrupted, Diverged) as e:  # one line on stderr, never a traceback
        code = 2 if isinstance(e, UsageError) else 1 if isinstance(e, Diverged) else 128 + e.signum
        print(f"ssesam_minimal.py: {'error: ' if code == 2 else ''}{e}", file=sys.stderr)
        raise SystemExit(code)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


if __name__ == "__main__":
    main()
