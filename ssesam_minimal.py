"""ssesam_minimal.py -- SSE-SAM in one file: long-tailed CIFAR, ResNet, losses, SAM / ImbSAM / SSE-SAM.

Paper: Xingyu Lyu, Qianqian Xu, Zhiyong Yang, Shaojie Lyu, Qingming Huang. "SSE-SAM: Balancing Head
and Tail Classes Gradually through Stage-Wise SAM". AAAI 2025. https://arxiv.org/abs/2412.13715
Official code (the "seed"): https://github.com/Zemdalk/SSE-SAM. Its README's command and its
SSESAM usage snippet run here unchanged.

The method. In a long-tailed training set a few head classes hold most images. SAM minimises the
loss at the worst nearby point w + eps, eps = rho * g / ||g||. ImbSAM does that for the tail-class
loss only. SSE-SAM splits every batch by class into head (training count n_c >= eta) and tail,
perturbs each group along its own gradient, and after the first gamma * T of the T epochs sets
rho_head = 0, from where on it is ImbSAM:

    G = grad L_head(w + eps_head) + grad L_tail(w + eps_tail),    L_group = sum_{i in group} l_i / B
    eps_group = rho_group * grad L_group(w) / ||grad L_group(w)||,  rho_head = 0 after ceil(gamma T) epochs

Reading map: sections in dependency order, each using only what is above it.
    Long-tailed CIFAR      lt_class_counts, lt_indices, load_data
    Augmentation           random_crop_flip, normalize, shuffled_epoch (on the device)
    Networks               CifarResNet / resnet32, resnet34 (the official code's backbone)
    Losses                 LongTailLoss: CE, LDAM, LA, VS per sample, DRW class weights
    SAM, ImbSAM, SSE-SAM   the method: each optimizer with its training step right below it
    Evaluation             Avg and Many / Medium / Few
    CUDA graphs            GraphedStep: the same steps recorded once and replayed (optional)
    Training               train_one_epoch (the algorithm), train (schedule, logs, checkpoint)
    Saddle analysis        lambda_min / lambda_max of the Hessians of L_head and L_tail
    Command line           Config (every flag), checks, main()

Run:
    python ssesam_minimal.py --gpu 0 --imb_factor 100 --opt ssesam --loss CE --eta 100 \
        --print_freq 1 --head_rho 0.05 --tail_rho 0.10 --gamma 0.70 --dataset cifar100
    python ssesam_minimal.py --dataset synthetic --arch resnet8 --epochs 2   # CPU smoke run
    python ssesam_minimal.py --out runs/a [--resume]      # keep last.pt; continue after Ctrl-C
    from ssesam_minimal import SSESAM                       # the official API

Measured: on an NVIDIA H200 (torch 2.11) an eager ResNet-32 SSE-SAM epoch of the seed command
takes 9-12 s before the switch and about 7 s after it, bound by kernel launches; the accuracy
table has not been reproduced with this file yet (results/README.md). README.md lists the
deliberate differences from the official code; the main ones: 3F+4B passes per step, then 2F+3B,
for the official 4F+4B; BatchNorm statistics only from the unperturbed pass; gamma = 0 works; the
default network is the true ResNet-32 (the official code's 21 M-parameter net is --arch resnet34).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import signal
import sys
import threading
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

CIFAR = {  # folder, train files, test files, label key, images per class, archive, md5
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 5000, 10, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python", ["train"], ["test"],
                 "fine_labels", 500, 100, "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


def lt_class_counts(n_max: int, num_classes: int, imb_factor: float) -> list:
    """n_i = floor(n_max / IF^(i / (C - 1))): class 0 keeps n_max images, class C-1 keeps n_max / IF."""
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
            rng.shuffle(idx)  # LDAM-DRW: one shuffle per class, in class order, from one seed
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
    existed = os.path.isdir(data_dir)
    had_archive = os.path.isfile(os.path.join(data_dir, archive))
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
    """A small, learnable, CIFAR-shaped data set made in memory (no download).

    Each class is a smooth random colour pattern; images are that pattern plus pixel noise. The
    train pool holds n_max images per class, interleaved like CIFAR's file order, so the long-tailed
    builder picks from it exactly as it does from CIFAR.
    """
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=32, mode="bilinear",
                           align_corners=False)  # (C, 3, 32, 32) in [0, 1]

    def sample(n_per_class):
        y = torch.arange(n_per_class * num_classes) % num_classes
        x = 40 + 175 * protos[y] + 40 * torch.randn(len(y), 3, 32, 32, generator=g)
        return x.round().clamp(0, 255).to(torch.uint8), y

    return sample(n_max), sample(n_test), n_max


def data_counts(cfg: "Config"):
    """The per-class training counts of cfg's long-tailed data set, and n_max. Reads no data, so
    a bad --imb_factor is rejected before anything is read or downloaded."""
    n_max, num_classes = (200, 10) if cfg.dataset == "synthetic" else CIFAR[cfg.dataset][4:6]
    counts = lt_class_counts(n_max, num_classes, cfg.imb_factor)
    if min(counts) < 1:
        raise UsageError(f"--imb_factor {cfg.imb_factor:g} leaves class {counts.index(0)} with no "
                         f"training image ({cfg.dataset} has {n_max} per class: IF <= {n_max})")
    return counts, n_max


def load_data(cfg: "Config"):
    """Train (long-tailed) and test sets as CPU tensors, plus the per-class training counts."""
    counts, n_max = data_counts(cfg)
    if cfg.dataset == "synthetic":
        (x, y), (xt, yt), _ = synthetic_cifar(num_classes=len(counts), n_max=n_max)
    else:
        folder, train, test, key, _, num_classes, _, _ = CIFAR[cfg.dataset]
        path = ensure_cifar(cfg.data_dir, cfg.dataset)
        x, y = _read_cifar_files(path, train, key, num_classes)
        xt, yt = _read_cifar_files(path, test, key, num_classes)
    idx = torch.from_numpy(lt_indices(y.numpy(), counts, cfg.subset_seed))
    return x[idx], y[idx], xt, yt, counts, n_max


# =============================================================================================
# On-device augmentation: random crop (4-pixel zero padding) + horizontal flip, whole epoch at once
# =============================================================================================

MEAN = (0.4914, 0.4822, 0.4465)  # the official constants (CIFAR-10's, used for CIFAR-100 too)
STD = (0.2023, 0.1994, 0.2010)
PAD = 4


def crop_flip(x_padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              size: int = 32) -> torch.Tensor:
    """Crop image n of (N, C, H+2p, W+2p) at offset (dy[n], dx[n]), mirrored where flip[n]."""
    N, C, _, Wp = x_padded.shape
    ar = torch.arange(size, device=x_padded.device)
    rows = dy[:, None] + ar                                         # (N, size)
    cols = dx[:, None] + torch.where(flip[:, None], size - 1 - ar, ar)  # mirrored column order
    x = x_padded.gather(2, rows[:, None, :, None].expand(N, C, size, Wp))  # (N, C, size, W+2p)
    return x.gather(3, cols[:, None, None, :].expand(N, C, size, size))    # (N, C, size, size)


def random_crop_flip(x_padded: torch.Tensor, generator=None) -> torch.Tensor:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip(0.5), batched, on x_padded's device, drawn
    from `generator` (a torch.Generator on that device; None: the global one)."""
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
    """One epoch of training images at once, on their device: permuted, cropped, flipped and
    normalised in a few batched ops."""
    perm = torch.randperm(len(y), device=y.device, generator=generator)
    xs = normalize(random_crop_flip(x_padded[perm], generator)).contiguous(memory_format=memory_format)
    return xs, y[perm]  # (N, 3, 32, 32) float32, (N,)


