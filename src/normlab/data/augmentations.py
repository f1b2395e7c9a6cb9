"""The augmentation catalogue: batched, per-image random transforms on ``N x C x H x W`` tensors.

Every transform draws its own random parameters for EACH image of the batch from one
``torch.Generator`` (on the generator's device, in a fixed order), so the result is a pure function
of the input and the generator state; there is no Python loop over images. Inputs are uint8 (0..255)
or float on the same scale; the output has the input's shape, dtype and device.

=============  ===================================================================  ====================
name           what (per image)                                                     settings (default)
=============  ===================================================================  ====================
standard       ``augment_batch``: pad + random crop + horizontal flip               pad (4)
crop           zero-pad, crop a random H x W window                                 pad (4)
hflip          horizontal flip with probability p                                   p (0.5)
vflip          vertical flip with probability p                                     p (0.5)
rotation       rotate by an angle uniform in [-degrees, degrees] (bilinear, 0 fill)  degrees (15), p (1)
jitter         brightness, contrast, saturation factors uniform in [1-v, 1+v]       brightness, contrast,
                                                                                    saturation (0.4 each)
resized_crop   crop a box of area scale..1 and aspect 1/ratio..ratio, resize back   scale (0.5), ratio
                                                                                    (1.333)
cutout         zero a size x size square (fully inside the image), probability p    size (8), p (1)
blur           Gaussian blur, sigma uniform in [0.1, sigma], kernel x kernel         sigma (1.5), kernel (5)
saltpepper     each pixel set to 0 or 255 (all channels) with probability amount    amount (0.05)
mask           random block masking: block x block cells zeroed with probability p  p (0.3), block (4)
=============  ===================================================================  ====================

Configuration: ``--augment none | standard | crop,hflip,cutout`` (applied in the order given) and
``--augment-params cutout.size=8,rotation.degrees=15,mask.p=0.3,mask.block=4``. ``apply_augment``
is the single entry point of the training loop (``standard`` alone stays ``augment_batch`` there,
bit for bit).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from normlab.data.augment import augment_batch, draws_to
from normlab.errors import NormlabError

Params = dict[str, dict[str, float]]


# ----------------------------------------------------------------------------------------- helpers

def _draw(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, moved to ``device``."""
    return draws_to(torch.rand(shape, generator=g, device=g.device), device)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * _draw((n,), g, device)


def _randint(hi: torch.Tensor | int, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Integers uniform in 0..hi (inclusive), per image."""
    return torch.floor(_draw((n,), g, device) * (hi + 1)).long()


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if not x.is_floating_point() else x


def _back(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.is_floating_point():
        return y.to(like.dtype)
    return y.round().clamp_(0, 255).to(like.dtype)


def _sample(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of each image through its own 2 x 3 affine ``theta`` (zeros outside)."""
    xf = _float(x)
    grid = F.affine_grid(theta.to(xf.dtype), list(xf.shape), align_corners=False)
    return _back(F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False), x)


# ---------------------------------------------------------------------------------- the transforms

