"""`DataBundle`: the decoded splits of one data set, as uint8 tensors, plus statistics and provenance."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DataBundle:
    name: str  # "fashion-mnist" | "cifar10" | "folder"
    classes: list[str]
    train_x: torch.Tensor  # uint8, N x C x H x W (contiguous), C = 1 (Fashion-MNIST) or 3
    train_y: torch.Tensor  # int64, N
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    mean: tuple[float, ...]  # per-channel mean of train_x / 255 (train split, after hold-out/subset)
    std: tuple[float, ...]  # per-channel std of train_x / 255
    info: dict = field(default_factory=dict)  # provenance: source, cache file/hit, split, counts, skipped files

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def __repr__(self) -> str:  # never print the tensors
        test = "none" if self.test_x is None else len(self.test_x)
        return (f"DataBundle({self.name!r}, {self.num_classes} classes, {self.in_channels}x{self.image_size}x"
                f"{self.image_size}, train={len(self.train_x)}, val={len(self.val_x)}, test={test})")


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``x / 255`` for an ``N x C x H x W`` uint8 tensor,
    exact, from a 256-bin histogram per channel (fast, no float copy of the data)."""
    c = x.shape[1]
    if x.numel() == 0:
        return (0.0,) * c, (1.0,) * c
    if x.dtype != torch.uint8:
        x = x.clamp(0, 255).round().to(torch.uint8)
    hist = torch.stack([torch.bincount(x[:, i].reshape(-1), minlength=256) for i in range(c)]).to(torch.float64)
    v = torch.arange(256, dtype=torch.float64) / 255.0
    n = hist.sum(1)
    mean = (hist * v).sum(1) / n
    var = ((hist * (v - mean[:, None]).square()).sum(1) / n).clamp_min(0)
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel: avoid dividing by 0
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
