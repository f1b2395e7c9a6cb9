"""Corrupted test sets: the 15 corruptions of Hendrycks & Dietterich (2019), batched on tensors.

``corrupt(images, name, severity, seed)`` turns a uint8 batch ``(N, C, H, W)`` (C = 1 or 3) into its
corrupted copy; ``corrupted_set(...)`` does the same through an on-disk cache so that every run of a study
reuses the generated sets. ``CORRUPTIONS`` maps the 15 names to their functions, ``GREY_CORRUPTIONS`` is the
subset used for grey images (Fashion-MNIST) and ``corruptions_for(dataset_or_shape)`` picks between them.

Implementation. The reference code (``make_cifar_c.py`` and ``make_imagenet_c.py`` in hendrycks/robustness)
works one PIL image at a time with scikit-image, OpenCV, ImageMagick (Wand) and scipy. The maintained
package (``imagecorruptions`` and its fork) follows it but has only the ImageNet parameters, needs
scikit-image, numba and OpenCV, and still works image by image. So the corruptions are re-implemented here
as batched torch operations that follow the reference formulas step by step (same parameters, same
clipping, same uint8 truncation of the result, same per-image random draws), and ``tests/test_corruptions.py``
checks them against the reference formulas written with numpy/scipy/PIL/OpenCV on sample images:
- the reference's per-pixel loops become batched ops: glass blur's sequential pixel swaps run once per
  pixel position for the whole batch; ImageMagick's motion blur (also used by snow) is the same one-sided
  Gaussian line kernel, gathered per image; scikit-image/scipy Gaussian filters, OpenCV's disk kernel and
  affine warp, scipy's zoom and map_coordinates and PIL's BOX resize are separable convolutions,
  ``interpolate`` and ``grid_sample`` with the reference's border modes.
- JPEG goes through libjpeg at the published qualities (torchvision's batched encode/decode, which
  gives PIL's bytes; PIL where torchvision lacks it).

Parameters. Images smaller than 128 px use the CIFAR-10-C table (published for 32 px), larger ones the
ImageNet-C table (published for 224 px). Parameters that are lengths in pixels (blur radii and sigmas,
glass blur's shuffle distance, motion and snow streak lengths, elastic displacement) are scaled by
``size / 32`` or ``size / 224``, so at 32 and 224 px they are exactly the published ones and at other sizes
(Fashion-MNIST's 28, folders' 256) a corruption covers the same fraction of the image. Relative parameters
(noise levels, zoom factors, pixelation, JPEG quality, contrast, brightness) are used as published.

Frost. The reference blends crops of six frost photographs (five of which are drawn). Those photographs
are not normlab's to ship, and nothing is downloaded at run time, so frost uses a procedural substitute:
a fractal (diamond-square) ice texture per image, tinted and scaled to the per-channel mean and
within-crop spread measured on crops of the five reference photographs at CIFAR scale
(``FROST_TEXTURES``), blended with the published weights. Its errors are not comparable with published
CIFAR-10-C frost numbers; ``SUBSTITUTES`` names it (with the reason) so reports can mark it or leave it
out of an mCE.

Randomness. A CPU ``torch.Generator`` seeded from ``(seed, name, severity)`` draws every random number
(different corruptions and severities never share noise), and images are processed in chunks of a size
that depends only on the image shape, so a set depends only on the images, the name, the severity and
the seed. ``corrupted_set`` always generates on the CPU; ``corrupt`` on a GPU draws the same numbers, but
its float arithmetic may round the odd pixel to the neighbouring grey level.
"""

from __future__ import annotations

import functools
import hashlib
import io as _io
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from normlab.errors import NormlabError
from normlab.io import cache_dir as _cache_root
from normlab.io import save_torch

# bump when any corruption's output changes: it is part of the cache key
CORRUPTIONS_VERSION = 2
SEVERITIES = (1, 2, 3, 4, 5)
# images below this size use the CIFAR-10-C table, the others ImageNet-C's
LARGE_SIZE = 128
# JPEG through torchvision's batched functions when it has them (else PIL; the bytes are the same)
USE_TORCHVISION_JPEG = True
# float elements per chunk of images (about 16 MB of float32 per intermediate)
CHUNK_ELEMENTS = 1 << 22

SUBSTITUTES: dict[str, str] = {
    "frost": "procedural frost texture instead of the reference's frost photographs, which normlab cannot "
             "ship: not comparable with published CIFAR-10-C/ImageNet-C frost errors",
}

# per-channel RGB mean and within-crop standard deviation (0-255) of 32x32 crops of the five frost
# photographs the reference draws from (frost1.png ... frost5.jpg, resized by 0.2 as make_cifar_c.py does);
# the procedural texture is matched to these numbers (frost2 and frost3 are the same picture)
FROST_TEXTURES: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((76.9, 148.2, 164.7), (21.4, 13.1, 12.6)),
    ((198.1, 202.5, 211.8), (17.7, 18.1, 18.6)),
    ((198.1, 202.5, 211.8), (17.7, 18.1, 18.6)),
    ((142.7, 157.4, 170.1), (25.6, 25.6, 26.6)),
    ((102.4, 113.8, 125.5), (35.0, 34.6, 33.9)),
)
# spread of the crop means around a photograph's mean (the crops' position varies)
FROST_CROP_MEAN_STD = 12.0