def standard(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    return augment_batch(x, g, pad=int(pad))


def crop(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop a random H x W window per image (one gather, as ``augment_batch``)."""
    n, c, h, w = x.shape
    pad = int(pad)
    dy = _randint(2 * pad, n, g, x.device)
    dx = _randint(2 * pad, n, g, x.device)
    if n == 0 or pad == 0:
        return x.clone()
    padded = F.pad(x.contiguous(), (pad, pad, pad, pad))
    wp = w + 2 * pad
    rows = torch.arange(h, device=x.device) + dy[:, None]
    cols = torch.arange(w, device=x.device) + dx[:, None]
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w)
    return torch.gather(padded.view(n, c, -1), 2, flat.expand(n, c, h * w)).view(n, c, h, w)


def hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = _draw((len(x),), g, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def vflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = _draw((len(x),), g, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-2), x)


def rotation(x: torch.Tensor, g: torch.Generator, degrees: float = 15.0, p: float = 1.0) -> torch.Tensor:
    """Rotate each image about its centre by its own angle (pixel-space rotation, also for H != W)."""
    n, _, h, w = x.shape
    angle = _uniform(n, -degrees, degrees, g, x.device) * (math.pi / 180)
    angle = torch.where(_draw((n,), g, x.device) < p, angle, torch.zeros_like(angle))
    if n == 0:
        return x.clone()
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1)
    return _sample(x, theta)


def jitter(x: torch.Tensor, g: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
           saturation: float = 0.4) -> torch.Tensor:
    """Brightness, then contrast, then saturation (RGB only), each factor per image; clamped to 0..255."""
    n, c = x.shape[:2]
    dev = x.device
    fb = _uniform(n, max(0.0, 1 - brightness), 1 + brightness, g, dev).view(n, 1, 1, 1)
    fc = _uniform(n, max(0.0, 1 - contrast), 1 + contrast, g, dev).view(n, 1, 1, 1)
    fs = _uniform(n, max(0.0, 1 - saturation), 1 + saturation, g, dev).view(n, 1, 1, 1)
    y = (_float(x) * fb).clamp_(0, 255)

    def gray(t: torch.Tensor) -> torch.Tensor:
        if c == 3:
            wts = draws_to(torch.tensor([0.299, 0.587, 0.114], dtype=t.dtype), dev).view(1, 3, 1, 1)
            return (t * wts).sum(1, keepdim=True)
        return t.mean(1, keepdim=True)

    mean = gray(y).mean((2, 3), keepdim=True)
    y = ((y - mean) * fc + mean).clamp_(0, 255)
    if c == 3:
        gy = gray(y)
        y = ((y - gy) * fs + gy).clamp_(0, 255)
    return _back(y, x)


def resized_crop(x: torch.Tensor, g: torch.Generator, scale: float = 0.5, ratio: float = 4 / 3) -> torch.Tensor:
    """Per image: a box of area fraction U(scale, 1) and aspect exp(U(-log r, log r)), at a uniform
    position inside the image, resampled (bilinear) to the full H x W."""
    n = len(x)
    dev = x.device
    area = _uniform(n, scale, 1.0, g, dev)
    logr = _uniform(n, -math.log(ratio), math.log(ratio), g, dev)
    bw = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
    bh = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (2 * _draw((n,), g, dev) - 1) * (1 - bw)
    cy = (2 * _draw((n,), g, dev) - 1) * (1 - bh)
    if n == 0:
        return x.clone()
    zero = torch.zeros_like(bw)
    theta = torch.stack([torch.stack([bw, zero, cx], 1), torch.stack([zero, bh, cy], 1)], 1)
    return _sample(x, theta)


def cutout(x: torch.Tensor, g: torch.Generator, size: int = 8, p: float = 1.0) -> torch.Tensor:
    """Zero one ``size x size`` square per image (top-left uniform so it lies fully inside)."""
    n, _, h, w = x.shape
    s = max(0, min(int(size), h, w))
    dev = x.device
    y0 = _randint(h - s, n, g, dev)
    x0 = _randint(w - s, n, g, dev)
    on = _draw((n,), g, dev) < p
    rows = torch.arange(h, device=dev)[None, :]
    cols = torch.arange(w, device=dev)[None, :]
    in_r = (rows >= y0[:, None]) & (rows < (y0 + s)[:, None])
    in_c = (cols >= x0[:, None]) & (cols < (x0 + s)[:, None])
    square = in_r[:, :, None] & in_c[:, None, :] & on[:, None, None]
    return x.masked_fill(square[:, None], 0)


def blur(x: torch.Tensor, g: torch.Generator, sigma: float = 1.5, kernel: int = 5) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (one grouped convolution, replicate padding)."""
    n, c, h, w = x.shape
    k = int(kernel) | 1  # odd
    dev = x.device
    sig = _uniform(n, min(0.1, sigma), sigma, g, dev).clamp_min(1e-3)
    if n == 0:
        return x.clone()
    r = k // 2
    t = torch.arange(-r, r + 1, device=dev, dtype=torch.float32)
    kern = torch.exp(-t[None, :] ** 2 / (2 * sig[:, None] ** 2))
    kern = kern / kern.sum(1, keepdim=True)                      # N x k
    kern = kern.repeat_interleave(c, 0)                           # N*C x k
    xf = _float(x).reshape(1, n * c, h, w)
    xf = F.conv2d(F.pad(xf, (0, 0, r, r), mode="replicate"), kern.view(n * c, 1, k, 1).to(xf.dtype), groups=n * c)
    xf = F.conv2d(F.pad(xf, (r, r, 0, 0), mode="replicate"), kern.view(n * c, 1, 1, k).to(xf.dtype), groups=n * c)
    return _back(xf.view(n, c, h, w), x)


def saltpepper(x: torch.Tensor, g: torch.Generator, amount: float = 0.05) -> torch.Tensor:
    """Each pixel (all channels together) becomes white (salt) or black (pepper) with probability amount/2 each."""
    n, _, h, w = x.shape
    r = _draw((n, 1, h, w), g, x.device)
    white = 255 if not x.is_floating_point() else 255.0
    out = x.masked_fill(r < amount / 2, white)
    return out.masked_fill((r >= amount / 2) & (r < amount), 0)


def mask(x: torch.Tensor, g: torch.Generator, p: float = 0.3, block: int = 4) -> torch.Tensor:
    """Random block masking: the image is tiled into ``block x block`` cells, each zeroed with probability p."""
    n, _, h, w = x.shape
    b = max(1, int(block))
    gh, gw = -(-h // b), -(-w // b)
    cells = _draw((n, 1, gh, gw), g, x.device) < p
    m = cells.repeat_interleave(b, 2).repeat_interleave(b, 3)[:, :, :h, :w]
    return x.masked_fill(m, 0)


# ------------------------------------------------------------------------------------- the catalogue

# name -> (function, default settings, settings that must be integers, settings that are probabilities)
CATALOGUE: dict[str, tuple[Callable[..., torch.Tensor], dict[str, float], tuple[str, ...], tuple[str, ...]]] = {
    "standard": (standard, {"pad": 4}, ("pad",), ()),
    "crop": (crop, {"pad": 4}, ("pad",), ()),
    "hflip": (hflip, {"p": 0.5}, (), ("p",)),
    "vflip": (vflip, {"p": 0.5}, (), ("p",)),
    "rotation": (rotation, {"degrees": 15.0, "p": 1.0}, (), ("p",)),
    "jitter": (jitter, {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}, (), ()),
    "resized_crop": (resized_crop, {"scale": 0.5, "ratio": 4 / 3}, (), ()),
    "cutout": (cutout, {"size": 8, "p": 1.0}, ("size",), ("p",)),
    "blur": (blur, {"sigma": 1.5, "kernel": 5}, ("kernel",), ()),
    "saltpepper": (saltpepper, {"amount": 0.05}, (), ("amount",)),
    "mask": (mask, {"p": 0.3, "block": 4}, ("block",), ("p",)),
}
AUGMENTATIONS = tuple(CATALOGUE)


def _hint(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.4)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_spec(spec: str) -> list[str]:
    """``none`` -> [], ``standard`` -> ["standard"], ``crop,hflip`` -> ["crop", "hflip"]; unknown names raise."""
    spec = (spec or "none").strip()
    if spec == "none":
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise NormlabError(f"config: augment={spec!r} is empty: use none, standard or names like crop,hflip,cutout")
    for name in names:
        if name not in CATALOGUE:
            raise NormlabError(f"config: augment={spec!r}: unknown augmentation {name!r}{_hint(name, list(CATALOGUE))}; "
                               f"use none or a comma-separated list of {', '.join(CATALOGUE)}")
    return names


def parse_params(text: str | Mapping[str, Any] | None, names: list[str] | None = None) -> Params:
    """``"cutout.size=8,mask.p=0.3"`` -> ``{"cutout": {"size": 8}, "mask": {"p": 0.3}}``, checked against the
    catalogue (did-you-mean for unknown names and keys) and, when ``names`` is given, against the spec."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if isinstance(text, Mapping):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, eq, value = part.partition("=")
            if not eq:
                raise NormlabError(f"config: augment_params entry {part!r} is not NAME.KEY=VALUE "
                                   "(e.g. cutout.size=8,rotation.degrees=15)")
            items.append((key.strip(), value.strip()))
    out: Params = {}
    for key, value in items:
        name, dot, setting = key.partition(".")
        if not dot or name not in CATALOGUE:
            raise NormlabError(f"config: augment_params key {key!r} is not AUGMENTATION.SETTING"
                               f"{_hint(name, list(CATALOGUE))}; augmentations: {', '.join(CATALOGUE)}")
        _, defaults, ints, probs = CATALOGUE[name]
        if setting not in defaults:
            raise NormlabError(f"config: augment_params key {key!r}: {name} has no setting {setting!r}"
                               f"{_hint(setting, list(defaults))}; it takes {', '.join(defaults)}")
        if names is not None and name not in names:
            raise NormlabError(f"config: augment_params sets {key!r} but --augment does not include {name!r}")
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise NormlabError(f"config: augment_params {key}={value!r} is not a number") from None
        if not math.isfinite(num) or num < 0:
            raise NormlabError(f"config: augment_params {key}={value!r} must be a finite number >= 0")
        if setting in ints:
            if not num.is_integer() or (num < 1 and setting != "pad"):
                raise NormlabError(f"config: augment_params {key}={value!r} must be a whole number"
                                   + (" >= 1" if setting != "pad" else " >= 0"))
            num = int(num)
        if setting in probs and num > 1:
            raise NormlabError(f"config: augment_params {key}={value!r} is a probability: use 0..1")
        if (name, setting) == ("resized_crop", "scale") and not 0 < num <= 1:
            raise NormlabError(f"config: augment_params {key}={value!r} must be in (0, 1]")
        if (name, setting) == ("resized_crop", "ratio") and num < 1:
            raise NormlabError(f"config: augment_params {key}={value!r} must be >= 1 (aspect range 1/ratio..ratio)")
        out.setdefault(name, {})[setting] = num
    return out


def check_augment(spec: str, params: str | Mapping[str, Any] | None) -> tuple[list[str], Params]:
    """Validate ``--augment`` and ``--augment-params`` together (one-line NormlabError)."""
    names = parse_spec(spec)
    return names, parse_params(params, names)


def settings(name: str, params: Params | None = None) -> dict[str, float]:
    """The defaults of ``name`` overridden by ``params``."""
    return {**CATALOGUE[name][1], **((params or {}).get(name, {}))}


def apply_augment(x: torch.Tensor, spec: str, generator: torch.Generator,
                  params: str | Mapping[str, Any] | None = None) -> torch.Tensor:
    """Apply the augmentations of ``spec`` (``none``, ``standard`` or ``crop,hflip,...``) in order to the
    ``N x C x H x W`` batch ``x``; every image draws its own parameters from ``generator``."""
    if x.dim() != 4:
        raise ValueError(f"apply_augment expects N x C x H x W, got shape {tuple(x.shape)}")
    names, parsed = check_augment(spec, params)
    for name in names:
        x = CATALOGUE[name][0](x, generator, **settings(name, parsed))
    return x


# ----------------------------------------------------------------------------------------- preview

def preview_augmentations(image: torch.Tensor, path: str | Path, names: list[str] | None = None,
                          params: str | Mapping[str, Any] | None = None, samples: int = 6, seed: int = 0) -> Path:
    """A grid figure: one row per augmentation (the original first), ``samples`` random draws per row."""
    from normlab.plots import plt, save_figure

    if image.dim() != 3:
        raise NormlabError(f"preview expects one C x H x W image, got shape {tuple(image.shape)}")
    names = list(names) if names else [n for n in CATALOGUE if n != "standard"] + ["standard"]
    parsed = parse_params(params)
    rows = [("original", image[None].expand(samples, *image.shape))]
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        batch = image[None].repeat(samples, 1, 1, 1)
        rows.append((name, CATALOGUE[name][0](batch, g, **settings(name, parsed))))
    fig, axes = plt.subplots(len(rows), samples, figsize=(1.3 * samples + 1.2, 1.3 * len(rows)), squeeze=False,
                             constrained_layout=True)
    for r, (name, batch) in enumerate(rows):
        for j in range(samples):
            ax = axes[r][j]
            img = batch[j].detach().cpu()
            img = img.float().clamp(0, 255).div(255)
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img[:3].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("augmentations (one row each, independent draws per column)", fontsize=10)
    return save_figure(fig, path)


__all__ = ["AUGMENTATIONS", "CATALOGUE", "apply_augment", "check_augment", "parse_params", "parse_spec",
           "preview_augmentations", "settings"]