# =============================================================================================
# ResNet: the CIFAR ResNet of He et al. (ResNet-32 as in LDAM-DRW) and the official backbone
# =============================================================================================

class NormedLinear(nn.Module):
    """Cosine classifier of LDAM: logits_c = <x / ||x||, w_c / ||w_c||>, in [-1, 1]."""

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
        for m in self.modules():  # LDAM-DRW's init: Kaiming-normal conv and linear weights
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):                           # (B, 3, 32, 32)
        x = self.layers(F.relu(self.bn1(self.conv1(x))))  # (B, 64, 8, 8)
        return self.fc(x.mean((2, 3)))              # (B, C)


def resnet32(num_classes, normed=False):
    """ResNet-32 of He et al. for CIFAR: 0.47 M parameters for 100 classes."""
    return CifarResNet(32, num_classes, normed)


def resnet34(num_classes, normed=False):
    """The official code's backbone ("ResNet-32" there): torchvision's ResNet-34 with a 3x3 stride-1
    stem and no max-pool, 21.33 M parameters for 100 classes. Stem and fc keep PyTorch's default
    init, as in the official code, because they are built after torchvision's init loop."""
    m = torchvision.models.resnet34(weights=None)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()  # feature maps 32 -> 32 -> 16 -> 8 -> 4, then global average pool
    m.fc = NormedLinear(512, num_classes) if normed else nn.Linear(512, num_classes)
    return m


CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110)  # 6n + 2
ARCHS = tuple(f"resnet{d}" for d in CIFAR_DEPTHS) + ("resnet34",)


def build_model(arch: str, num_classes: int, normed: bool = False) -> nn.Module:
    if arch == "resnet34":
        return resnet34(num_classes, normed)
    if arch in ARCHS:
        return CifarResNet(int(arch[len("resnet"):]), num_classes, normed)
    raise UsageError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")


# =============================================================================================
# Losses: per-sample (no reduction), so the optimizers can split a batch into head and tail
# =============================================================================================

