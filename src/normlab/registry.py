"""Every named choice of a run, one plain dict each: what validation, the CLI's choices and help, and the
tests iterate over. Adding a value to one of these dicts is the whole change (plus its documentation).

=============  ==========================================  =========================================
setting        registry                                    value
=============  ==========================================  =========================================
norm           ``NORMS`` (owned by ``normlab.norms``)      factory ``(num_channels, **kw) -> module``
augment        ``AUGMENTATIONS`` (``data.augmentations``)  (function, defaults, ints, probabilities)
activation     ``ACTIVATIONS``                             factory ``() -> module``
shortcut       ``SHORTCUTS``                               description
optimizer      ``OPTIMIZERS``                              ``(param_groups, cfg) -> Optimizer``
schedule       ``SCHEDULES``                               ``(t in [0, 1), cfg) -> learning rate``
model          ``MODELS`` (also ``timm:<name>``)               ``ModelSpec`` (builder path, freeze stages)
dataset        ``DATASETS``                                default image size
=============  ==========================================  =========================================

This module sits below ``config`` and ``models`` (it imports only ``norms`` and ``data``), so the config
can validate every choice without importing the models. Model builders are named by import path and
resolved on use for the same reason.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normlab.data.augmentations import CATALOGUE as AUGMENTATIONS
from normlab.errors import NormlabError
from normlab.norms import NORMS
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

SHORTCUTS: dict[str, str] = {
    "A": "zero-padding identity (the paper's CIFAR choice)",
    "B": "1x1 conv + norm (projection)",
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
      ResNet-20's parameters, and their results agree with foreach (SGD identical, AdamW within float
      rounding)."""
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


def _onecycle(t: float, cfg: Any) -> float:
    # linear rise from lr/25 over the first 30 %, then cosine down to lr/1e4
    if t < 0.3:
        return cfg.lr / 25 + (cfg.lr - cfg.lr / 25) * t / 0.3
    return cfg.lr / 1e4 + 0.5 * (cfg.lr - cfg.lr / 1e4) * (1 + math.cos(math.pi * (t - 0.3) / 0.7))


SCHEDULES: dict[str, Callable[[float, Any], float]] = {
    "cosine": lambda t, cfg: 0.5 * cfg.lr * (1 + math.cos(math.pi * t)),
    "step": lambda t, cfg: cfg.lr * cfg.step_gamma ** sum(t >= m for m in cfg.step_milestones),
    "onecycle": _onecycle,
    "constant": lambda t, cfg: cfg.lr,
}


@dataclass(frozen=True)
class ModelSpec:
    builder: str  # "module:function" taking (cfg, in_channels, num_classes, norm_kwargs) -> nn.Module
    freeze_stages: str  # what --freeze 1, 2, ... freeze, in order
    help: str
    pretrained: bool = False  # takes --pretrained (resnet18: torchvision weights; timm: a local state_dict)
    downsampling: int = 4  # total stride for small inputs (stride-2 stages): the last stage sees size/downsampling

    @property
    def freeze_units(self) -> int:
        return len(self.freeze_stages.split(", "))

    def build(self) -> Callable[..., nn.Module]:
        module, _, name = self.builder.partition(":")
        return getattr(importlib.import_module(module), name)


TIMM_PREFIX = "timm:"  # --model timm:<architecture>: any timm model (normlab.models.timm_models)


class ModelRegistry(dict):
    """The model dict, whose ``timm:NAME`` entry stands for every ``timm:<architecture>``: ``"timm:convnext_atto"
    in MODELS`` and ``MODELS["timm:convnext_atto"]`` answer with that entry, so validation, the CLI's choices and
    the help all come from this one dict; whether timm knows the architecture is checked when the model is built
    (timm is an optional dependency)."""

    def _timm_key(self, key: object) -> str | None:
        if isinstance(key, str) and key.startswith(TIMM_PREFIX) and len(key) > len(TIMM_PREFIX):
            return TIMM_PREFIX + "NAME"
        return None

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or self._timm_key(key) in self.keys()

    def __missing__(self, key: object) -> ModelSpec:
        timm_key = self._timm_key(key)
        if timm_key is None or not super().__contains__(timm_key):
            raise KeyError(key)
        return super().__getitem__(timm_key)


def is_timm(model: str) -> bool:
    return str(model).startswith(TIMM_PREFIX)


MODELS: dict[str, ModelSpec] = ModelRegistry({
    "resnet": ModelSpec("normlab.models.build:build_resnet", "stem, stage1, stage2, stage3",
                        "the 6n+2 CIFAR ResNet"),
    "resnet18": ModelSpec("normlab.models.torchvision_resnet:build_resnet18",
                          "conv1+bn1, layer1, layer2, layer3, layer4", "torchvision's ResNet-18, any norm",
                          pretrained=True, downsampling=8),
    "compact": ModelSpec("normlab.models.compact:build_compact", "stem, stage1, stage2, stage3",
                         "narrow ResNet for small budgets, see --width"),
    "nf": ModelSpec("normlab.models.nf:build_nf", "stem, stage1, stage2, stage3",
                    "normalizer-free 6n+2 ResNet (scaled WS convs, no norm; use --agc)"),
    # freeze: the timm model's stem, then its stages (where it has `stem` and `stages`); counted when built.
    # downsampling 1: the smallest input is checked when the model is built (a probe pass at the input size)
    TIMM_PREFIX + "NAME": ModelSpec("normlab.models.timm_models:build_timm", "stem, stages ...",
                                    "any timm architecture, e.g. timm:convnext_atto (pip install 'normlab[timm]')",
                                    pretrained=True, downsampling=1),
})
# conv layers of the models (--conv): plain, or weight-standardized (models/nf.py)
CONVS: tuple[str, ...] = ("plain", "ws")

# data set -> its image size (folder: the size images are resized to unless --image-size says otherwise)
DATASETS: dict[str, int] = {"fashion-mnist": 28, "cifar10": 32, "folder": 256}


def choose(registry: Mapping[str, Any] | tuple[str, ...], value: Any, what: str) -> Any:
    """``registry[value]`` (``value`` for a tuple of names), or a one-line NormlabError naming the choices and
    the closest one."""
    try:
        if isinstance(registry, Mapping):
            return registry[value]
        if value in registry:
            return value
        raise KeyError(value)
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(value), [str(k) for k in registry], n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise NormlabError(f"config: {what}={value!r} is not one of {', '.join(map(str, registry))}{hint}") from None


__all__ = ["ACTIVATIONS", "AUGMENTATIONS", "DATASETS", "MODELS", "NORMS", "OPTIMIZERS", "SCHEDULES", "SHORTCUTS",
           "TIMM_PREFIX", "ModelRegistry", "ModelSpec", "ReLU", "choose", "is_timm"]
