"""The registries whose values are torch objects: activation factories and optimizer builders.

Reached through ``normlab.registry`` (``registry.ACTIVATIONS``, ``registry.OPTIMIZERS``, ``registry.ReLU``,
``registry.fused_step``), which imports this module on first use, so that the names of every choice (and the
command line built from them) are known without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from normlab.norms._hooks import HookWatched


class ReLU(HookWatched, nn.ReLU):
    """``nn.ReLU`` (same computation, repr and state) that tells its owner when a module hook is registered on it
    or removed: the ResNet's stem and blocks fuse it into their norm only while nothing watches it."""


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def fused_step(groups: list[dict]) -> bool | None:
    """``fused=True`` when every parameter is on a CPU or CUDA device (torch has fused SGD/Adam/AdamW steps
    for both since 2.4), else None: torch's default (foreach or a loop; ``False`` would force the loop).
    Two reasons:

    - no host sync under fp16: a fused optimizer takes the grad scaler's ``found_inf`` tensor and skips an
      overflowed step inside its kernel, where any other optimizer makes ``GradScaler.step`` read the flag
      on the host (``.item()``) every step. Also after an explicit ``unscale_`` (``train/step.py`` clips
      unscaled gradients): the scaler then hands over the flag that ``unscale_`` found.
    - speed on the CPU: the fused steps are faster than foreach for SGD with momentum and for AdamW on a
      ResNet-20's parameters (the lab notes, bench/archive/NOTES.md, keep the figures), and their results agree
      with foreach (SGD identical, AdamW within float rounding)."""
    devices = {p.device.type for g in groups for p in g["params"]}
    return True if devices and devices <= {"cpu", "cuda"} else None


def _zero_momentum(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    # Fused SGD creates its momentum buffers with empty_like at its first step and lets the kernel fill
    # them; when the scaler skips that step (fp16's first steps often overflow) they stay uninitialised
    # and the next step adds garbage. Zeros before the first step are the same update (buf = 0.9 * 0 + g
    # is torch's first-step buf = g, normlab never sets dampening) and a skipped step leaves them at zero.
    for group in optimizer.param_groups:
        for p in group["params"]:
            if optimizer.state[p].get("momentum_buffer") is None:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _keep_fused(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    # load_state_dict takes every param group's settings from the saved state, ``fused`` and ``foreach`` too:
    # a checkpoint written unfused (older normlab, another device) would silently unfuse the optimizer, and
    # under fp16 crash it, since the grad scaler still hands it found_inf (``_step_supports_amp_scaling`` was
    # set when it was built). The settings it was built with win.
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = optimizer.defaults["fused"], optimizer.defaults["foreach"]


def _fused(cls: type[torch.optim.Optimizer], groups: list[dict], **kw: Any) -> torch.optim.Optimizer:
    opt = cls(groups, fused=fused_step(groups), **kw)
    opt.register_load_state_dict_post_hook(_keep_fused)
    return opt


def _sgd(groups: list[dict], cfg: Any) -> torch.optim.Optimizer:
    # Nesterov needs momentum; with momentum 0 it is plain SGD rather than an error from torch
    opt = _fused(torch.optim.SGD, groups, lr=cfg.lr, momentum=cfg.momentum,
                 nesterov=cfg.nesterov and cfg.momentum > 0)
    if opt.defaults["fused"] and cfg.momentum > 0:
        _zero_momentum(opt)
        opt.register_load_state_dict_post_hook(_zero_momentum)  # a resumed state may lack a buffer
    return opt


OPTIMIZERS: dict[str, Callable[[list[dict], Any], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": lambda groups, cfg: _fused(torch.optim.Adam, groups, lr=cfg.lr),
    "adamw": lambda groups, cfg: _fused(torch.optim.AdamW, groups, lr=cfg.lr),
}


__all__ = ["ACTIVATIONS", "OPTIMIZERS", "ReLU", "fused_step"]