class LongTailLoss(nn.Module):
    """CE, LDAM, LA or VS on logits z (B, C) and labels y (B,); returns (B,) losses.

    n_c: training count of class c, pi_c = n_c / sum(n), n_max = max(n).
      CE:   CE(z, y)
      LA:   CE(z + tau * log pi, y)                                     (logit adjustment)
      VS:   CE(z * (n_c / n_max)^vs_gamma + tau * log pi, y)            (vector scaling)
      LDAM: CE(s * (z - m_y e_y), y),  m_c = max_m * n_c^(-1/4) / max(n^(-1/4)),  z cosine logits
    DRW multiplies each loss by w_y, w_c = (1 - beta) / (1 - beta^n_c) normalised to sum C; the steps
    then divide a batch by its sum of weights, sum_i w_{y_i}, as F.cross_entropy(weight=w) does.
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
        self.register_buffer("weight", torch.ones_like(n))  # DRW class weights (1 = off)
        self.counts = n

    def set_drw(self, on: bool, beta: float = 0.9999):
        """Deferred re-weighting: class-balanced weights (Cui et al.) once `on`, else all ones."""
        w = (1 - beta) / (1 - beta ** self.counts) if on else torch.ones_like(self.counts)
        self.weight.copy_(w * len(w) / w.sum())

    def forward(self, z, y):
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()  # the loss in fp32, also after a bf16 autocast forward
        if self.name == "LDAM":
            # subtract s * m_y from the target logit only
            z = self.s * (z - F.one_hot(y, z.shape[1]) * self.margin[y][:, None])
        else:
            z = z * self.scale + self.shift
        return F.cross_entropy(z, y, reduction="none") * self.weight[y]


# =============================================================================================
# SAM, ImbSAM, SSE-SAM: each optimizer, with the training step that uses it right below it
# =============================================================================================
#
# All three wrap a torch optimizer (SGD here). Each climbs from w to w + eps along a gradient g,
# with one global L2 norm over every parameter,
#     eps = rho * g / (||g||_2 + 1e-16),
# takes the gradient there, comes back to w, and lets the base optimizer step with that gradient
# (momentum and weight decay act at w, as in the official code). w is restored from a saved copy:
# copying back is exact, subtracting eps is not. All tensor maths is foreach (one kernel per op for
# the whole model, no Python loop over the parameters) and nothing is read back to the host.
#
# Every step function takes (model, criterion, opt, x, y, tail, imbsam_weight) and returns the
# logits and the per-sample losses at w, for the logs. To use one in your own training loop:
#   * the criterion returns one loss per sample (reduction="none"): the groups are cut out of that
#     vector, and a mean-reduced loss would be broadcast into both (split_losses refuses it). With
#     class weights (criterion.weight, DRW) every normaliser sums weights instead of counting
#     samples, so a re-weighted batch averages as F.cross_entropy(weight=w) does;
#   * tail is a (B,) bool mask, tail[i] = (n_{y_i} < eta), built by the caller: is_tail[y];
#   * opt.end_epoch() is called once after every epoch (for SSESAM it is update_rho());
#   * SSESAM's published defaults (gamma = 0) mean rho_head = 0 from the first step: pass gamma.
# Passes per step (F forward, B backward): SGD 1F+1B, SAM 2F+2B, ImbSAM 2F+3B, SSE-SAM 3F+4B
# before the switch and 2F+3B after it (the official code: 4F+4B throughout).

def forward(model, criterion, x, y):
    """Logits and per-sample losses; bf16 autocast on CUDA for the network, fp32 for the loss. One
    autocast block per forward: its cache of bf16 weights would outlive an in-place climb."""
    with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):
        logits = model(x)
    return logits, criterion(logits, y)


def sample_weights(criterion, y):
    """w_i = w_{y_i}: the class weight by which the criterion multiplied loss i (DRW; also the
    `weight` of nn.CrossEntropyLoss), or 1 for every sample if it has none."""
    w = getattr(criterion, "weight", None)
    return torch.ones(len(y), device=y.device) if w is None else w[y]


def batch_mean(loss_i, w):
    """L = sum_i w_i l_i / sum_i w_i for losses that come weighted, as F.cross_entropy(weight=w)
    averages; the plain mean when every w_i = 1."""
    return loss_i.sum() / w.sum()


def split_losses(loss_i, tail, weight="batch", w=None):
    """L_head, L_tail from per-sample losses (B,), the tail mask (B,) and the samples' class weights
    w (B,; None: all 1), by which the losses are already multiplied. The denominators sum weights,
    so with w = 1 they count samples:
    batch:        L_g = sum_{i in g} l_i / sum_{i in batch} w_i   (SSE-SAM: L_head + L_tail = batch mean)
    group:        L_g = sum_{i in g} l_i / sum_{i in g} w_i       (the SSE-SAM code's ImbSAM baseline)
    imbsam_repo:  as batch, with L_tail doubled                   (the ImbSAM authors' own code)
    torch.where, not indexing: shapes stay static, and an empty group gives 0, never NaN."""
    if loss_i.shape != tail.shape:
        raise ValueError(f"split_losses needs one loss per sample, shape {tuple(tail.shape)}, got "
                         f"{tuple(loss_i.shape)}: build the criterion with reduction='none'")
    w = torch.ones_like(loss_i) if w is None else w
    zero = loss_i.new_zeros(())
    L_head, L_tail = torch.where(tail, zero, loss_i).sum(), torch.where(tail, loss_i, zero).sum()
    if weight == "group":
        W_head, W_tail = torch.where(tail, 0, w).sum(), torch.where(tail, w, 0).sum()
        # an empty group has L = 0 and W = 0: divide by 1 there
        return L_head / torch.where(W_head > 0, W_head, 1), L_tail / torch.where(W_tail > 0, W_tail, 1)
    W = w.sum()
    return L_head / W, L_tail / W * (2 if weight == "imbsam_repo" else 1)


@contextlib.contextmanager
def frozen_bn_stats(model):
    """Forward passes inside normalise by their batch but leave BN running statistics untouched:
    only the forward at w, the weights that are kept, feeds the statistics used at test time."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in bns]
    for m in bns:
        m.track_running_stats = False  # in train mode: normalise by the batch, update nothing
    try:
        yield
    finally:
        for m, t in zip(bns, saved):
            m.track_running_stats = t


def sgd_step(model, criterion, opt, x, y, tail, imbsam_weight="group"):
    """The baseline: one plain SGD step on the batch mean (1F+1B)."""
    logits, loss_i = forward(model, criterion, x, y)
    batch_mean(loss_i, sample_weights(criterion, y)).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # keep the .grad tensors: a CUDA graph reuses them
    return logits.detach(), loss_i.detach()


class _Climb:
    """What the three share: the base optimizer, the climb w -> w + eps and the way back."""

    rhos = (0.0, 0.0)  # (rho_head, rho_tail) in effect, for the logs
    _own_state = ()    # attributes that state_dict() keeps besides the base optimizer's state

    def __init__(self, optimizer, model, *rhos):
        if min(rhos) < 0:
            raise ValueError(f"rho must be >= 0, got {rhos}")
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.w = [torch.empty_like(p) for p in self.params]  # w, saved before each climb

    @property
    def param_groups(self):
        """The base optimizer's (lr schedules act on it). A property, not a copy of the reference:
        optimizer.load_state_dict() replaces the list, and a stale copy would set a dead lr."""
        return self.optimizer.param_groups

    def state_dict(self):
        """The base optimizer's state (SGD's momentum) and the wrapper's own."""
        return {"base": self.optimizer.state_dict(), **{k: getattr(self, k) for k in self._own_state}}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["base"])
        for k in self._own_state:
            setattr(self, k, state[k])

    def end_epoch(self):
        """Called once after every epoch (SSE-SAM counts epochs for its switch)."""

    def grads(self):
        """Every parameter's gradient (zeros for one that has none)."""
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def zero_grad(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:  # none before the first backward that writes .grad
            torch._foreach_zero_(grads)

    @torch.no_grad()
    def climb(self, rho, g):
        """Save w, then w <- w + eps along g (one tensor per parameter)."""
        # ||g||_2 over all parameters = the norm of the per-tensor norms
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
        # eps = rho * g / (||g||_2 + 1e-16)   (an all-zero g gives eps = 0, not NaN)
        eps = torch._foreach_mul(g, rho / (norm + 1e-16))
        torch._foreach_copy_(self.w, self.params)
        torch._foreach_add_(self.params, eps)

    @torch.no_grad()
    def restore(self):
        """w <- the saved w, bit for bit."""
        torch._foreach_copy_(self.params, self.w)


class SAM(_Climb):
    """SAM (Foret et al., ICLR 2021): step along grad L(w + eps), eps = rho * g / ||g||, g = grad L(w).

        loss(model(x)).backward();  sam.first_step()    # w -> w + eps
        loss(model(x)).backward();  sam.second_step()   # back to w, base step with grad L(w + eps)
    """

    def __init__(self, optimizer, model, rho=0.05):
        super().__init__(optimizer, model, rho)
        self.rho, self.rhos = rho, (rho, rho)

    def first_step(self):
        """w -> w + eps from .grad; then .grad = 0 for the backward at w + eps."""
        self.climb(self.rho, self.grads())
        self.zero_grad()

    def second_step(self):
        self.restore()
        self.optimizer.step()
        self.zero_grad()


def sam_step(model, criterion, opt, x, y, tail, imbsam_weight="group"):
    logits, loss_i = forward(model, criterion, x, y)    # F1 at w
    w = sample_weights(criterion, y)
    batch_mean(loss_i, w).backward()                    # B1: g = grad L(w)
    opt.first_step()                                    # w -> w + eps
    with frozen_bn_stats(model):
        batch_mean(forward(model, criterion, x, y)[1], w).backward()  # F2, B2 at w + eps
    opt.second_step()                                   # back to w, step with grad L(w + eps)
    return logits.detach(), loss_i.detach()


class ImbSAM(_Climb):
    """ImbSAM (Zhou et al., ICCV 2023): SAM on the tail loss only.
        G = grad L_head(w) + grad L_tail(w + eps_tail),   eps_tail = rho * g_tail / ||g_tail||

        L_head.backward(retain_graph=True); imbsam.first_step()   # keep grad L_head(w) aside
        L_tail.backward();                  imbsam.second_step()  # w -> w + eps_tail
        L_tail(model(x)).backward();        imbsam.third_step()   # back to w, step with G
    """

    def __init__(self, optimizer, model, rho=0.05):
        super().__init__(optimizer, model, rho)
        self.rho, self.rhos = rho, (0.0, rho)
        self.g_head = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def first_step(self):
        torch._foreach_copy_(self.g_head, self.grads())
        self.zero_grad()

    def second_step(self):
        self.climb(self.rho, self.grads())
        self.zero_grad()

    @torch.no_grad()
    def third_step(self):
        self.restore()
        torch._foreach_add_(self.grads(), self.g_head)  # G = grad L_tail(w + eps) + grad L_head(w)
        self.optimizer.step()
        self.zero_grad()


def imbsam_step(model, criterion, opt, x, y, tail, imbsam_weight="group"):
    logits, loss_i = forward(model, criterion, x, y)    # F1 at w
    w = sample_weights(criterion, y)
    L_head, L_tail = split_losses(loss_i, tail, imbsam_weight, w)
    L_head.backward(retain_graph=True)                  # B1: grad L_head(w)
    opt.first_step()                                    #     kept aside
    L_tail.backward()                                   # B2: grad L_tail(w), same graph
    opt.second_step()                                   # w -> w + eps_tail
    with frozen_bn_stats(model):
        split_losses(forward(model, criterion, x, y)[1], tail, imbsam_weight, w)[1].backward()  # F2, B3
    opt.third_step()                                    # back to w, step with G
    return logits.detach(), loss_i.detach()


class SSESAM(_Climb):
    """SSE-SAM (Lyu et al., AAAI 2025): SAM on the head and on the tail loss, each along its own
    gradient, and no head perturbation after the first ceil(gamma * T) epochs (stage 2 = ImbSAM):

        G = grad L_head(w + eps_head) + grad L_tail(w + eps_tail)
        eps_group = rho_group * g_group / ||g_group||,   g_group = grad L_group(w)

    n_i indexes the groups: 0 = head, 1 = tail. The seed README's call order, 4 forwards and 4
    backwards (the test suite runs the snippet verbatim):
        L_head(model(x)).backward();  compute_and_add_epsilon(0)          # w -> w + eps_head
        L_head(model(x)).backward();  compute_grad_sum_and_restore_p()    # G = its grad; back to w
        L_tail(model(x)).backward();  compute_and_add_epsilon(1)          # w -> w + eps_tail
        L_tail(model(x)).backward();  compute_grad_sum_and_restore_p()    # G += its grad; back to w
        update()          # SGD step with G, once per batch
        update_rho()      # once per epoch
    ssesam_step, below, makes the same update in the same order with fewer passes.
    """

    _own_state = ("k",)

    def __init__(self, optimizer, model, head_rho, tail_rho, gamma=0, total_epochs=200):
        super().__init__(optimizer, model, head_rho, tail_rho)
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        self.head_rho0, self.tail_rho, self.gamma, self.total_epochs = head_rho, tail_rho, gamma, total_epochs
        self.k = 0                                            # epochs finished (update_rho() calls)
        self.G = [torch.zeros_like(p) for p in self.params]   # the gradient sum over the groups

    # ---- the stage switch, all of it ------------------------------------------------------------
    @property
    def cut(self):
        """ceil(gamma * T), the number of stage-1 epochs. Rounded first: 0.07 * 100 is
        7.000000000000001 in floating point, and the switch belongs after epoch 7, not 8."""
        return math.ceil(round(self.gamma * self.total_epochs, 9))

    @property
    def head_rho(self):
        """rho_head in stage 1 (fewer than cut epochs finished), 0 in stage 2. rho_tail never changes."""
        return self.head_rho0 if self.k < self.cut else 0.0

    def update_rho(self):
        """Call once after every epoch."""
        self.k += 1

    # ---------------------------------------------------------------------------------------------
    def end_epoch(self):
        self.update_rho()

    @property
    def rhos(self):
        return (self.head_rho, self.tail_rho)

    @property
    def rho_is(self):  # the official name: [rho_head, rho_tail], indexed by n_i
        return list(self.rhos)

    def compute_and_add_epsilon(self, n_i, grads=None):
        """w <- w + eps for group n_i, along its gradient (.grad, or `grads`); then .grad = 0, so
        that the backward at w + eps starts from zero (the official method does the same)."""
        self.climb(self.rho_is[n_i], self.grads() if grads is None else grads)
        self.zero_grad()

    @torch.no_grad()
    def add_grad(self, grads):
        """G <- G + grads."""
        torch._foreach_add_(self.G, grads)

    def compute_grad_sum_and_restore_p(self):
        """G <- G + .grad (the gradient at w + eps); then w is restored and .grad = 0."""
        self.add_grad(self.grads())
        self.restore()
        self.zero_grad()

    @torch.no_grad()
    def update(self):
        """Base optimizer step with .grad = G; then .grad = 0 and G = 0 for the next batch."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_copy_([p.grad for p in self.params], self.G)
        self.optimizer.step()
        self.zero_grad()
        torch._foreach_zero_(self.G)


def ssesam_step(model, criterion, opt, x, y, tail, imbsam_weight="group"):
    """SSESAM's update in the seed's order, head then tail, with 3F+4B before the switch and 2F+3B
    after it. The seed's forward at w for the tail repeats the head's (same w, same batch), so one
    forward gives both gradients at w; and a group with rho = 0 has eps = 0, so its gradient at
    w + eps is its gradient at w, already known. imbsam_weight is unused: SSE-SAM divides by B."""
    logits, loss_i = forward(model, criterion, x, y)    # F1 at w, the only pass that feeds BN stats
    w = sample_weights(criterion, y)                    # all 1 unless DRW re-weights the classes
    L = split_losses(loss_i, tail, "batch", w)          # (L_head, L_tail), each divided by B
    # g_head, g_tail = grad L_head(w), grad L_tail(w): two backwards through F1's graph (B1, B2),
    # returned rather than added into .grad, where the two would mix
    g = [torch.autograd.grad(L[n_i], opt.params, retain_graph=n_i == 0, allow_unused=True,
                             materialize_grads=True) for n_i in (0, 1)]
    for n_i in (0, 1):                                  # head, then tail
        if opt.rho_is[n_i] == 0:                        # the head in stage 2: eps = 0
            opt.add_grad(g[n_i])                        # G += grad L(w)
            continue
        opt.compute_and_add_epsilon(n_i, g[n_i])        # w -> w + eps
        with frozen_bn_stats(model):
            split_losses(forward(model, criterion, x, y)[1], tail, "batch", w)[n_i].backward()  # F, B
        opt.compute_grad_sum_and_restore_p()            # G += grad L(w + eps); back to w
    opt.update()                                        # SGD step with G
    return logits.detach(), loss_i.detach()


STEPS = {"sgd": sgd_step, "sam": sam_step, "imbsam": imbsam_step, "ssesam": ssesam_step}


# =============================================================================================
# Evaluation: mean per-class accuracy, and Many / Medium / Few by training count
# =============================================================================================

def shot_groups(counts, n_max):
    """Many: n > n_max / 5, Few: n < n_max / 25, Medium: the rest (CIFAR-100: >100, <20)."""
    n = torch.tensor(counts)
    many, few = n > n_max / 5, n < n_max / 25
    return {"many": many, "med": ~many & ~few, "few": few}


@torch.no_grad()
def evaluate(model, x_test, y_test, counts, n_max, batch_size=1000, amp=False):
    """Accuracies in percent: avg (mean per class), many, med, few; *_tta with flip averaging."""
    was_training = model.training
    model.eval()  # BN uses its running statistics
    C = len(counts)
    hits = torch.zeros(2, C, device=x_test.device)
    for i in range(0, len(y_test), batch_size):
        x = normalize(x_test[i:i + batch_size]).contiguous(memory_format=torch.channels_last)
        y = y_test[i:i + batch_size]
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            z = model(x).float()
            z_tta = (z + model(x.flip(3)).float()) / 2  # average the image's and its mirror's logits
        for j, logits in enumerate((z, z_tta)):
            hits[j].index_add_(0, y, (logits.argmax(1) == y).float())
    per_class = hits.cpu().double() / torch.bincount(y_test.cpu(), minlength=C).clamp(min=1) * 100
    model.train(was_training)
    groups, out = shot_groups(counts, n_max), {}
    for j, suffix in enumerate(("", "_tta")):
        out["avg" + suffix] = per_class[j].mean().item()
        for name, mask in groups.items():
            out[name + suffix] = per_class[j][mask].mean().item() if mask.any() else None
    return out


# =============================================================================================
# CUDA graphs: the same step, recorded once and replayed (--cuda_graph)
# =============================================================================================
#
# On a GPU a step of a network this small is bound by launching hundreds of small kernels from
# Python, not by arithmetic. A CUDA graph records every kernel of one step once; a replay then
# launches them all at once. GraphedStep wraps any step function above and gives it what a replay
# needs:
#   * fixed input tensors: each batch is copied into static x, y and tail buffers;
#   * no read back to the host and no shape that depends on the data (true of every step above:
#     torch.where masks, no .item());
#   * the learning rate as a tensor that the schedule overwrites in place (fused SGD reads it from
#     device memory), so that one graph serves every epoch;
#   * one graph per variant, because Python branches are frozen when a graph is recorded: the
#     batch size (the short last batch of an epoch) and rho (SSE-SAM's switch);
#   * momentum buffers and .grad tensors that exist before recording, and a few warm-up steps
#     (cudnn picks its kernels, memory is allocated) whose training is then undone in place.
# On the CPU nothing is recorded: the step runs eagerly on the same static buffers, warm-up and
# undo included; the tests check that this gives the plain step's weights bit for bit.

_CAPTURE_LOCK = threading.Lock()  # runs in threads of one process record one graph at a time


class GraphedStep:
    """step(model, criterion, opt, x, y, tail, imbsam_weight) on static buffers, recorded as one
    CUDA graph per (batch size, rho) and replayed; eager on the CPU. Build it after any resume."""

    def __init__(self, step, model, opt, warmup=3):
        self.step, self.model, self.opt, self.warmup = step, model, opt, warmup
        dev = next(model.parameters()).device
        self.record = dev.type == "cuda"
        base = opt.optimizer if isinstance(opt, _Climb) else opt
        for group in base.param_groups:  # a tensor the schedule fills in place (set_lr)
            group["lr"] = torch.tensor(float(group["lr"]), device=dev)
        for p in model.parameters():  # buf = 0.9 * 0 + g on the first step: what SGD does without one
            base.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        # everything a step changes besides scratch space: undone after each warm-up
        self.state = [*model.parameters(), *model.buffers(),
                      *(base.state[p]["momentum_buffer"] for p in model.parameters())]
        self.variants = {}  # (B, rhos) -> (static x, y, tail, graph or None, static outputs)

    def __call__(self, model, criterion, opt, x, y, tail, imbsam_weight="group"):
        key = (len(y), getattr(opt, "rhos", None))
        if key not in self.variants:
            self.variants[key] = self._prepare(criterion, x, y, tail, imbsam_weight)
        sx, sy, st, graph, out = self.variants[key]
        sx.copy_(x)
        sy.copy_(y)
        st.copy_(tail)
        if graph is None:
            return self.step(self.model, criterion, self.opt, sx, sy, st, imbsam_weight)
        graph.replay()
        return out

    def _prepare(self, criterion, x, y, tail, imbsam_weight):
        static = (x.clone(), y.clone(), tail.clone())
        saved = [t.clone() for t in self.state]
        side = torch.cuda.Stream() if self.record else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(self.warmup):  # these steps train ...
                self.step(self.model, criterion, self.opt, *static, imbsam_weight)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # ... so their effect is undone, in place: a graph reads these tensors
            for t, s in zip(self.state, saved):
                t.copy_(s)
        if not self.record:
            return (*static, None, None)
        graph = torch.cuda.CUDAGraph()
        # records, runs nothing; one recording at a time in the process, and other threads' runs
        # may go on meanwhile (thread_local: only this thread's calls could spoil the recording)
        with _CAPTURE_LOCK, torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.step(self.model, criterion, self.opt, *static, imbsam_weight)
        return (*static, graph, out)


# =============================================================================================
# Training
# =============================================================================================

def make_model_and_criterion(cfg: "Config", counts, device, memory_format=torch.contiguous_format):
    """The network (cosine classifier for LDAM) and the per-sample loss that cfg asks for."""
    model = build_model(cfg.arch, len(counts), normed=cfg.loss == "LDAM")
    model = model.to(device, memory_format=memory_format)
    criterion = LongTailLoss(cfg.loss, counts, cfg.tau, cfg.vs_gamma, cfg.ldam_max_m, cfg.ldam_s).to(device)
    return model, criterion


def make_optimizer(cfg: "Config", model):
    # fused: SGD's whole update in one kernel for all parameters, on the CPU and on CUDA, and the
    # one torch SGD that also reads a tensor learning rate without a host sync (GraphedStep)
    base = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd,
                           fused=True)
    if cfg.opt == "sam":
        return SAM(base, model, cfg.rho)
    if cfg.opt == "imbsam":
        return ImbSAM(base, model, cfg.rho)
    if cfg.opt == "ssesam":
        return SSESAM(base, model, cfg.head_rho, cfg.tail_rho, cfg.gamma, cfg.epochs)
    return base


def lr_at(epoch: int, cfg: "Config") -> float:
    """Cosine to 0, stepped before each epoch as the official code does: lr * (1 + cos(pi (e+1) / T)) / 2.
    So the last epoch trains at lr 0 and only refreshes BN statistics."""
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch + 1) / cfg.epochs))


def set_lr(opt, lr: float):
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)  # in place: a recorded CUDA graph reads this very tensor
        else:
            group["lr"] = lr


def train_one_epoch(model, criterion, opt, step, xs, ys, is_tail, batch_size, imbsam_weight="group",
                    progress=None):
    """One pass over the shuffled epoch (xs, ys), a step per batch of B (the last may be shorter).
    Returns the per-step loss sums and the count of correct predictions at w as device tensors,
    which the caller reads once per epoch: a read per step would stall a GPU every step."""
    model.train()
    N, B = len(ys), batch_size
    step_loss = torch.zeros(math.ceil(N / B), device=ys.device)
    correct = torch.zeros((), device=ys.device)
    for s, i in enumerate(range(0, N, B)):
        xb, yb = xs[i:i + B], ys[i:i + B]
        logits, loss_i = step(model, criterion, opt, xb, yb, is_tail[yb], imbsam_weight)
        step_loss[s] = loss_i.sum()
        correct += (logits.argmax(1) == yb).sum()
        if progress is not None:
            progress(s + 1, len(step_loss))
    if isinstance(opt, _Climb):
        opt.end_epoch()
    return step_loss, correct


class ProgressLine:
    """One terminal line rewritten in place: step k/n, seconds per step, time left in the epoch.
    It reads only the host clock, never the device: on a GPU the host runs ahead by at most the
    queue of launched kernels, so once that is full the rate is the device's."""

    def __init__(self, epoch, epochs):
        self.label, self.t0, self.shown = f"epoch {epoch}/{epochs}", time.time(), 0.0

    def __call__(self, k, n):
        now = time.time()
        if now - self.shown >= 0.5 or k == n:
            self.shown, rate = now, (now - self.t0) / k
            sys.stdout.write(f"\r{self.label} step {k}/{n} {rate:.2f} s/step, "
                             f"{rate * (n - k):.0f} s left\033[K")
            sys.stdout.flush()

    @staticmethod
    def clear():
        sys.stdout.write("\r\033[K")


def run_epoch(cfg: "Config", epoch, model, criterion, opt, step, x_pad, y, is_tail, fmt, rng, progress):
    """Epoch `epoch` (0-indexed): its lr and DRW weights, one pass over freshly augmented data.
    Returns its log row; raises Diverged if the training loss turned non-finite."""
    lr = lr_at(epoch, cfg)
    set_lr(opt, lr)
    if cfg.drw_epoch is not None:
        criterion.set_drw(epoch >= cfg.drw_epoch)
    rho_h, rho_t = getattr(opt, "rhos", (0.0, 0.0))  # SGD has none; read before end_epoch()
    xs, ys = shuffled_epoch(x_pad, y, fmt, rng)  # the whole epoch at once, on the device
    step_loss, correct = train_one_epoch(model, criterion, opt, step, xs, ys, is_tail,
                                         cfg.batch_size, cfg.imbsam_weight, progress)
    loss, train_acc = step_loss.sum().item() / len(ys), correct.item() / len(ys) * 100
    if not math.isfinite(loss):
        bad = (~torch.isfinite(step_loss)).nonzero()
        where = f"step {int(bad[0]) + 1} of {len(step_loss)}" if len(bad) else "its loss sum overflowed"
        raise Diverged(f"non-finite training loss at epoch {epoch + 1}, {where} (lr {lr:.3g})")
    return {"epoch": epoch + 1, "lr": lr, "rho_head": rho_h, "rho_tail": rho_t, "loss": loss,
            "train_acc": train_acc}


def _fmt(v):
    return "  -- " if v is None else f"{v:5.1f}"


# --- The rolling checkpoint: everything the next epoch depends on, so a run continues bit for bit

CKPT_FORMAT = "ssesam-minimal last.pt 3"


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived (raised by the handler main() installs)."""

    def __init__(self, signum):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class Diverged(Exception):
    """The training loss turned non-finite."""


_SIGNAL = {"defer": False, "pending": None}  # while last.pt is written, a signal waits


def _on_signal(signum, frame):
    if _SIGNAL["defer"]:
        _SIGNAL["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT / SIGTERM (as main() handles them) take effect only after the block: a Ctrl-C while
    last.pt is written lets the epoch just finished reach the disk. Signals reach the main thread
    only, so a run in another thread (scripts/multi_run.py) has nothing to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGNAL.update(defer=True, pending=None)
    try:
        yield
    finally:
        _SIGNAL["defer"] = False
    if _SIGNAL["pending"] is not None:
        raise Interrupted(_SIGNAL["pending"])


def _atomic_write(path, data):
    """Write data (str: as text, else torch.save) to path.tmp, then rename it over path: whatever
    happens meanwhile, path holds either the old file or the whole new one."""
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


def _checkpoint(cfg, epoch, model, opt, criterion, rng, history, best, seconds):
    """last.pt's content after `epoch` finished epochs."""
    return {
        "format": CKPT_FORMAT, "config": dataclasses.asdict(cfg), "epoch": epoch,
        "model": model.state_dict(),          # weights and BN running statistics
        "optimizer": opt.state_dict(),        # SGD momentum buffers (and SSE-SAM's epoch counter)
        "criterion": criterion.state_dict(),  # DRW class weights
        "rng": rng.get_state(),               # the run's data order, crops and flips to come
        "history": history, "best": best, "seconds": seconds,
    }


def _restore(ckpt, model, opt, criterion, rng, path):
    """Load a checkpoint into the live objects; returns (history, best, epochs done, seconds)."""
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        criterion.load_state_dict(ckpt["criterion"])
        rng.set_state(ckpt["rng"])
        return ckpt["history"], ckpt["best"], ckpt["epoch"], ckpt["seconds"]
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{path} does not fit this run ({type(e).__name__}); delete it to start afresh")


_INIT_LOCK = threading.Lock()  # runs in threads of one process seed and draw their weights in turn


def train(cfg: "Config", data, device, log=print, ckpt_path=None, resume=None, progress=None):
    """Train per cfg on (x, y, x_test, y_test, counts, n_max); returns (model, summary dict).
    ckpt_path: keep the rolling checkpoint there; resume: a checkpoint (dict) to continue from;
    progress: an updating line per step (default: when log is print and stdout a terminal)."""
    x, y, x_test, y_test, counts, n_max = data
    amp = device.type == "cuda"  # bf16 autocast on CUDA; fp32 weights and optimizer maths
    if amp:
        torch.backends.cudnn.benchmark = True  # time the convolution kernels once per shape
    # channels_last stores (N, C, H, W) as N, H, W, C, the layout the convolution kernels prefer on
    # CUDA and on the CPU alike; the maths is the same
    fmt = torch.channels_last
    with _INIT_LOCK:  # the initial weights come from the global generator, seeded here
        torch.manual_seed(cfg.seed)
        model, criterion = make_model_and_criterion(cfg, counts, device, fmt)
    rng = torch.Generator(device).manual_seed(cfg.seed)  # the run's own: data order, crops, flips
    opt = make_optimizer(cfg, model)
    history, best, done, seconds = [], None, 0, 0.0
    if resume is not None:
        history, best, done, seconds = _restore(resume, model, opt, criterion, rng, ckpt_path)
    step = GraphedStep(STEPS[cfg.opt], model, opt) if cfg.cuda_graph else STEPS[cfg.opt]
    is_tail = torch.tensor([n < cfg.eta for n in counts], device=device)  # tail iff n_c < eta
    x_pad = F.pad(x, (PAD,) * 4).to(device)   # (N, 3, 40, 40) uint8, zero padding as RandomCrop's
    y, x_test, y_test = y.to(device), x_test.to(device), y_test.to(device)
    show = (log is print and sys.stdout.isatty()) if progress is None else progress
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.dataset} IF {cfg.imb_factor:g}: {len(y)} train images, {len(counts)} classes, "
        f"{int(is_tail.sum())} tail (n < {cfg.eta}); {cfg.arch} {n_params / 1e6:.2f} M params; "
        f"{cfg.opt} + {cfg.loss}; device {device}" + (", CUDA graphs" if cfg.cuda_graph else "")
        + (f"; resumed after epoch {done}" if done else ""))
    t_start, saved, epoch = time.time() - seconds, done, done
    try:
        for epoch in range(done, cfg.epochs):
            t0, bar = time.time(), ProgressLine(epoch + 1, cfg.epochs) if show else None
            row = run_epoch(cfg, epoch, model, criterion, opt, step, x_pad, y, is_tail, fmt, rng, bar)
            last = epoch == cfg.epochs - 1
            if (epoch + 1) % cfg.print_freq == 0 or last:
                row.update(evaluate(model, x_test, y_test, counts, n_max, cfg.test_batch_size, amp))
                best = row if best is None or row["avg"] > best["avg"] else best
            row["seconds"] = time.time() - t0
            history.append(row)
            if ckpt_path is not None and ((epoch + 1) % cfg.save_every == 0 or last):
                with _signals_deferred():
                    _atomic_write(ckpt_path, _checkpoint(cfg, epoch + 1, model, opt, criterion, rng,
                                                         history, best, time.time() - t_start))
                    saved = epoch + 1
            if bar is not None:
                bar.clear()
            log(_epoch_line(cfg, row, (time.time() - t_start) / (epoch + 1) * (cfg.epochs - epoch - 1)))
    except (Interrupted, Diverged) as e:  # an unfinished epoch is dropped, never saved
        if ckpt_path is None:
            note = "nothing saved (no --out)"
        elif saved == 0:
            note = "no epoch saved yet"
        else:
            note = f"{ckpt_path} holds epoch {saved} of {cfg.epochs}; continue with --resume"
        where = ""
        if isinstance(e, Interrupted):
            where = f" after epoch {saved}" if saved == epoch + 1 else f" during epoch {epoch + 1}"
        e.args = (f"{e}{where}; {note}",)
        raise
    return model, _summary(cfg, history, best, device, n_params, time.time() - t_start)


