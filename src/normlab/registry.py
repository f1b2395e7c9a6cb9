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

This module imports no torch: the registries whose values are torch objects (norms, augmentations,
activations, optimizers) are imported from their owners on first use (``registry.NORMS``), and their names are
listed here (``NORM_NAMES``, ...), so that ``config`` and the command line know every choice without torch.
Model builders are named by import path and resolved on use for the same reason.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from normlab.errors import NormlabError
from normlab.norm_table import NORM_PATHS

# The names of the choices whose values need torch: config and the command line validate and offer these
# without importing torch; tests/test_registries.py checks that they are the registries' keys.
NORM_NAMES = tuple(NORM_PATHS)  # normlab.norms.NORMS: one table, normlab.norm_table
# keywords a study's list of norms takes (study files, `normlab study --norms`): every norm; those with batch
# statistics (expanded by normlab.study.plan.expand_norms, asking the layers)
ALL_NORMS, BATCH_STAT_NORMS = "all", "batch-statistics"
ACTIVATION_NAMES = ("relu", "leaky_relu", "elu", "gelu", "silu", "tanh", "sigmoid")  # ACTIVATIONS
OPTIMIZER_NAMES = ("sgd", "adam", "adamw")  # OPTIMIZERS
AUGMENTATION_NAMES = ("standard", "crop", "hflip", "vflip", "rotation", "jitter", "resized_crop", "cutout", "blur",
                      "saltpepper", "mask")  # normlab.data.augmentations.CATALOGUE

# registry name -> where its objects live, imported on first use (``registry.NORMS`` etc.)
_LAZY = {"NORMS": ("normlab.norms", "NORMS"), "AUGMENTATIONS": ("normlab.data.augmentations", "CATALOGUE"),
         "ACTIVATIONS": ("normlab.builders", "ACTIVATIONS"), "OPTIMIZERS": ("normlab.builders", "OPTIMIZERS"),
         "ReLU": ("normlab.builders", "ReLU"), "fused_step": ("normlab.builders", "fused_step")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SHORTCUTS: dict[str, str] = {
    "A": "zero-padding identity (the paper's CIFAR choice)",
    "B": "1x1 conv + norm (projection)",
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

    def build(self) -> Callable[..., Any]:  # the model builder (returns a torch module; no torch import here)
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


__all__ = ["ACTIVATIONS", "ACTIVATION_NAMES", "ALL_NORMS", "AUGMENTATIONS", "AUGMENTATION_NAMES", "BATCH_STAT_NORMS",
           "DATASETS", "MODELS", "NORMS", "NORM_NAMES", "OPTIMIZERS", "OPTIMIZER_NAMES", "SCHEDULES", "SHORTCUTS", "TIMM_PREFIX", "ModelRegistry",
           "ModelSpec", "ReLU", "choose", "is_timm"]
