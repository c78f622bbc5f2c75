"""ssesam_minimal.py -- SSE-SAM in one file: data, ResNet, losses, SAM / ImbSAM / SSE-SAM, training.

Paper: Xingyu Lyu, Qianqian Xu, Zhiyong Yang, Shaojie Lyu, Qingming Huang. "SSE-SAM: Balancing Head
and Tail Classes Gradually through Stage-Wise SAM". AAAI 2025. https://arxiv.org/abs/2412.13715

What it does. Long-tailed CIFAR-10/100 (imbalance factor IF: class i keeps floor(n_max / IF^(i/(C-1)))
images). SAM minimises the loss at the worst nearby point w + eps, eps = rho * g / ||g||. ImbSAM
applies that to the tail-class loss only. SSE-SAM splits every batch by class into head (training
count >= eta) and tail, perturbs each group along its own gradient (rho_head, rho_tail), and after
gamma * T epochs sets rho_head = 0, from where on it is ImbSAM:

    G = grad L_head(w + eps_head) + grad L_tail(w + eps_tail),   L_group = sum_{i in group} l_i / B

The saddle analysis reports lambda_min / lambda_max of the Hessian of L_head and of L_tail (power
iteration and Lanczos on Hessian-vector products), the indicator behind the paper's argument that
SAM escapes saddles of the overall loss but not of the tail's. tutorial.ipynb steps through it all.

Run:
    python ssesam_minimal.py --gpu 0 --imb_factor 100 --opt ssesam --loss CE --eta 100 \
        --print_freq 1 --head_rho 0.05 --tail_rho 0.10 --gamma 0.70 --dataset cifar100
    python ssesam_minimal.py --dataset synthetic --arch resnet8 --epochs 2   # CPU smoke run
    python ssesam_minimal.py --out runs/a [--resume]        # keep last.pt; continue after Ctrl-C
    python ssesam_minimal.py --bench                                         # step cost vs official
    from ssesam_minimal import SSESAM                                           # the official API

Measured (NVIDIA H200, torch 2.11, seed command on CIFAR-100-LT): a ResNet-32 SSE-SAM epoch takes
9-12 s before the switch and about 7 s after it (launch-bound). The accuracy table has not been
reproduced with this file yet. On the CPU (AMD EPYC, 1 thread, torch 2.14.1, --bench) an SSE-SAM
step takes 0.58-0.68 of the official step's time before the switch and 0.42-0.50 after it.
README.md has the numbers, the test command and the flags.
Deliberate differences from the official code (each explained in README.md):
  * one forward at w feeds both the head and the tail gradient, and the head's perturbed pass is
    skipped once rho_head = 0: 3F+4B per step before the switch, 2F+3B after (official: 4F+4B);
  * weights are restored from a saved copy, not by subtracting eps;
  * BatchNorm running statistics are updated only by the forward at the unperturbed weights;
  * gamma = 0 works (head rho is 0 from the first step); the official code crashes there;
  * --imb_factor is the ratio n_max / n_min (100), never 0.01;
  * the default network is the true CIFAR ResNet-32 (0.47 M parameters); the 21.3 M-parameter
    network the official code trains under that name is --arch resnet34;
  * LDAM uses the cosine classifier of the LDAM paper; the headline number is the last epoch.
"""

import argparse
import contextlib
import copy
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
from torch.utils._python_dispatch import TorchDispatchMode

# =============================================================================================
# Config
# =============================================================================================

OPTS = ("sgd", "sam", "imbsam", "ssesam")
LOSSES = ("CE", "LDAM", "LA", "VA", "VS")  # VA: the seed README's spelling of LA
DATASETS = ("cifar10", "cifar100", "synthetic")
CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110)  # 6n + 2
ARCHS = tuple(f"resnet{d}" for d in CIFAR_DEPTHS) + ("resnet34",)


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
                                       "the batch (official baseline), 'batch' by B", ("group", "batch"))
    # schedule
    epochs: int = _arg(200, "training epochs T")
    batch_size: int = _arg(64, "training batch size B")
    lr: float = _arg(0.01, "SGD learning rate, cosine-annealed to 0 per epoch")
    momentum: float = _arg(0.9, "SGD momentum")
    wd: float = _arg(1e-3, "SGD weight decay")
    seed: int = _arg(9826, "seed for torch and numpy (the official default)")
    # run
    gpu: Optional[int] = _arg(None, "CUDA device index (falls back to CPU with a warning when the "
                                    "machine has no CUDA)")
    device: str = _arg("auto", "auto, cpu, cuda or cuda:N (--gpu wins when given)")
    print_freq: int = _arg(1, "evaluate on the test set every this many epochs (and at the last)")
    test_batch_size: int = _arg(1000, "evaluation batch size")
    out: Optional[str] = _arg(None, "folder for metrics.jsonl, summary.json, model.pt and the "
                                    "rolling checkpoint last.pt (--bench: bench.json)")
    save_every: int = _arg(1, "with --out: write last.pt every this many epochs (and on "
                              "SIGINT / SIGTERM, and when the loss turns non-finite)")
    resume: bool = _arg(False, "continue the run whose last.pt is in --out (same settings)")
    bench: bool = _arg(False, "do not train: time and count one step of each optimizer and one "
                              "epoch of augmentation against the official code's, on random "
                              "images (no data needed); prints a table (--out: bench.json)")