def _epoch_line(cfg, row, seconds_left):
    test = " ".join(f"{k} {_fmt(row[k])}" for k in ("avg", "many", "med", "few")) if "avg" in row else " --"
    return (f"epoch {row['epoch']:3d}/{cfg.epochs} lr {row['lr']:.5f} rho_h {row['rho_head']:.3f} "
            f"rho_t {row['rho_tail']:.3f} loss {row['loss']:.4f} train {row['train_acc']:5.1f} | "
            f"test {test} | {row['seconds']:.1f}s eta {seconds_left / 60:.1f}m")


def finish(cfg: "Config", model, summary, log=print) -> dict:
    """Report the last and the best evaluation, and write metrics.jsonl (one line per evaluated
    epoch), summary.json and model.pt into --out, each whole or not at all. Returns the summary
    without its history."""
    history = summary.pop("history")
    f, b = summary["final"], summary["best"]
    log(f"final (epoch {f['epoch']}): avg {_fmt(f['avg'])} many {_fmt(f['many'])} med {_fmt(f['med'])} "
        f"few {_fmt(f['few'])} | flip-TTA avg {_fmt(f['avg_tta'])} many {_fmt(f['many_tta'])} "
        f"med {_fmt(f['med_tta'])} few {_fmt(f['few_tta'])}")
    log(f"best on the test set (epoch {b['epoch']}, chosen on the test set, optimistic): "
        f"avg {_fmt(b['avg'])} | flip-TTA avg {_fmt(b['avg_tta'])}")
    log(f"{summary['seconds']:.1f}s on {summary['device_name']}")
    if cfg.out is not None:  # summary.json last: its presence says the run is complete
        rows = "".join(json.dumps(row) + "\n" for row in history if "avg" in row)
        _atomic_write(os.path.join(cfg.out, "metrics.jsonl"), rows)
        _atomic_write(os.path.join(cfg.out, "model.pt"), model.state_dict())
        _atomic_write(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=2))
    return summary