# ------------------------------------------------------------------------------------------ parameters

# The published tables, severity 1..5. Pixel lengths are at the reference size (32 or 224) and scaled.
CIFAR = {
    "gaussian_noise": [0.04, 0.06, .08, .09, .10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [.01, .02, .03, .05, .07],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # radius (px), alias blur
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],  # sigma, delta (px), iters
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],  # radius, sigma (px)
    "zoom_blur": [(1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)],  # arange
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],  # strength, wibble decay
    "brightness": [.05, .1, .15, .2, .3],
    "contrast": [.75, .5, .4, .3, 0.15],
    # alpha, sigma, affine jitter as fractions of the image size (the reference writes IMSIZE * fraction)
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "jpeg_compression": [80, 65, 58, 50, 40],
}
_E = 244 / 224  # make_imagenet_c.py writes 244 * fraction for 224 px images ("should have been 224")
IMAGENET = {
    "gaussian_noise": [.08, .12, 0.18, 0.26, 0.38],
    "shot_noise": [60, 25, 12, 5, 3],
    "impulse_noise": [.03, .06, .09, 0.17, 0.27],
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
    "zoom_blur": [(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)],
    "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
    "fog": [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],
    "brightness": [.1, .2, .3, .4, .5],
    "contrast": [0.4, .3, .2, .1, .05],
    "elastic_transform": [(_E * 2, _E * 0.7, _E * 0.1), (_E * 2, _E * 0.08, _E * 0.2), (_E * 0.05, _E * 0.01, _E * 0.02),
                          (_E * 0.07, _E * 0.01, _E * 0.02), (_E * 0.12, _E * 0.01, _E * 0.02)],
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    "jpeg_compression": [25, 18, 15, 10, 7],
}
TABLES = {"cifar": (CIFAR, 32), "imagenet": (IMAGENET, 224)}


def table_for(size: int) -> str:
    """``"cifar"`` (published for 32 px) below ``LARGE_SIZE``, else ``"imagenet"`` (published for 224 px)."""
    return "cifar" if size < LARGE_SIZE else "imagenet"


def parameters(name: str, severity: int, size: int) -> tuple[Any, float]:
    """The published parameters of ``name`` at ``severity`` for images of ``size`` px, and the factor
    (``size`` / reference size) by which the corruption scales its pixel lengths."""
    _check(name, severity)
    table, ref = TABLES[table_for(size)]
    return table[name][severity - 1], size / ref


# ------------------------------------------------------------------------------------------ helpers

def _pad_index(n: int, pad: int, mode: str, device) -> torch.Tensor:
    """Indices of a 1-D axis of length ``n`` padded by ``pad`` on both sides.

    ``edge`` repeats the border pixel (scipy ``nearest``, OpenCV ``BORDER_REPLICATE``), ``symmetric``
    mirrors including it (scipy ``reflect``), ``reflect101`` mirrors about it (OpenCV's default border,
    scipy ``mirror``, torch ``reflect``); any pad length, as scipy does."""
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "symmetric":
        i = i % (2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if mode == "reflect101":
        if n == 1:
            return torch.zeros_like(i)
        i = i % (2 * n - 2)
        return torch.where(i >= n, 2 * n - 2 - i, i)
    raise ValueError(mode)


def _pad(x: torch.Tensor, pad_h: int, pad_w: int, mode: str) -> torch.Tensor:
    """Pad the last two dimensions (see ``_pad_index``): torch's own padding where it has the mode and the
    pad fits (faster than an index_select), index_select otherwise."""
    h, w = x.shape[-2:]
    if x.dim() == 4 and x.is_floating_point():
        if mode == "edge":
            return F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
        if mode == "reflect101" and pad_h < h and pad_w < w:
            return F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
        if mode == "symmetric" and pad_h <= h and pad_w <= w:
            if pad_h:
                x = torch.cat([x[..., :pad_h, :].flip(-2), x, x[..., h - pad_h:, :].flip(-2)], -2)
            if pad_w:
                x = torch.cat([x[..., :pad_w].flip(-1), x, x[..., w - pad_w:].flip(-1)], -1)
            return x
    x = x.index_select(-2, _pad_index(h, pad_h, mode, x.device)) if pad_h else x
    return x.index_select(-1, _pad_index(w, pad_w, mode, x.device)) if pad_w else x


def _gauss1d(sigma: float, radius: int) -> torch.Tensor:
    """scipy.ndimage's Gaussian kernel: exp(-x^2 / 2 sigma^2) on [-radius, radius], normalised."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return torch.from_numpy(k / k.sum())


def _sep_conv(x: torch.Tensor, kh: torch.Tensor, kw: torch.Tensor, mode: str) -> torch.Tensor:
    """Separable correlation of every (image, channel) plane with ``kh`` (rows) then ``kw`` (columns), as
    weighted sums of shifted slices: for the few taps used here that is faster on the CPU
    than ``conv2d`` over one-channel planes."""
    h, w = x.shape[-2:]
    ph, pw = len(kh) // 2, len(kw) // 2
    xp = _pad(x, ph, pw, mode)
    kh, kw = kh.tolist(), kw.tolist()
    y = xp[..., 0:h, :] * kh[0]
    for i in range(1, len(kh)):
        y.add_(xp[..., i:i + h, :], alpha=kh[i])
    out = y[..., :, 0:w] * kw[0]
    for j in range(1, len(kw)):
        out.add_(y[..., :, j:j + w], alpha=kw[j])
    return out


def _gaussian(x: torch.Tensor, sigma: float, mode: str = "edge", truncate: float = 4.0) -> torch.Tensor:
    """``skimage.filters.gaussian`` / ``scipy.ndimage.gaussian_filter`` over H and W (per channel):
    radius ``int(truncate * sigma + 0.5)``; scikit-image's default border is scipy's ``nearest``."""
    radius = int(truncate * float(sigma) + 0.5)
    if sigma <= 0 or radius == 0:
        return x
    k = _gauss1d(sigma, radius)
    return _sep_conv(x, k, k, mode)


def _zoom_centre(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The reference's ``clipped_zoom``: crop the centre ``ceil(size / factor)``, scipy ``zoom(order=1)``
    (bilinear on pixel corners, output ``round(crop * factor)``), trim back to the centre ``size``."""
    h, w = x.shape[-2:]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    oh, ow = int(round(ch * factor)), int(round(cw * factor))
    if (oh, ow) != (ch, cw):
        crop = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True)
    t, l = (oh - h) // 2, (ow - w) // 2
    return crop[..., t:t + h, l:l + w]