class UsageError(Exception):
    """Bad input: main() prints it as one line and exits with code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The CLI, derived field by field from Config so that each setting is declared once."""
    p = _Parser(prog="ssesam_minimal.py", description="SSE-SAM on long-tailed CIFAR.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type is bool:  # a switch: never type=bool (argparse would read "False" as true)
            p.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
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
    for name in ("rho", "head_rho", "tail_rho"):
        if not getattr(cfg, name) >= 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("eta", "epochs", "batch_size", "print_freq", "test_batch_size", "save_every"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "momentum", "wd", "tau", "vs_gamma", "ldam_max_m", "ldam_s"):
        if not getattr(cfg, name) >= 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.drw_epoch is not None and cfg.drw_epoch < 0:
        raise UsageError(f"--drw_epoch must be >= 0, got {cfg.drw_epoch}")
    if cfg.resume and cfg.out is None:
        raise UsageError("--resume needs --out: the folder whose last.pt it continues")


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


def data_counts(cfg: Config):
    """The per-class training counts of cfg's long-tailed data set, and n_max. Reads no data, so
    a bad --imb_factor is rejected before anything is read or downloaded."""
    n_max, num_classes = (200, 10) if cfg.dataset == "synthetic" else CIFAR[cfg.dataset][4:6]
    counts = lt_class_counts(n_max, num_classes, cfg.imb_factor)
    if min(counts) < 1:
        raise UsageError(f"--imb_factor {cfg.imb_factor:g} leaves class {counts.index(0)} with no "
                         f"training image ({cfg.dataset} has {n_max} per class: IF <= {n_max})")
    return counts, n_max


def load_data(cfg: Config):
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


def random_crop_flip(x_padded: torch.Tensor) -> torch.Tensor:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip(0.5), batched, on x_padded's device."""
    N, dev = x_padded.shape[0], x_padded.device
    dy = torch.randint(0, 2 * PAD + 1, (N,), device=dev)
    dx = torch.randint(0, 2 * PAD + 1, (N,), device=dev)
    flip = torch.rand(N, device=dev) < 0.5
    return crop_flip(x_padded, dy, dx, flip)


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (x / 255 - mean) / std."""
    mean = torch.tensor(MEAN, device=x_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x_uint8.device).view(1, 3, 1, 1)
    return (x_uint8.float() / 255 - mean) / std


def shuffled_epoch(x_padded: torch.Tensor, y: torch.Tensor, memory_format=torch.contiguous_format):
    """One epoch of training images at once, on their device: permuted, cropped, flipped and
    normalised in a few batched ops."""
    perm = torch.randperm(len(y), device=y.device)
    xs = normalize(random_crop_flip(x_padded[perm])).contiguous(memory_format=memory_format)
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
    DRW multiplies each loss by w_y, w_c = (1 - beta) / (1 - beta^n_c) normalised to sum C.
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
# SAM, ImbSAM, SSE-SAM: wrappers around a torch optimizer, with the official method names
# =============================================================================================
#
# Each climbs from w to w + eps along a gradient g, with one global L2 norm over every parameter
# that has a gradient:    eps = rho * g / (||g||_2 + 1e-16)
# then takes the gradient there and comes back to w. w is restored from a saved copy (copying back
# is exact; subtracting eps is not). All tensor maths is foreach: one kernel per op for the whole
# model, no per-parameter Python loop, no host-device sync.


class _Climb:
    """What the three share: the base optimizer, w's saved copy, the climb and the way back."""

    def __init__(self, optimizer, model):
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.w = [torch.empty_like(p) for p in self.params]  # w, saved before each climb

    @property
    def param_groups(self):
        """The base optimizer's (lr schedules act on it). A property, not a copy of the reference:
        optimizer.load_state_dict() replaces the list, and a stale copy would set a dead lr."""
        return self.optimizer.param_groups

    def grads(self):
        """Every parameter's gradient (zeros for one that has none)."""
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def zero_grad(self):
        torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])

    @torch.no_grad()
    def climb(self, rho, grads=None):
        """Save w, then w <- w + eps; clears .grad for the next backward."""
        g = self.grads() if grads is None else list(grads)
        # ||g||_2 over all parameters = the norm of the per-tensor norms
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
        # eps = rho * g / (||g||_2 + 1e-16)   (an all-zero g gives eps = 0, not NaN)
        eps = torch._foreach_mul(g, rho / (norm + 1e-16))
        torch._foreach_copy_(self.w, self.params)
        torch._foreach_add_(self.params, eps)
        self.zero_grad()

    @torch.no_grad()
    def restore(self):
        """w <- the saved w, bit for bit."""
        torch._foreach_copy_(self.params, self.w)