def _summary(cfg, history, best, device, n_params, seconds):
    keys = ("epoch", "avg", "many", "med", "few", "avg_tta", "many_tta", "med_tta", "few_tta")
    return {
        "config": dataclasses.asdict(cfg),
        "final": {k: history[-1][k] for k in keys},
        "best": {k: best[k] for k in keys},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "params": n_params,
        "seconds": seconds,
        "history": history,
    }


# =============================================================================================
# Saddle analysis: extreme Hessian eigenvalues of the head-class and the tail-class loss
# =============================================================================================
#
# The paper's claim is about saddle points: SAM escapes those of the overall loss but not those of
# the tail-class loss. At a saddle the Hessian H = grad^2 L(w) has eigenvalues of both signs, so the
# indicator (Rangwani et al., NeurIPS 2022) is lambda_min / lambda_max of a group's loss at the
# trained w: about 0 near a minimum, clearly negative near a saddle. H (P x P) is never formed;
# power iteration and Lanczos need only products with it, by double backprop:
#     H v = grad_w < grad_w L(w), v >
# The model is in eval mode (BN uses its running statistics) and the images are not augmented, so
# L is one fixed function of w and every product applies the same H.

def group_loss_terms(model, criterion, x, y, batch_size=250):
    """L = (1 / N) sum_i l_i over uint8 images x (N, 3, H, W), one term per batch: their sum is L,
    and only one batch's graph is in memory at a time."""
    p = next(model.parameters())
    for i in range(0, len(y), batch_size):
        xb = normalize(x[i:i + batch_size].to(p.device)).to(p.dtype)  # no augmentation
        yield criterion(model(xb), y[i:i + batch_size].to(p.device)).sum() / len(y)