def _grey(x: torch.Tensor) -> torch.Tensor:
    """OpenCV's RGB2GRAY weights (a grey image is its own grey)."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _uniform(gen: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low


def _motion_offsets(width: int, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageMagick's MotionBlurImage offsets: sample ``i`` of the kernel is read at
    ``(ceil(i cos a - 0.5), ceil(i sin a - 0.5))`` pixels (x, y) from the output pixel."""
    i = torch.arange(width, dtype=torch.float64)
    a = torch.deg2rad(angle.double())[:, None]
    ox = torch.ceil(i * torch.cos(a) - 0.5).long()
    oy = torch.ceil(i * torch.sin(a) - 0.5).long()
    return ox, oy


def _motion_blur(x: torch.Tensor, radius: float, sigma: float, angle: torch.Tensor) -> torch.Tensor:
    """ImageMagick's ``MotionBlurImage(radius, sigma, angle)`` (what the reference calls through Wand) on
    a batch, one angle per image: a one-sided Gaussian line kernel of ``2 ceil(radius) + 1`` taps,
    ``exp(-i^2 / 2 sigma^2)`` normalised, with the edge pixel repeated outside the image."""
    n, c, h, w = x.shape
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i * i) / (2 * sigma * sigma))
    k = (k / k.sum()).tolist()
    # Images sorted by angle: for each tap, the images sharing an offset form contiguous runs, and each
    # run is one weighted slice of the padded batch (no per-pixel gather).
    order = torch.argsort(angle.cpu())
    ox, oy = _motion_offsets(width, angle.cpu()[order])  # (n, width) each
    pad = min(width, max(int(ox.abs().max()), int(oy.abs().max())))
    xs = x.index_select(0, order.to(x.device))
    xp = _pad(xs, pad, pad, "edge")
    out = torch.zeros_like(xs)
    for t in range(width):
        pair = torch.stack([ox[:, t], oy[:, t]], 1)
        change = torch.ones(n, dtype=torch.bool)
        change[1:] = (pair[1:] != pair[:-1]).any(1)
        starts = torch.nonzero(change).flatten().tolist() + [n]
        for lo, hi in zip(starts[:-1], starts[1:]):
            dx, dy = int(ox[lo, t]) + pad, int(oy[lo, t]) + pad
            out[lo:hi].add_(xp[lo:hi, :, dy:dy + h, dx:dx + w], alpha=k[t])
    return out.index_select(0, torch.argsort(order).to(x.device))