class SAM(_Climb):
    """SAM (Foret et al., 2021): step along grad L(w + eps).

        loss(model(x)).backward();  sam.first_step()    # w -> w + eps
        loss(model(x)).backward();  sam.second_step()   # back to w, base step with grad L(w + eps)
    """

    def __init__(self, optimizer, model, rho=0.05):
        super().__init__(optimizer, model)
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.rho = rho

    def first_step(self):
        self.climb(self.rho)

    @torch.no_grad()
    def second_step(self):
        self.restore()
        self.optimizer.step()  # momentum and weight decay act at w, as in the official code
        self.zero_grad()


class ImbSAM(_Climb):
    """ImbSAM (Zhou et al., ICCV 2023): SAM on the tail loss only.
    G = grad L_head(w) + grad L_tail(w + eps_tail).

        L_head.backward(retain_graph=True); imbsam.first_step()   # keep grad L_head(w)
        L_tail.backward();                  imbsam.second_step()  # w -> w + eps_tail
        L_tail(model(x)).backward();        imbsam.third_step()   # back to w, step with G
    """

    def __init__(self, optimizer, model, rho=0.05):
        super().__init__(optimizer, model)
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.rho = rho
        self.g_head = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def first_step(self):
        torch._foreach_copy_(self.g_head, self.grads())
        self.zero_grad()

    def second_step(self):
        self.climb(self.rho)

    @torch.no_grad()
    def third_step(self):
        self.restore()
        torch._foreach_add_(self.grads(), self.g_head)  # G = grad L_tail(w + eps) + grad L_head(w)
        self.optimizer.step()
        self.zero_grad()


class SSESAM(_Climb):
    """SSE-SAM: each group climbs along its own gradient; rho_head drops to 0 after gamma * T epochs.
    G = grad L_head(w + eps_head) + grad L_tail(w + eps_tail).   n_i: 0 = head, 1 = tail.

    The official call order (4 forwards, 4 backwards; README.md shows it whole):
        L_head.backward(); compute_and_add_epsilon(0); L_head(model(x)).backward(); compute_grad_sum_and_restore_p()
        L_tail.backward(); compute_and_add_epsilon(1); L_tail(model(x)).backward(); compute_grad_sum_and_restore_p()
        update()           # once per step
        update_rho()       # once per epoch
    """

    def __init__(self, optimizer, model, head_rho, tail_rho, gamma=0, total_epochs=200):
        super().__init__(optimizer, model)
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
        if head_rho < 0 or tail_rho < 0:
            raise ValueError(f"rho must be >= 0, got head {head_rho}, tail {tail_rho}")
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        self.head_rho0, self.tail_rho, self.gamma, self.total_epochs = head_rho, tail_rho, gamma, total_epochs
        # switch once k >= gamma * T; rounding first keeps 0.7 * 10 = 7.000000000000001 at 7
        self.cut = math.ceil(round(gamma * total_epochs, 9))
        self.k = 0                                            # update_rho() calls so far (epochs)
        self.G = [torch.zeros_like(p) for p in self.params]   # gradient sum over the groups
        self.G_empty = True

    @property
    def head_rho(self):
        """rho_head until update_rho() has been called gamma * T times, then 0 (stage 2 = ImbSAM)."""
        return self.head_rho0 if self.k < self.cut else 0.0

    @property
    def rho_is(self):  # the official name: [rho_head, rho_tail], indexed by n_i
        return [self.head_rho, self.tail_rho]

    def compute_and_add_epsilon(self, n_i, grads=None):
        """w <- w + eps with eps from .grad (or `grads`) and rho_is[n_i]."""
        self.climb(self.rho_is[n_i], grads)

    @torch.no_grad()
    def add_grad(self, grads):
        """G <- G + grads."""
        if self.G_empty:
            torch._foreach_copy_(self.G, grads)
        else:
            torch._foreach_add_(self.G, grads)
        self.G_empty = False

    def compute_grad_sum_and_restore_p(self):
        """G <- G + .grad (the gradient at w + eps); w restored; .grad cleared."""
        self.add_grad(self.grads())
        self.restore()
        self.zero_grad()

    @torch.no_grad()
    def update(self):
        """Base optimizer step with .grad = G, then G is cleared for the next step."""
        torch._foreach_copy_(self.grads(), self.G)
        self.optimizer.step()
        self.zero_grad()
        self.G_empty = True

    def update_rho(self):
        """Call once per epoch: counts epochs for the stage switch."""
        self.k += 1


