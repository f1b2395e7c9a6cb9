"""Per-image batch augmentation and normalisation, vectorised (no Python loop over images)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def draws_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Random draws made on a CPU generator, moved to the batch's device without a host synchronisation.

    A plain copy from pageable host memory makes the CPU wait for the GPU's queue (a sync in every step);
    a copy from pinned memory is queued like a kernel, and the caching host allocator keeps the pinned
    block alive until the copy has run."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per (statistics, dtype, device): building them per batch would be a host-to-device copy per step
    std64 = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std64)).to(dtype=dtype).view(-1, 1, 1)
    shift = (torch.tensor(mean, dtype=torch.float64) / std64).to(dtype=dtype).view(-1, 1, 1)
    return draws_to(scale, device), draws_to(shift, device)


def normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, as ``dtype``, on ``x``'s device, keeping its memory format.

    ``x`` is ``N x C x H x W`` or ``C x H x W`` (uint8 0..255, or float on the same 0..255 scale).
    """
    c = x_uint8.shape[-3]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"normalize: {c} channels but {len(mean)} means and {len(std)} stds")
    # one fused multiply-add: x * (1 / (255 std)) - mean / std; stats in float64 then cast
    scale, shift = _affine(tuple(map(float, mean)), tuple(map(float, std)), dtype, x_uint8.device)
    out = x_uint8.to(dtype)  # preserve_format: channels_last stays channels_last
    if out is x_uint8:
        out = out.clone(memory_format=torch.preserve_format)
    return out.mul_(scale).sub_(shift)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The "standard" augmentation, drawn independently for EACH image of the batch.

    Zero-pad by ``pad`` on every side, crop a random ``H x W`` window (offsets uniform in
    ``0..2*pad``), and flip horizontally with probability 1/2. ``x`` is ``N x C x H x W`` of any
    dtype on any device; the result has the same shape, dtype, device and memory format.

    Random numbers are drawn on ``generator``'s device (so a CPU generator can drive a CUDA batch)
    in a fixed order: row offsets (N), column offsets (N), flips (N) — the result is a pure function
    of the input and the generator state, and advances the generator by exactly that much.
    The crop is a single gather with per-image index arithmetic (no loop over images).
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects N x C x H x W, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    gdev = generator.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev)
    flip = torch.randint(0, 2, (n,), generator=generator, device=gdev).bool()
    if n == 0:
        return x.clone()
    dev = x.device
    dy, dx, flip = draws_to(torch.stack([dy, dx, flip.long()]), dev).unbind(0)
    flip = flip.bool()
    fmt = _memory_format(x)
    padded = F.pad(x.contiguous(), (pad, pad, pad, pad)) if pad > 0 else x.contiguous()
    hp, wp = h + 2 * pad, w + 2 * pad
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], (w - 1) - cols, cols) + dx[:, None]           # N x W
    rows = torch.arange(h, device=dev) + dy[:, None]                                 # N x H
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w)              # N x 1 x HW
    out = torch.gather(padded.view(n, c, hp * wp), 2, flat.expand(n, c, h * w))
    return out.view(n, c, h, w).contiguous(memory_format=fmt)