def _plasma(n: int, mapsize: int, wibbledecay: float, gen: torch.Generator) -> torch.Tensor:
    """The reference's ``plasma_fractal`` (diamond-square) for ``n`` maps at once, values in [0, 1]."""
    assert mapsize & (mapsize - 1) == 0
    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float64)
    stepsize = mapsize
    wibble = 100.0

    def wibbled(a):
        return a / 4 + wibble * _uniform(gen, a.shape, -wibble, wibble)

    while stepsize >= 2:
        half = stepsize // 2
        corner = m[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        sq = corner + torch.roll(corner, -1, 1)
        sq = sq + torch.roll(sq, -1, 2)
        m[:, half:mapsize:stepsize, half:mapsize:stepsize] = wibbled(sq)
        dr = m[:, half:mapsize:stepsize, half:mapsize:stepsize]
        ul = m[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        lt = dr + torch.roll(dr, 1, 1) + ul + torch.roll(ul, -1, 2)
        m[:, 0:mapsize:stepsize, half:mapsize:stepsize] = wibbled(lt)
        tt = dr + torch.roll(dr, 1, 2) + ul + torch.roll(ul, -1, 1)
        m[:, half:mapsize:stepsize, 0:mapsize:stepsize] = wibbled(tt)
        stepsize //= 2
        wibble /= wibbledecay
    flat = m.view(n, -1)
    flat -= flat.min(1, keepdim=True).values
    flat /= flat.max(1, keepdim=True).values
    return m


def _next_pow2(v: int) -> int:
    return 1 if v <= 1 else 2 ** (v - 1).bit_length()


# --------------------------------------------------------------------------------------- corruptions
# Each takes x: float32 (N, C, H, W) in [0, 1] (on any device), the parameters, the pixel scale and a CPU
# generator, and returns float values in 0..255 that are truncated to uint8 like the reference's np.uint8.

def gaussian_noise(x, c, scale, gen):
    """x + N(0, c), clipped."""
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device)
    return (x + c * noise).clamp(0, 1) * 255


def shot_noise(x, c, scale, gen):
    """Poisson(x c) / c, clipped."""
    rate = (x * c).double().cpu()
    return (torch.poisson(rate, generator=gen) / c).to(x).clamp(0, 1) * 255


def impulse_noise(x, c, scale, gen):
    """scikit-image's salt & pepper (``amount`` c): each value (channel by channel) is flipped with
    probability c, to 1 or 0 with equal chance."""
    flip = (torch.rand(x.shape, generator=gen) <= c).to(x.device)
    salt = (torch.rand(x.shape, generator=gen) <= 0.5).to(x.device)
    x = torch.where(flip & salt, torch.ones_like(x), x)
    x = torch.where(flip & ~salt, torch.zeros_like(x), x)
    return x * 255


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's ``disk``: the aliased disk ``X^2 + Y^2 <= r^2`` on [-8, 8] (larger radii: [-r, r]),
    normalised, then OpenCV's ``GaussianBlur`` (3x3, or 5x5 above radius 8; sigma ``alias_blur``, border
    reflect-101)."""
    if radius <= 8:
        L, ksize = np.arange(-8, 8 + 1), 3
    else:
        L, ksize = np.arange(-radius, radius + 1), 5
    X, Y = np.meshgrid(L, L)
    d = np.array((X ** 2 + Y ** 2) <= radius ** 2, dtype=np.float64)
    d /= d.sum()
    r = ksize // 2
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / alias_blur) ** 2)
    g /= g.sum()
    idx = _pad_index(len(d), r, "reflect101", "cpu").numpy()
    p = d[np.ix_(idx, idx)]
    out = np.zeros_like(d)
    for a in range(ksize):
        for b in range(ksize):
            out += g[a] * g[b] * p[a:a + len(d), b:b + len(d)]
    return out


def defocus_blur(x, c, scale, gen):
    """Correlation with the anti-aliased disk (OpenCV ``filter2D``, border reflect-101)."""
    k = disk_kernel(c[0] * scale, c[1])
    nz = np.argwhere(np.abs(k) > 0)
    r = int(np.abs(nz - len(k) // 2).max()) if len(nz) else 0
    mid = len(k) // 2
    k = k[mid - r:mid + r + 1, mid - r:mid + r + 1]
    h, w = x.shape[-2:]
    xp = _pad(x, r, r, "reflect101")
    out = torch.zeros_like(x)
    for a, b in zip(*np.nonzero(k)):  # weighted shifted slices (see _sep_conv)
        out.add_(xp[..., a:a + h, b:b + w], alpha=float(k[a, b]))
    return out.clamp(0, 1) * 255


def glass_blur(x, c, scale, gen):
    """Gaussian blur, truncation to uint8, local pixel shuffling, Gaussian blur again.

    The shuffle is the reference's: for each iteration, positions (h, w) from the bottom-right corner
    (``size - delta`` down to ``delta + 1``) in row-major order take the pixel at (h + dy, w + dx), dx and
    dy drawn from ``randint(-delta, delta)`` (high exclusive, as numpy's). The reference writes it as a
    swap, ``x[h, w], x[h', w'] = x[h', w'], x[h, w]``, but on a colour image numpy's right-hand side holds
    views, so (h, w) receives the neighbour and the neighbour keeps its value: CIFAR-10-C and ImageNet-C
    were made with this copy, and normlab does the same; on a grey image the elements are scalars and the
    reference really swaps, and so does normlab. Where a step can read a pixel an earlier step wrote
    (swaps, or shuffle distances above 1), the steps run one after another, each on the whole batch;
    otherwise an iteration is one gather (``GLASS_PARALLEL``)."""
    sigma, delta, iters = c[0] * scale, max(1, int(round(c[1] * scale))), c[2]
    x = torch.floor(_gaussian(x, sigma) * 255 + 1e-4)  # np.uint8(gaussian(...) * 255)
    n, ch, h, w = x.shape
    hs = range(h - delta, delta, -1)
    ws = range(w - delta, delta, -1)
    steps = len(hs) * len(ws)
    if steps:
        d = torch.randint(-delta, delta, (iters, steps, n, 2), generator=gen).to(x.device)
        swap = ch == 1
        if not swap and delta == 1 and GLASS_PARALLEL:
            x = _glass_copy_parallel(x, d, hs, ws)
        else:
            x = _glass_sequential(x, d, hs, ws, swap)
    return _gaussian(x.contiguous() / 255, sigma).clamp(0, 1) * 255


# With copies (colour) and delta 1 the offsets are -1 or 0, so every step reads a position that comes
# later in the reference's descending scan (or itself): nothing it reads has been written yet in this
# iteration, and an iteration is one gather. The tests check it against the sequential loop.
GLASS_PARALLEL = True


def _glass_copy_parallel(x, d, hs, ws):
    n, ch, h, w = x.shape
    hh = torch.tensor(list(hs), device=x.device)[:, None].expand(len(hs), len(ws)).reshape(-1)
    ww = torch.tensor(list(ws), device=x.device)[None, :].expand(len(hs), len(ws)).reshape(-1)
    pos = hh * w + ww  # the steps' positions in scan order
    for it in range(d.shape[0]):
        flat = x.reshape(n, ch, h * w)
        src = pos[None, :] + d[it, :, :, 1].T * w + d[it, :, :, 0].T  # (n, steps)
        new = flat.clone()
        new[:, :, pos] = flat.gather(2, src[:, None, :].expand(n, ch, -1))
        x = new.view(n, ch, h, w)
    return x


def _glass_sequential(x, d, hs, ws, swap):
    """The reference's loop, one step per position for the whole batch: one row per (position, image),
    so a position's n pixels are contiguous and a neighbour is a row index."""
    n, ch, h, w = x.shape
    rows = x.permute(2, 3, 0, 1).reshape(h * w * n, ch).contiguous()
    ar = torch.arange(n, device=x.device)
    pos = torch.tensor([hh * w + ww for hh in hs for ww in ws], device=x.device)
    for it in range(d.shape[0]):
        nb = (pos[:, None] + d[it, :, :, 1] * w + d[it, :, :, 0]) * n + ar  # neighbour rows (steps, n)
        for s, a in enumerate(pos.tolist()):
            lo, idx = a * n, nb[s]
            if swap:
                va = rows[lo:lo + n].clone()
                rows[lo:lo + n] = rows.index_select(0, idx)
                rows.index_copy_(0, idx, va)
            else:
                rows[lo:lo + n] = rows.index_select(0, idx)
    return rows.view(h, w, n, ch).permute(2, 3, 0, 1)


def motion_blur(x, c, scale, gen):
    """ImageMagick's motion blur at a random angle in [-45, 45) degrees; ImageMagick writes 8-bit
    pixels, so the result is rounded."""
    angle = _uniform(gen, (x.shape[0],), -45, 45)
    y = _motion_blur(x * 255, c[0] * scale, c[1] * scale, angle)
    return torch.round(y).clamp(0, 255)


def _zoom_matrix(n: int, factor: float) -> torch.Tensor:
    """``_zoom_centre`` along one axis of length ``n`` as an (n, n) matrix (float64): crop, linear
    interpolation on pixel corners, trim."""
    ch = int(np.ceil(n / factor))
    top = (n - ch) // 2
    eye = torch.eye(n, dtype=torch.float64)[top:top + ch].T.unsqueeze(0)  # (1, n basis signals, ch)
    oh = int(round(ch * factor))
    if oh != ch:
        eye = F.interpolate(eye, size=oh, mode="linear", align_corners=True)
    t = (oh - n) // 2
    return eye[0, :, t:t + n].T.contiguous()  # (n out, n in)


# zoom blur of images up to this many pixels is one matrix product per image (the sum of the zooms is a
# fixed linear map of the image, (H W) x (H W)); larger images interpolate zoom by zoom
ZOOM_MATRIX_PIXELS = 1024


@functools.lru_cache(maxsize=16)
def _zoom_blur_matrix(h: int, w: int, factors: tuple[float, ...]) -> torch.Tensor:
    m = torch.eye(h * w, dtype=torch.float64)
    for z in factors:
        m += torch.kron(_zoom_matrix(h, z), _zoom_matrix(w, z))
    return (m / (len(factors) + 1)).float()


def zoom_blur(x, c, scale, gen):
    """Mean of the image and its centre zooms by ``np.arange(*c)``."""
    factors = tuple(float(z) for z in np.arange(*c))
    n, ch, h, w = x.shape
    if h * w <= ZOOM_MATRIX_PIXELS:
        m = _zoom_blur_matrix(h, w, factors).to(x.device)
        return (x.reshape(n * ch, h * w) @ m.T).view(n, ch, h, w).clamp(0, 1) * 255
    out = x.clone()
    for z in factors:
        out += _zoom_centre(x, z)
    return (out / (len(factors) + 1)).clamp(0, 1) * 255


def snow(x, c, scale, gen):
    """A Gaussian snow layer, zoomed, thresholded, stored as 8 bits, motion-blurred at a random angle in
    [-135, -45) degrees; the image is brightened towards its grey and the layer and its 180-degree
    rotation are added."""
    n, ch, h, w = x.shape
    layer = (torch.randn((n, 1, h, w), generator=gen, dtype=torch.float32) * c[1] + c[0]).to(x.device)
    layer = _zoom_centre(layer, float(c[2]))
    layer = torch.where(layer < c[3], torch.zeros_like(layer), layer)
    layer = torch.floor(layer.clamp(0, 1) * 255 + 1e-4)
    angle = _uniform(gen, (n,), -135, -45)
    layer = torch.round(_motion_blur(layer, c[4] * scale, c[5] * scale, angle)).clamp(0, 255) / 255
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, _grey(x) * 1.5 + 0.5)
    return (x + layer + torch.rot90(layer, 2, (2, 3))).clamp(0, 1) * 255