@contextlib.contextmanager
def frozen_bn_stats(model):
    """Forward passes inside use batch statistics but leave BN running statistics untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in bns]
    for m in bns:
        m.track_running_stats = False  # in train mode: normalise by the batch, update nothing
    try:
        yield
    finally:
        for m, t in zip(bns, saved):
            m.track_running_stats = t


# =============================================================================================
# One training step per optimizer: each returns the logits and per-sample losses at w (for logs)
# =============================================================================================
#
# Every step starts with one forward at w (F1), the only one that updates BN running statistics.
# Perturbed forwards run under frozen_bn_stats. Passes per step:
#   SGD 1F+1B, SAM 2F+2B, ImbSAM 2F+3B, SSE-SAM 3F+4B before the switch and 2F+3B after.

def forward(model, criterion, x, y):
    """Logits and per-sample losses; bf16 autocast on CUDA for the network, fp32 for the loss."""
    with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):
        logits = model(x)
    return logits, criterion(logits, y)


def split_losses(loss_i, tail, weight="batch"):
    """L_head, L_tail from per-sample losses and a (B,) tail mask.
    batch: L_group = sum_{i in group} l_i / B           (SSE-SAM; L_head + L_tail = batch mean)
    group: L_group = sum_{i in group} l_i / |group|     (the official ImbSAM baseline)
    torch.where, not indexing: an empty group gives 0, never NaN, and shapes stay static."""
    zero = torch.zeros((), device=loss_i.device)
    L_head = torch.where(tail, zero, loss_i).sum()
    L_tail = torch.where(tail, loss_i, zero).sum()
    if weight == "group":
        n_tail = tail.sum()
        return L_head / (len(tail) - n_tail).clamp(min=1), L_tail / n_tail.clamp(min=1)
    return L_head / len(tail), L_tail / len(tail)


def sgd_step(model, criterion, opt, x, y, tail, imbsam_weight="group"):
    logits, loss_i = forward(model, criterion, x, y)
    loss_i.mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    return logits.detach(), loss_i.detach()


def sam_step(model, criterion, opt, x, y, tail, imbsam_weight="group"):
    logits, loss_i = forward(model, criterion, x, y)    # F1 at w
    loss_i.mean().backward()                            # B1: g = grad L(w)
    opt.first_step()                                    # w -> w + eps
    with frozen_bn_stats(model):
        forward(model, criterion, x, y)[1].mean().backward()  # F2, B2 at w + eps
    opt.second_step()                                   # back to w, step with grad L(w + eps)
    return logits.detach(), loss_i.detach()


def imbsam_step(model, criterion, opt, x, y, tail, imbsam_weight="group"):
    logits, loss_i = forward(model, criterion, x, y)    # F1 at w
    L_head, L_tail = split_losses(loss_i, tail, imbsam_weight)
    L_head.backward(retain_graph=True)                  # B1: grad L_head(w)
    opt.first_step()                                    #     kept aside
    L_tail.backward()                                   # B2: grad L_tail(w), same graph
    opt.second_step()                                   # w -> w + eps_tail
    with frozen_bn_stats(model):
        split_losses(forward(model, criterion, x, y)[1], tail, imbsam_weight)[1].backward()  # F2, B3
    opt.third_step()                                    # back to w, step with G
    return logits.detach(), loss_i.detach()


def ssesam_step(model, criterion, opt, x, y, tail, imbsam_weight="group"):
    logits, loss_i = forward(model, criterion, x, y)    # F1 at w, feeds both groups
    L_head, L_tail = split_losses(loss_i, tail)
    # B1: grad L_head(w), kept out of .grad: the climb changes w, and F1's graph is still needed
    g_head = torch.autograd.grad(L_head, opt.params, retain_graph=True, allow_unused=True,
                                 materialize_grads=True)
    L_tail.backward()                                   # B2: grad L_tail(w) into .grad
    opt.compute_and_add_epsilon(1)                      # w -> w + eps_tail
    with frozen_bn_stats(model):
        split_losses(forward(model, criterion, x, y)[1], tail)[1].backward()  # F2, B3 at w + eps_tail
    opt.compute_grad_sum_and_restore_p()                # G = grad L_tail(w + eps_tail); back to w
    if opt.head_rho > 0:                                # stage 1
        opt.compute_and_add_epsilon(0, g_head)          # w -> w + eps_head
        with frozen_bn_stats(model):
            split_losses(forward(model, criterion, x, y)[1], tail)[0].backward()  # F3, B4 at w + eps_head
        opt.compute_grad_sum_and_restore_p()            # G += grad L_head(w + eps_head)
    else:                                               # stage 2: eps_head = 0, reuse B1
        opt.add_grad(g_head)                            # G += grad L_head(w)
    opt.update()
    return logits.detach(), loss_i.detach()


STEPS = {"sgd": sgd_step, "sam": sam_step, "imbsam": imbsam_step, "ssesam": ssesam_step}


def make_model_and_criterion(cfg: Config, counts, device, memory_format=torch.contiguous_format):
    """The network (cosine classifier for LDAM) and the per-sample loss that cfg asks for."""
    model = build_model(cfg.arch, len(counts), normed=cfg.loss == "LDAM")
    model = model.to(device, memory_format=memory_format)
    criterion = LongTailLoss(cfg.loss, counts, cfg.tau, cfg.vs_gamma, cfg.ldam_max_m, cfg.ldam_s).to(device)
    return model, criterion


def make_optimizer(cfg: Config, model):
    # foreach=True: a few ops for the whole model per SGD step. Left to itself, torch runs SGD as a
    # Python loop over the parameters on the CPU (4 ops per tensor); on CUDA foreach is its default.
    base = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd,
                           foreach=True)
    if cfg.opt == "sam":
        return SAM(base, model, cfg.rho)
    if cfg.opt == "imbsam":
        return ImbSAM(base, model, cfg.rho)
    if cfg.opt == "ssesam":
        return SSESAM(base, model, cfg.head_rho, cfg.tail_rho, cfg.gamma, cfg.epochs)
    return base


def lr_at(epoch: int, cfg: Config) -> float:
    """Cosine to 0, stepped before each epoch as the official code does: lr * (1 + cos(pi (e+1) / T)) / 2.
    So the last epoch trains at lr 0 and only refreshes BN statistics."""
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch + 1) / cfg.epochs))


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
# Training
# =============================================================================================

def resolve_device(cfg: Config) -> torch.device:
    if cfg.gpu is not None:
        if not torch.cuda.is_available():
            print(f"warning: no CUDA on this machine; --gpu {cfg.gpu} ignored, running on the CPU",
                  file=sys.stderr)
            return torch.device("cpu")
        if not 0 <= cfg.gpu < torch.cuda.device_count():
            raise UsageError(f"--gpu {cfg.gpu}: no such GPU ({torch.cuda.device_count()} visible)")
        return torch.device("cuda", cfg.gpu)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise UsageError(f"--device {cfg.device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not (torch.cuda.is_available()
                                   and (dev.index or 0) < torch.cuda.device_count()):
        raise UsageError(f"--device {cfg.device}: no such CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {cfg.device!r}: expected auto, cpu, cuda or cuda:N")
    return dev


def _fmt(v):
    return "  -- " if v is None else f"{v:5.1f}"


# --- The rolling checkpoint: everything the next epoch depends on, so a run continues bit for bit

CKPT_FORMAT = "ssesam-minimal last.pt 1"
# settings a --resume may change: where the run happens and how often it reports, not what it computes
RUN_ONLY = ("data_dir", "gpu", "device", "print_freq", "test_batch_size", "out", "save_every", "resume",
            "bench")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived (raised by the handler main() installs)."""

    def __init__(self, signum):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class Diverged(Exception):
    """The training loss turned non-finite."""