@torch.enable_grad()
def hvp(model, criterion, x, y, v, batch_size=250):
    """H v, H the Hessian of L(w) = (1 / N) sum_i l_i(w) in the trainable parameters; v flat (P,)."""
    params = [p for p in model.parameters() if p.requires_grad]
    vs = [vi.view_as(p) for vi, p in zip(v.split([p.numel() for p in params]), params)]
    Hv = torch.zeros_like(v)
    for L_b in group_loss_terms(model, criterion, x, y, batch_size):  # H is a sum over the batches
        g = torch.autograd.grad(L_b, params, create_graph=True)     # g = grad L_b, differentiable
        # H_b v = grad_w (g . v): one more backward, through the first one
        g_dot_v = sum((gi * vi).sum() for gi, vi in zip(g, vs))
        Hv_b = torch.autograd.grad(g_dot_v, params, allow_unused=True, materialize_grads=True)
        Hv += torch.cat([h.reshape(-1) for h in Hv_b])
    return Hv


def power_iteration(H, v0, max_iter=100, tol=1e-3):
    """The eigenvalue of largest |lambda| of a symmetric operator H (a function v -> H v), from v0.
    Stops when the Rayleigh quotient changes by less than tol, relatively (PyHessian's rule)."""
    v, lam = v0 / v0.norm(), math.inf
    for _ in range(max_iter):
        Hv = H(v)
        # Rayleigh quotient lambda = v^T H v for a unit v
        lam, prev = torch.dot(v, Hv).item(), lam
        v = Hv / Hv.norm()
        if abs(lam - prev) < tol * abs(lam):
            break
    return lam