def frost_texture(n: int, channels: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """The procedural stand-in for the reference's frost photographs, 0..255, (n, channels, h, w): a
    rough diamond-square fractal (fine ice structure) standardised and then tinted to the per-channel
    mean and spread of one of ``FROST_TEXTURES`` (drawn per image, like the reference draws a photograph),
    plus a random offset of the mean (the reference's random crop position)."""
    size = _next_pow2(max(h, w))
    tex = _plasma(n, size, 1.6, gen)[:, None, :h, :w].float()
    tex = (tex - tex.mean((2, 3), keepdim=True)) / tex.std((2, 3), keepdim=True).clamp_min(1e-6)
    pick = torch.randint(0, len(FROST_TEXTURES), (n,), generator=gen)
    mean = torch.tensor([t[0] for t in FROST_TEXTURES], dtype=torch.float32)[pick]  # (n, 3)
    std = torch.tensor([t[1] for t in FROST_TEXTURES], dtype=torch.float32)[pick]
    if channels == 1:  # grey images: OpenCV's grey of the tinted texture
        wts = torch.tensor([0.299, 0.587, 0.114])
        mean, std = (mean * wts).sum(1, keepdim=True), (std * wts).sum(1, keepdim=True)
    shift = torch.randn((n, 1), generator=gen) * FROST_CROP_MEAN_STD
    return (mean + shift)[:, :, None, None] + std[:, :, None, None] * tex


def frost(x, c, scale, gen):
    """``c0 x + c1 frost`` on 0..255 with the procedural texture (see ``SUBSTITUTES``)."""
    n, ch, h, w = x.shape
    tex = frost_texture(n, ch, h, w, gen).clamp(0, 255).to(x.device)
    return (c[0] * x * 255 + c[1] * tex).clamp(0, 255)


def fog(x, c, scale, gen):
    """A plasma fractal (map size: the next power of two of the image size) added with strength c0, then
    rescaled by ``max / (max + c0)`` with ``max`` the image's largest value."""
    n, ch, h, w = x.shape
    mx = x.reshape(n, -1).max(1).values.view(n, 1, 1, 1)
    p = _plasma(n, _next_pow2(max(h, w)), c[1], gen)[:, None, :h, :w].to(x)
    return ((x + c[0] * p) * mx / (mx + c[0])).clamp(0, 1) * 255


def brightness(x, c, scale, gen):
    """HSV value + c (clipped to 1), hue and saturation kept. With H and S fixed, RGB scales with V, so
    this is ``rgb * V' / V`` (and ``V'`` grey where V = 0), without the HSV round trip."""
    v = x.amax(1, keepdim=True)
    v2 = (v + c).clamp(max=1)
    y = torch.where(v > 0, x * (v2 / v.clamp_min(1e-12)), v2.expand_as(x))
    return y.clamp(0, 1) * 255


def contrast(x, c, scale, gen):
    """(x - mean) c + mean, with each image's per-channel mean."""
    m = x.mean((2, 3), keepdim=True)
    return ((x - m) * c + m).clamp(0, 1) * 255


def _warp(x: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, reflect: str) -> torch.Tensor:
    """Bilinear sampling of ``x`` at pixel coordinates (sx, sy) (each (N, H, W)); ``reflect101`` mirrors
    about the edge pixels (OpenCV's default border), ``symmetric`` about the image edge (scipy ``reflect``)."""
    h, w = x.shape[-2:]
    if reflect == "reflect101":
        gx, gy = 2 * sx / max(w - 1, 1) - 1, 2 * sy / max(h - 1, 1) - 1
        align = True
    else:
        gx, gy = (2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1
        align = False
    grid = torch.stack([gx, gy], -1).to(x)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=align)


def elastic_transform(x, c, scale, gen):
    """A random affine warp (the three points of OpenCV's getAffineTransform moved by up to c2; border
    reflect-101), then a displacement field of Gaussian-smoothed (sigma c1, truncate 3, border scipy
    ``reflect``) uniform noise times c0, sampled bilinearly (scipy ``map_coordinates(order=1,
    mode='reflect')``). c0..c2 are fractions of the image size."""
    n, ch, h, w = x.shape
    size = min(h, w)
    alpha, sigma, jitter = c[0] * size, c[1] * size, c[2] * size
    center = np.array([h // 2, w // 2], dtype=np.float64)  # np.float32(shape_size) // 2, used as (x, y)
    sq = size // 3
    pts1 = np.array([center + sq, [center[0] + sq, center[1] - sq], center - sq], dtype=np.float64)
    d = _uniform(gen, (n, 3, 2), -jitter, jitter).numpy().astype(np.float32).astype(np.float64)
    # the affine matrix mapping pts1 to pts2 = pts1 + d, then the inverse map (output pixel -> source)
    src = np.concatenate([pts1, np.ones((3, 1))], 1)  # (3, 3)
    pts2 = pts1[None] + d
    m = np.linalg.solve(src[None], pts2)  # (n, 3, 2): [x y 1] @ m = pts2
    a = np.transpose(m[:, :2, :], (0, 2, 1))  # (n, 2, 2) linear part, column vectors
    t = m[:, 2, :]  # (n, 2)
    ainv = torch.from_numpy(np.linalg.inv(a)).to(x.device, torch.float32)[:, :, :, None, None]
    t = torch.from_numpy(t).to(x.device, torch.float32)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float32),
                            torch.arange(w, device=x.device, dtype=torch.float32), indexing="ij")
    px, py = gx - t[:, 0, None, None], gy - t[:, 1, None, None]  # (n, h, w)
    x = _warp(x, ainv[:, 0, 0] * px + ainv[:, 0, 1] * py, ainv[:, 1, 0] * px + ainv[:, 1, 1] * py, "reflect101")
    noise = _uniform(gen, (n, 2, h, w), -1, 1).float().to(x.device)
    field = _gaussian(noise, sigma, mode="symmetric", truncate=3) * alpha
    dx, dy = field[:, 0], field[:, 1]
    y = _warp(x, gx + dx, gy + dy, "symmetric")
    return y.clamp(0, 1) * 255


def box_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """PIL's ``BOX`` resampling as an (n_out, n_in) matrix: Pillow's ``precompute_coeffs`` with the box
    filter (support 0.5, scaled by the reduction factor), normalised per output pixel."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    mat = np.zeros((n_out, n_in))
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        for j in range(xmin, xmax):
            u = (j - center + 0.5) / fscale
            mat[xx, j] = 1.0 if -0.5 < u <= 0.5 else 0.0
        s = mat[xx].sum()
        if s:
            mat[xx] /= s
    return torch.from_numpy(mat)


def _resize8(x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
    """PIL's two-pass 8-bit BOX resize of 0..255 values: horizontal pass, rounded to 8 bits, vertical
    pass, rounded (half up, as Pillow's fixed-point arithmetic does)."""
    h, w = x.shape[-2:]
    if ow != w:
        x = torch.floor(x @ box_resize_matrix(w, ow).to(x).T + 0.5).clamp(0, 255)
    if oh != h:
        x = torch.floor(box_resize_matrix(h, oh).to(x) @ x + 0.5).clamp(0, 255)
    return x


def pixelate(x, c, scale, gen):
    """PIL ``BOX`` resize to ``int(size c)`` and back."""
    h, w = x.shape[-2:]
    y = torch.round(x * 255)
    return _resize8(_resize8(y, int(h * c), int(w * c)), h, w)


def _jpeg_torchvision(u8: torch.Tensor, quality: int) -> torch.Tensor | None:
    """libjpeg through torchvision's list API (one C++ call per direction for the whole batch); None
    where this torchvision no longer has it (deprecated from 0.29 in favour of torchcodec)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import decode_jpeg, encode_jpeg

            return torch.stack(decode_jpeg(encode_jpeg(list(u8), quality=quality)))
    except (ImportError, AttributeError, RuntimeError):
        return None


def _jpeg_pil(u8: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    arr = u8.permute(0, 2, 3, 1).numpy()
    grey = arr.shape[-1] == 1
    out = np.empty_like(arr)
    for i, img in enumerate(arr):
        buf = _io.BytesIO()
        Image.fromarray(img[..., 0] if grey else img).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as dec:
            out[i] = np.asarray(dec).reshape(img.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def jpeg_compression(x, c, scale, gen):
    """JPEG at quality c with libjpeg's defaults (4:2:0 chroma subsampling for colour), as the reference's
    PIL ``save(..., quality=c)``: through torchvision's batched encode/decode (byte-identical to PIL's,
    checked in the tests, and faster at these sizes), PIL where torchvision lacks it."""
    u8 = torch.round(x * 255).clamp(0, 255).to(torch.uint8).cpu().contiguous()
    out = _jpeg_torchvision(u8, int(c)) if USE_TORCHVISION_JPEG else None
    if out is None:
        out = _jpeg_pil(u8, int(c))
    return out.to(x.device, torch.float32)


CORRUPTIONS: dict[str, Callable] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}

# Grey 28x28 product pictures on a black background (Fashion-MNIST): the weather corruptions imitate
# outdoor scenes seen through air or a window (snow's streaks and whitened scene, fog's haze, frost's ice
# photographs, here only a substitute texture) and have no counterpart in a product photograph; the other
# twelve (noise, blur, digital) apply to any image and are kept.
GREY_CORRUPTIONS: tuple[str, ...] = tuple(k for k in CORRUPTIONS if k not in ("snow", "frost", "fog"))

_GREY_DATASETS = {"fashion-mnist"}


def corruptions_for(dataset_or_shape: str | tuple[int, ...] | torch.Size) -> list[str]:
    """The corruption names for a data set (``"fashion-mnist"``, ``"cifar10"``, ``"folder"``) or an image
    shape (``(C, H, W)`` or ``(N, C, H, W)``): ``GREY_CORRUPTIONS`` for grey images, all 15 otherwise."""
    if isinstance(dataset_or_shape, str):
        grey = dataset_or_shape in _GREY_DATASETS
    else:
        shape = tuple(dataset_or_shape)
        if len(shape) not in (3, 4):
            raise NormlabError(f"corruptions: expected an image shape (C, H, W) or (N, C, H, W), got {shape}")
        grey = shape[-3] == 1
    return list(GREY_CORRUPTIONS if grey else CORRUPTIONS)


# ------------------------------------------------------------------------------------------- entry points

def _check(name: str, severity: int) -> None:
    if name not in CORRUPTIONS:
        raise NormlabError(f"unknown corruption {name!r}: use one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise NormlabError(f"corruption severity {severity!r} is not one of 1, 2, 3, 4, 5: pass an integer from 1 to 5")


def _check_images(images: Any) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] not in (1, 3):
        what = (f"a {images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                else type(images).__name__)
        raise NormlabError(f"corruptions need a uint8 tensor (N, C, H, W) with 1 or 3 channels, got {what}")


def _generator(name: str, severity: int, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"{int(seed)}:{name}:{int(severity)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def chunk_size(shape: tuple[int, ...]) -> int:
    """Images per chunk: depends only on the image shape, so results do not depend on the batch split."""
    return max(1, CHUNK_ELEMENTS // int(np.prod(shape[1:])))


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images`` (uint8, N x C x H x W, C = 1 or 3) corrupted by ``name`` at ``severity`` 1..5: a new uint8
    tensor of the same shape on the same device. Deterministic for ``seed``."""
    _check(name, severity)
    _check_images(images)
    n, ch, h, w = images.shape
    params, scale = parameters(name, int(severity), min(h, w))
    fn = CORRUPTIONS[name]
    gen = _generator(name, severity, seed)
    out = torch.empty_like(images)
    step = chunk_size(tuple(images.shape))
    for i in range(0, n, step):
        x = images[i:i + step].float() / 255
        y = fn(x, params, scale, gen)
        # np.uint8 truncates; the tiny offset keeps float32 rounding (254.99999) on the reference's side
        out[i:i + step] = torch.floor(y.clamp(0, 255) + 1e-4).clamp(0, 255).to(torch.uint8)
    return out


# ------------------------------------------------------------------------------------------------- cache

def fingerprint(images: torch.Tensor) -> str:
    """Content hash of a uint8 image tensor (shape and bytes): the cache key's data part. Compute it once
    and pass it to ``corrupted_set`` when generating many sets from the same images."""
    _check_images(images)
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def corrupted_path(key: str, name: str, severity: int, seed: int, cache_dir: str | Path | None = None) -> Path:
    """Where ``corrupted_set`` keeps one set: ``<cache>/corruptions/<name>-s<severity>-<hash>.pt``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root() / "corruptions"
    blob = f"v{CORRUPTIONS_VERSION}:{key}:{name}:{int(severity)}:{int(seed)}"
    return root / f"{name}-s{int(severity)}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.pt"


def corrupted_set(images: torch.Tensor, name: str, severity: int, seed: int = 0,
                  cache_dir: str | Path | None = None, key: str | None = None, cache: bool = True) -> torch.Tensor:
    """``corrupt(images, name, severity, seed)`` on the CPU, cached on disk.

    The cache lives in ``cache_dir`` (default ``$NORMLAB_CACHE/corruptions``, i.e.
    ``~/.cache/normlab/corruptions``), one uint8 tensor file per set, written atomically and loaded with
    ``weights_only=True``; the key is the images' content hash (``key``, from ``fingerprint``, computed
    here if not given), the name, severity, seed and ``CORRUPTIONS_VERSION``. A corrupt or mismatched file
    is regenerated with a warning; an unwritable cache only costs the reuse (a warning)."""
    _check(name, severity)
    _check_images(images)
    if not cache:
        return corrupt(images.cpu(), name, severity, seed)
    key = key or fingerprint(images)
    path = corrupted_path(key, name, severity, seed, cache_dir)
    if path.is_file():
        try:
            got = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(got, torch.Tensor) and got.dtype == torch.uint8 and got.shape == images.shape:
                return got
            problem = "has an unexpected layout"
        except Exception as exc:  # noqa: BLE001 - any unreadable cache file is regenerated
            problem = f"is unreadable ({type(exc).__name__})"
        _warn(f"corruption cache {path} {problem}; regenerating it")
    out = corrupt(images.cpu(), name, severity, seed)
    try:
        save_torch(path, out.contiguous())
    except OSError as exc:
        _warn(f"could not write the corruption cache {path} ({exc.strerror or exc}); set NORMLAB_CACHE to a "
              "writable folder so that other runs reuse the set")
    return out


def _warn(msg: str) -> None:
    warnings.warn_explicit(msg, UserWarning, filename="normlab", lineno=0, module="normlab.data")


__all__ = ["CORRUPTIONS", "GREY_CORRUPTIONS", "SEVERITIES", "SUBSTITUTES", "corrupt", "corrupted_set",
           "corruptions_for", "fingerprint", "parameters"]