def _on_signal(signum, frame):
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the checkpoint write short
    raise Interrupted(signum)


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


def _checkpoint(cfg, epoch, model, opt, criterion, history, best, seconds, device):
    """last.pt's content after `epoch` finished epochs. Its tensors share memory with the live ones."""
    base = opt.optimizer if isinstance(opt, _Climb) else opt
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "format": CKPT_FORMAT, "config": dataclasses.asdict(cfg), "epoch": epoch,
        "model": model.state_dict(),          # weights and BN running statistics
        "optimizer": base.state_dict(),       # SGD momentum buffers
        "criterion": criterion.state_dict(),  # DRW class weights
        "ssesam": ({"k": opt.k, "head_rho": opt.head_rho, "tail_rho": opt.tail_rho}
                   if isinstance(opt, SSESAM) else None),  # the stage counter, and the rho it implies
        "rng": {"torch": torch.get_rng_state(),
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                          float(gauss)],
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        "history": history, "best": best, "seconds": seconds,
    }


def _restore(ckpt, model, opt, criterion, device):
    model.load_state_dict(ckpt["model"])
    (opt.optimizer if isinstance(opt, _Climb) else opt).load_state_dict(ckpt["optimizer"])
    criterion.load_state_dict(ckpt["criterion"])
    if isinstance(opt, SSESAM):
        opt.k = ckpt["ssesam"]["k"]
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


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