def lambda_max(H, v0, max_iter=100, tol=1e-3):
    """The largest eigenvalue of H by power iteration. That finds mu, the eigenvalue of largest
    |lambda|. If mu < 0, mu is lambda_min, and H - mu I (eigenvalues lambda - mu >= 0) has the
    largest eigenvalue lambda_max - mu."""
    mu = power_iteration(H, v0, max_iter, tol)
    if mu < 0:
        mu += power_iteration(lambda v: H(v) - mu * v, v0, max_iter, tol)
    return mu


def lanczos(H, v0, k=30):
    """Ritz values (ascending) of k Lanczos steps on a symmetric operator H from v0, with full
    re-orthogonalisation. The extreme ones approach lambda_min and lambda_max from inside."""
    n = min(k, v0.numel())
    Q = torch.zeros(n, v0.numel(), dtype=v0.dtype, device=v0.device)  # rows: orthonormal q_1..q_n
    Q[0] = v0 / v0.norm()
    alpha, beta = [], []
    for j in range(n):
        w = H(Q[j])
        alpha.append(torch.dot(Q[j], w).item())  # alpha_j = q_j^T H q_j
        if j == n - 1:
            break
        # r = (I - Q Q^T) H q_j, twice: in floating point one pass leaves the q_i slightly
        # non-orthogonal, and the Ritz values would then repeat (ghost eigenvalues)
        r = w - Q[:j + 1].T @ (Q[:j + 1] @ w)
        r = r - Q[:j + 1].T @ (Q[:j + 1] @ r)
        b = r.norm().item()
        if b <= 1e-6 * w.norm().item():  # span{q_1..q_j} is invariant under H: Ritz values exact
            break
        beta.append(b)  # beta_j = ||r||, q_{j+1} = r / beta_j
        Q[j + 1] = r / b
    # T = Q^T H Q is tridiagonal, alpha on the diagonal and beta beside it; eig(T) = the Ritz values
    a, b = torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
    return torch.linalg.eigvalsh(torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1))