def train(cfg: Config, data, device, log=print, ckpt_path=None, resume=None):
    """Train per cfg on (x, y, x_test, y_test, counts, n_max); returns (model, summary dict).
    ckpt_path: keep the rolling checkpoint there; resume: a checkpoint (dict) to continue from."""
    x, y, x_test, y_test, counts, n_max = data
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    amp = device.type == "cuda"  # bf16 autocast on CUDA; fp32 weights and optimizer maths
    if amp:
        torch.backends.cudnn.benchmark = True
    # channels_last stores (N, C, H, W) as N, H, W, C, the layout the convolution kernels prefer on
    # CUDA and on the CPU alike (README.md, Speed, has the measured gain); the maths is the same
    fmt = torch.channels_last
    model, criterion = make_model_and_criterion(cfg, counts, device, fmt)
    opt = make_optimizer(cfg, model)
    step = STEPS[cfg.opt]
    is_tail = torch.tensor([n < cfg.eta for n in counts], device=device)  # tail iff n_c < eta
    x_pad = F.pad(x, (PAD,) * 4).to(device)   # (N, 3, 40, 40) uint8, zero padding as RandomCrop's
    y, x_test, y_test = y.to(device), x_test.to(device), y_test.to(device)
    N, B = len(y), cfg.batch_size
    n_steps = math.ceil(N / B)
    n_params = sum(p.numel() for p in model.parameters())
    history, best, done, seconds = [], None, 0, 0.0
    if resume is not None:  # after the model's init, which draws from the RNG the checkpoint restores
        try:
            _restore(resume, model, opt, criterion, device)
            history, best, done, seconds = (resume["history"], resume["best"], resume["epoch"],
                                            resume["seconds"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise UsageError(f"{ckpt_path} does not fit this run ({type(e).__name__}); delete it to "
                             f"start afresh")
    t_start = time.time() - seconds
    log(f"{cfg.dataset} IF {cfg.imb_factor:g}: {N} train images, {len(counts)} classes, "
        f"{int(is_tail.sum())} tail (n < {cfg.eta}); {cfg.arch} "
        f"{n_params / 1e6:.2f} M params; {cfg.opt} + {cfg.loss}; "
        f"device {device}" + (f"; resumed after epoch {done}" if done else ""))
    pending, saved = None, done  # pending: the newest finished epoch's checkpoint, not yet on disk
    between = done or None  # set while the live state is exactly that of the epoch just finished
    try:
        for epoch in range(done, cfg.epochs):
            between = None
            t0 = time.time()
            lr = lr_at(epoch, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            if cfg.drw_epoch is not None:
                criterion.set_drw(epoch >= cfg.drw_epoch)
            if cfg.opt == "ssesam":
                rho_h, rho_t = opt.head_rho, opt.tail_rho
            else:  # SAM perturbs the whole batch, ImbSAM the tail only
                rho_h, rho_t = {"sgd": (0.0, 0.0), "sam": (cfg.rho, cfg.rho), "imbsam": (0.0, cfg.rho)}[cfg.opt]
            xs, ys = shuffled_epoch(x_pad, y, fmt)  # the whole epoch at once, on the device
            # metrics stay on the device, read once per epoch: no host-device sync per step
            step_loss = torch.zeros(n_steps, device=device)  # per-step loss sums
            correct = torch.zeros((), device=device)
            model.train()
            for s, i in enumerate(range(0, N, B)):
                xb, yb = xs[i:i + B], ys[i:i + B]
                logits, loss_i = step(model, criterion, opt, xb, yb, is_tail[yb], cfg.imbsam_weight)
                step_loss[s] = loss_i.sum()
                correct += (logits.argmax(1) == yb).sum()
            if cfg.opt == "ssesam":
                opt.update_rho()
            loss, train_acc = step_loss.sum().item() / N, correct.item() / N * 100
            if not math.isfinite(loss):  # this epoch's weights are not kept: last.pt stays as it is
                bad = (~torch.isfinite(step_loss)).nonzero()
                where = f"step {int(bad[0]) + 1} of {n_steps}" if len(bad) else "its loss sum overflowed"
                raise Diverged(f"non-finite training loss at epoch {epoch + 1}, {where} (lr {lr:.3g})")
            row = {"epoch": epoch + 1, "lr": lr, "rho_head": rho_h, "rho_tail": rho_t, "loss": loss,
                   "train_acc": train_acc}
            last = epoch == cfg.epochs - 1
            if (epoch + 1) % cfg.print_freq == 0 or last:
                row.update(evaluate(model, x_test, y_test, counts, n_max, cfg.test_batch_size, amp))
                if best is None or row["avg"] > best["avg"]:
                    best = row
            row["seconds"] = time.time() - t0
            history.append(row)
            between = epoch + 1
            eta_s = (time.time() - t_start) / (epoch + 1) * (cfg.epochs - epoch - 1)
            test = (f"test avg {_fmt(row['avg'])} many {_fmt(row['many'])} med {_fmt(row['med'])} "
                    f"few {_fmt(row['few'])}" if "avg" in row else "test  --")
            log(f"epoch {epoch + 1:3d}/{cfg.epochs} lr {lr:.5f} rho_h {rho_h:.3f} rho_t {rho_t:.3f} "
                f"loss {loss:.4f} train {train_acc:5.1f} | {test} | {row['seconds']:.1f}s "
                f"eta {eta_s / 60:.1f}m")
            if ckpt_path is not None:
                pending = _checkpoint(cfg, epoch + 1, model, opt, criterion, history, best,
                                      time.time() - t_start, device)
                if (epoch + 1) % cfg.save_every == 0 or last:
                    _atomic_write(ckpt_path, pending)
                    pending, saved = None, epoch + 1
                else:  # keep a copy: training goes on in the tensors the checkpoint points at
                    pending = copy.deepcopy(pending)
    except (Interrupted, Diverged) as e:
        if ckpt_path is not None and between is not None and between > saved:  # stopped between
            pending = _checkpoint(cfg, between, model, opt, criterion, history, best,  # epochs
                                  time.time() - t_start, device)
        if pending is not None:  # the newest finished epoch, not yet on disk
            _atomic_write(ckpt_path, pending)
            saved = pending["epoch"]
        if ckpt_path is None:
            note = "nothing saved (no --out)"
        elif saved == 0:
            note = "no epoch finished, nothing saved"
        else:
            note = f"{ckpt_path} holds epoch {saved} of {cfg.epochs}; continue with --resume"
        where = ""
        if isinstance(e, Interrupted):  # between two epochs, or inside one
            where = f" after epoch {between}" if between is not None else f" during epoch {len(history) + 1}"
        e.args = (f"{e}{where}; {note}",)
        raise
    final = history[-1]
    keys = ("epoch", "avg", "many", "med", "few", "avg_tta", "many_tta", "med_tta", "few_tta")
    summary = {
        "config": dataclasses.asdict(cfg),
        "final": {k: final[k] for k in keys},
        "best": {k: best[k] for k in keys},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "params": n_params,
        "seconds": time.time() - t_start,
        "history": history,
    }
    return model, summary


# =============================================================================================
# Benchmark (--bench): the cost of one training step and of one epoch of augmentation
# =============================================================================================
#
# Each optimizer's step and, as the baseline, the official SSE-SAM step run on copies of one
# network and on one batch of random images whose labels follow the long-tailed counts (so the
# head/tail split is the real one). No data set is read.

class OfficialSSESAM:
    """BASELINE for --bench only, never used for training: the official SSESAM's bookkeeping. A
    Python loop over the parameters for every operation; eps and the gradient sum kept per
    parameter and made anew every step; w restored by subtracting eps; zero_grad() drops every
    .grad, so each backward allocates new ones. Same update as SSESAM up to rounding (tested)."""

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


class PILImages(torch.utils.data.Dataset):
    """The official data path: uint8 HWC arrays, each made a PIL image, then transformed."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(torchvision.transforms.functional.to_pil_image(self.x[i])), self.y[i]


def bench(cfg: Config, counts, device, repeats=5, steps=3, log=print) -> dict:
    """Time and count one step of each optimizer and of the official baseline, and one epoch of
    augmentation against the official DataLoader; print the table, return its rows. Times are
    medians over `repeats` rounds; each round runs every row in turn (`steps` steps, or one
    epoch), so that background load hits all rows alike."""
    torch.manual_seed(cfg.seed)
    amp = device.type == "cuda"  # ours as in train(): channels_last, and bf16 autocast on CUDA
    if amp:
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last
    y_all = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))  # (N,)
    x_all = torch.randint(0, 256, (len(y_all), 3, 32, 32), dtype=torch.uint8)        # (N, 3, 32, 32)
    pick = torch.randperm(len(y_all))[:cfg.batch_size]
    x, y = normalize(x_all[pick]).to(device), y_all[pick].to(device)
    tail = torch.tensor([n < cfg.eta for n in counts], device=device)[y]
    model0, criterion = make_model_and_criterion(cfg, counts, device)  # copied for every row

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
        opt_name, xf = name.split()[0], x.contiguous(memory_format=layout)
        opt = make_optimizer(dataclasses.replace(cfg, opt=opt_name), model)
        for _ in range(opt.cut if name.endswith("after the switch") else 0):
            opt.update_rho()
        return model, lambda: STEPS[opt_name](model, criterion, opt, xf, y, tail, cfg.imbsam_weight)

    rows, fns = {}, {}
    for name in ("sgd", "sam", "imbsam", "ssesam before the switch", "ssesam after the switch",
                 "ssesam before the switch, contiguous", "official ssesam"):
        model, fns[name] = make(name)
        for _ in range(2):  # warm-up: momentum buffers, allocator, cudnn autotuning
            fns[name]()
        f, b, ops, own = count_step(fns[name], model, criterion)
        rows[name] = {"passes": f"{f}F+{b}B", "forwards": f, "backwards": b, "ops": ops, "own_ops": own}
    # one epoch of augmentation: ours (whole epoch at once, on the device) against a DataLoader of
    # PIL images with the official transforms, batch size and number of workers
    workers, tf = (os.cpu_count() or 1) // 4, torchvision.transforms
    official_tf = tf.Compose([tf.RandomCrop(32, padding=PAD), tf.RandomHorizontalFlip(), tf.ToTensor(),
                              tf.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(PILImages(x_all, y_all, official_tf), batch_size=cfg.batch_size,
                                         shuffle=True, num_workers=workers)
    x_pad, y_dev = F.pad(x_all, (PAD,) * 4).to(device), y_all.to(device)
    fns["augmentation, ours"] = lambda: shuffled_epoch(x_pad, y_dev, fmt)
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
    log("| step | ms/step | spread | passes | aten ops | outside F/B | time / official "
        "| ops / official | outside F/B / official |\n" + "|---" * 9 + "|")
    for name, r in rows.items():
        if "passes" in r:
            log(f"| {name} | {r['median_ms']:.1f} | {r['spread']:.0%} | {r['passes']} | {r['ops']} "
                f"| {r['own_ops']} | {r['median_ms'] / ref['median_ms']:.3f} "
                f"| {r['ops'] / ref['ops']:.3f} | {r['own_ops'] / ref['own_ops']:.3f} |")
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

def _prepare_out(cfg: Config):
    """Check --out before any work; return the checkpoint that --resume continues, else None."""
    if cfg.out is None:
        return None
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} exists and is not a folder")
    if cfg.bench:  # writes bench.json only
        return None
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
    """The CLI: parse, check, load, train, report, write --out. Returns the summary dict (with
    --bench: the benchmark's, and nothing is trained).
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
        resume = _prepare_out(cfg)
        if cfg.bench:  # no training: the step costs, on random images
            result = bench(cfg, data_counts(cfg)[0], device)
            if cfg.out is not None:
                os.makedirs(cfg.out, exist_ok=True)
                _atomic_write(os.path.join(cfg.out, "bench.json"), json.dumps(result, indent=2))
            return result
        data = load_data(cfg)
        if cfg.out is not None:
            os.makedirs(cfg.out, exist_ok=True)
        ckpt_path = None if cfg.out is None else os.path.join(cfg.out, "last.pt")
        model, summary = train(cfg, data, device, ckpt_path=ckpt_path, resume=resume)
    except UsageError as e:
        print(f"ssesam_minimal.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except Interrupted as e:
        print(f"ssesam_minimal.py: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum)
    except Diverged as e:
        print(f"ssesam_minimal.py: {e}", file=sys.stderr)
        raise SystemExit(1)
    finally:
        if in_main_thread:
            for s, h in handlers.items():
                signal.signal(s, h)
    history = summary.pop("history")
    f, b = summary["final"], summary["best"]
    print(f"final (epoch {f['epoch']}): avg {_fmt(f['avg'])} many {_fmt(f['many'])} med {_fmt(f['med'])} "
          f"few {_fmt(f['few'])} | flip-TTA avg {_fmt(f['avg_tta'])} many {_fmt(f['many_tta'])} "
          f"med {_fmt(f['med_tta'])} few {_fmt(f['few_tta'])}")
    print(f"best on the test set (epoch {b['epoch']}, chosen on the test set, optimistic): "
          f"avg {_fmt(b['avg'])} | flip-TTA avg {_fmt(b['avg_tta'])}")
    print(f"{summary['seconds']:.1f}s on {summary['device_name']}")
    if cfg.out is not None:  # each file whole or not at all
        rows = "".join(json.dumps(row) + "\n" for row in history if "avg" in row)
        _atomic_write(os.path.join(cfg.out, "metrics.jsonl"), rows)
        _atomic_write(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=2))
        _atomic_write(os.path.join(cfg.out, "model.pt"), model.state_dict())
    return summary


if __name__ == "__main__":
    main()