def hessian_extremes(model, criterion, x, y, max_iter=100, tol=1e-3, k=30, seed=0, batch_size=250):
    """lambda_max (power iteration), lambda_min (smallest Ritz value of Lanczos) and their ratio for
    the Hessian of L(w) = (1 / N) sum_i l_i(w) over (x, y), in eval mode; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        P = sum(q.numel() for q in model.parameters() if q.requires_grad)
        v0 = torch.randn(P, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)

        def H(v):
            return hvp(model, criterion, x, y, v, batch_size)

        lam_max, lam_min = lambda_max(H, v0, max_iter, tol), lanczos(H, v0, k)[0].item()
    finally:
        model.train(was_training)
    return {"lambda_max": lam_max, "lambda_min": lam_min, "ratio": lam_min / lam_max}


def saddle_analysis(model, criterion, x, y, counts, eta, max_images=None, seed=0, **kw):
    """{"head": ..., "tail": ...}: hessian_extremes (kw: max_iter, tol, k, batch_size) of L_head and
    L_tail, the mean loss over the training images of the classes with n_c >= eta (head) or
    n_c < eta (tail), or over a fixed random subset of max_images of them. None for an empty group."""
    is_tail = torch.tensor([n < eta for n in counts])[y.cpu()]
    out = {}
    for name, mask in (("head", ~is_tail), ("tail", is_tail)):
        idx = torch.nonzero(mask).flatten()
        if max_images is not None:  # the subset's Hessian is an unbiased estimate of the group's
            pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))
            idx = idx[pick[:max_images]]
        out[name] = (hessian_extremes(model, criterion, x[idx], y[idx], seed=seed, **kw)
                     if len(idx) else None)
    return out




# =============================================================================================
# Command line: the settings (one dataclass, from which the flags are made), checks, main()
# =============================================================================================

OPTS = ("sgd", "sam", "imbsam", "ssesam")
LOSSES = ("CE", "LDAM", "LA", "VA", "VS")  # VA: the seed README's spelling of LA
DATASETS = ("cifar10", "cifar100", "synthetic")


def _arg(default, help, choices=None):
    """A dataclass field that also carries its --help text (the CLI is built from these)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    # data
    dataset: str = _arg("cifar100", "data set", DATASETS)
    data_dir: str = _arg("./datasets", "folder holding (or receiving) the CIFAR python files")
    imb_factor: float = _arg(100.0, "imbalance factor IF = n_max / n_min (>= 1; 100, not 0.01)")
    subset_seed: Optional[int] = _arg(None, "shuffle each class with this seed before taking its "
                                            "first n_i images (LDAM-DRW); None: file order")
    # model and loss
    arch: str = _arg("resnet32", "network; resnet34 is the official code's backbone", ARCHS)
    loss: str = _arg("CE", "per-sample loss", LOSSES)
    tau: float = _arg(0.75, "LA/VS: weight of the additive log-prior tau * log(pi_c)")
    vs_gamma: float = _arg(0.05, "VS: multiplicative scale (n_c / n_max)^vs_gamma")
    ldam_max_m: float = _arg(0.5, "LDAM: margin of the rarest class")
    ldam_s: float = _arg(30.0, "LDAM: logit scale s")
    drw_epoch: Optional[int] = _arg(None, "deferred re-weighting (beta 0.9999) from this 0-indexed "
                                          "epoch on; None: off")
    # optimizer
    opt: str = _arg("ssesam", "optimizer", OPTS)
    rho: float = _arg(0.05, "SAM / ImbSAM: perturbation radius rho")
    head_rho: float = _arg(0.05, "SSE-SAM: rho_head, radius for the head classes until the switch")
    tail_rho: float = _arg(0.10, "SSE-SAM: rho_tail, radius for the tail classes (constant)")
    gamma: float = _arg(0.70, "SSE-SAM: rho_head = 0 after the first gamma * epochs epochs; "
                              "0 <= gamma < 1")
    eta: int = _arg(100, "ImbSAM / SSE-SAM: a class is tail iff its training count < eta")
    imbsam_weight: str = _arg("group", "ImbSAM: 'group' divides each group's loss by its size in "
                                       "the batch (the SSE-SAM code's baseline), 'batch' by B, "
                                       "'imbsam_repo' by B with the tail's doubled (the ImbSAM code)",
                              ("group", "batch", "imbsam_repo"))
    # schedule
    epochs: int = _arg(200, "training epochs T")
    batch_size: int = _arg(64, "training batch size B")
    lr: float = _arg(0.01, "SGD learning rate, cosine-annealed to 0 per epoch")
    momentum: float = _arg(0.9, "SGD momentum")
    wd: float = _arg(1e-3, "SGD weight decay")
    seed: int = _arg(9826, "seed of the initial weights and of the data order, crops and flips "
                           "(the official default)")
    # run
    gpu: Optional[int] = _arg(None, "CUDA device index (falls back to CPU with a warning when the "
                                    "machine has no CUDA)")
    device: str = _arg("auto", "auto, cpu, cuda or cuda:N (--gpu wins when given)")
    cuda_graph: bool = _arg(False, "record each training step as a CUDA graph and replay it (on the "
                                   "CPU: the same static-buffer step, run eagerly); not yet checked "
                                   "on a GPU, hence off by default")
    print_freq: int = _arg(1, "evaluate on the test set every this many epochs (and at the last)")
    test_batch_size: int = _arg(1000, "evaluation batch size")
    out: Optional[str] = _arg(None, "folder for metrics.jsonl, summary.json, model.pt and the "
                                    "rolling checkpoint last.pt")
    save_every: int = _arg(1, "with --out: write last.pt every this many epochs (and at the last)")
    resume: bool = _arg(False, "continue the run whose last.pt is in --out (same settings)")


# settings a --resume may change: where the run happens and how often it reports, not what it computes
RUN_ONLY = ("data_dir", "gpu", "device", "cuda_graph", "print_freq", "test_batch_size", "out",
            "save_every", "resume")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The CLI, derived field by field from Config so that each setting is declared once."""
    p = _Parser(prog="ssesam_minimal.py", description="SSE-SAM on long-tailed CIFAR.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type is bool:  # a switch: never type=bool (argparse would read "False" as true)
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(f"--{f.name}", action=action, default=f.default, help=f.metadata["help"])
            continue
        typ = {Optional[int]: int, Optional[str]: str}.get(f.type, f.type)  # Optional[X] -> X
        p.add_argument(f"--{f.name}", type=typ, default=f.default,
                       choices=f.metadata["choices"], help=f.metadata["help"])
    return p


def check_config(cfg: Config) -> None:
    """Reject settings that would run but mean nothing, each with one line that says why."""
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


def resolve_device(cfg: Config) -> torch.device:
    """--gpu N (the official flag; without CUDA: the CPU, with a warning), else --device."""
    if cfg.gpu is not None and not torch.cuda.is_available():
        print(f"warning: no CUDA on this machine; --gpu {cfg.gpu} ignored, running on the CPU",
              file=sys.stderr)
        return torch.device("cpu")
    name = f"cuda:{cfg.gpu}" if cfg.gpu is not None else cfg.device
    flag = f"--gpu {cfg.gpu}" if cfg.gpu is not None else f"--device {cfg.device}"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
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
        raise UsageError(f"{path} is not a checkpoint of ssesam_minimal.py; delete it to start afresh")
    return ckpt


def config_diff(saved: dict, cfg: Config) -> list:
    """'--name now (last.pt: then)' for every setting that changes what the run computes."""
    now, absent = dataclasses.asdict(cfg), "(absent)"
    names = [k for k in now if k not in saved] + list(saved)
    return [f"--{k} {now.get(k, absent)} (last.pt: {saved.get(k, absent)})" for k in names
            if k not in RUN_ONLY and now.get(k, absent) != saved.get(k, absent)]


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
        ckpt = load_checkpoint(path)
        diff = config_diff(ckpt["config"], cfg)
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


def main(argv=None) -> dict:
    """The CLI: parse, check, load, train, report, write --out. Returns the summary dict.
    Exit codes: 2 bad input, 1 non-finite loss, 128 + signal number when interrupted."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if in_main_thread:  # SIGINT / SIGTERM -> Interrupted: train() saves, main() prints one line
        for s in handlers:
            signal.signal(s, _on_signal)
    try:
        cfg = Config(**vars(build_parser().parse_args(argv)))
        check_config(cfg)
        device = resolve_device(cfg)
        resume = prepare_out(cfg)
        data = load_data(cfg)
        if cfg.out is not None:
            os.makedirs(cfg.out, exist_ok=True)
        ckpt_path = None if cfg.out is None else os.path.join(cfg.out, "last.pt")
        model, summary = train(cfg, data, device, ckpt_path=ckpt_path, resume=resume)
    except (UsageError, Interrupted, Diverged) as e:  # one line on stderr, never a traceback
        code = 2 if isinstance(e, UsageError) else 1 if isinstance(e, Diverged) else 128 + e.signum
        print(f"ssesam_minimal.py: {'error: ' if code == 2 else ''}{e}", file=sys.stderr)
        raise SystemExit(code)
    finally:
        if in_main_thread:
            for s, h in handlers.items():
                signal.signal(s, h)
    return finish(cfg, model, summary)


if __name__ == "__main__":
    main()
