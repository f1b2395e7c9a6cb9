"""The wider workbench: torchvision's ResNet-18 with any norm, pretrained weights, freezing, heads.

* :func:`replace_norms` walks ANY model and swaps every 2-d normalization layer (``nn.BatchNorm2d``,
  ``nn.SyncBatchNorm``, ``nn.GroupNorm``, ``nn.InstanceNorm2d`` and normlab's bn/bin/in/ln/gn) for
  ``factory(num_channels)``, carrying over what means the same thing: running statistics when both
  layers keep them (BN -> bn, torch_bn, bin) and the per-channel affine ``weight``/``bias`` when both
  have one (-> in, ln, gn as well); nothing for ``nn`` (identity). BIN's gate starts at 1 (pure BN),
  so a BN -> bin swap computes the same function.
* ``--model resnet18``: ``torchvision.models.resnet18`` (norms swapped in after any weights are
  loaded). For inputs of 32x32 or less the stem is a 3x3 stride-1 conv without max-pool; for other
  than 3 input channels ``conv1`` is rebuilt (pretrained 7x7 RGB filters are summed over the channels
  for 1-channel inputs; a 3x3 small-input stem keeps its random initialisation).
* ``--pretrained PATH|imagenet``: a local torchvision-resnet18 state_dict (read with
  ``torch.load(weights_only=True)``; the ``fc`` layer is skipped when the class count differs), or
  torchvision's ``ResNet18_Weights.IMAGENET1K_V1`` (downloaded, so it needs internet or a filled
  torch hub cache).
* ``--freeze K``: ``requires_grad=False`` for the first K stages: resnet18: 1 = conv1+bn1, 2 = + layer1,
  3 = + layer2, 4 = + layer3, 5 = + layer4; normlab's resnet/compact: 1 = stem, 2..4 = + stage 1..3.
  Frozen parameters are left out of the optimizer; frozen BN layers still update their running
  statistics in training mode (kept simple on purpose).
* ``--head linear | mlp:H1,H2,...``: the classifier; ``mlp`` is Linear-ReLU-Dropout(``--dropout``) per
  hidden width, then the output Linear.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.hub import load_state_dict_from_url

from normlab.errors import NormlabError

IMAGENET = "imagenet"
SMALL_INPUT = 32  # inputs up to this size get the CIFAR-style stem
FREEZE_UNITS = {"resnet18": 5, "resnet": 4, "compact": 4}


# ------------------------------------------------------------------------------------ norm swapping

def _norm_types() -> tuple[type, ...]:
    from normlab.norms import BatchInstanceNorm2d, BatchNorm2d, GroupNorm2d, InstanceNorm2d, LayerNorm2d

    return (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d, BatchNorm2d, BatchInstanceNorm2d,
            GroupNorm2d, InstanceNorm2d, LayerNorm2d)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, _norm_types())


def _channels(m: nn.Module) -> int:
    for attr in ("num_channels", "num_features"):
        value = getattr(m, attr, None)
        if isinstance(value, int):
            return value
    raise NormlabError(f"cannot tell the channel count of {type(m).__name__}")


@torch.no_grad()
def carry_over(old: nn.Module, new: nn.Module) -> nn.Module:
    """Copy ``weight``/``bias`` and running statistics from ``old`` to ``new`` where both have them."""
    ref = next(iter(list(old.parameters()) + list(old.buffers())), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(old, name, None), getattr(new, name, None)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
            b.copy_(a)
    new.train(old.training)
    return new


def replace_norms(model: nn.Module, factory: Callable[[int], nn.Module]) -> nn.Module:
    """Replace every 2-d norm layer of ``model`` (in place) by ``factory(num_channels)``; returns ``model``."""
    for name, child in list(model.named_children()):
        if is_norm(child):
            setattr(model, name, carry_over(child, factory(_channels(child))))
        else:
            replace_norms(child, factory)
    return model


# ----------------------------------------------------------------------------------------- ResNet-18

@functools.cache
def _resnet18_class() -> type:
    from torchvision.models.resnet import ResNet

    class ResNet18(ResNet):
        """torchvision's ResNet-18 plus the ``stem``/``stages`` views normlab's probes and figures use."""

        @property
        def stem(self) -> nn.Module:  # output of conv1 + bn1 + relu (+ max-pool)
            return self.maxpool

        @property
        def stages(self) -> list[nn.Module]:
            return [self.layer1, self.layer2, self.layer3, self.layer4]

    return ResNet18


def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """torchvision's ResNet-18 with ``nn.BatchNorm2d``, adapted to small inputs and to ``in_channels``."""
    from torchvision.models.resnet import BasicBlock

    model = _resnet18_class()(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    if image_size <= SMALL_INPUT:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _read_state_dict(source: str) -> tuple[dict[str, torch.Tensor], str]:
    if source == IMAGENET:
        from torchvision.models import ResNet18_Weights

        url = ResNet18_Weights.IMAGENET1K_V1.url
        try:
            state = load_state_dict_from_url(url, progress=False, map_location="cpu", weights_only=True)
        except Exception as exc:  # no network, proxy, DNS, truncated download, ...
            why = (str(exc).strip().splitlines() or [""])[0][:120]
            raise NormlabError(f"pretrained=imagenet: torchvision's ResNet18_Weights.IMAGENET1K_V1 could not be "
                               f"downloaded ({type(exc).__name__}{': ' + why if why else ''}); without internet, "
                               "save a torchvision resnet18 state_dict to a file and pass --pretrained PATH") from None
        return state, "ImageNet (IMAGENET1K_V1)"
    path = Path(source).expanduser()
    if not path.is_file():
        raise NormlabError(f"pretrained weights {path} not found: pass a torchvision resnet18 state_dict file "
                           "or --pretrained imagenet")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [""])[0][:120]
        raise NormlabError(f"pretrained weights {path} cannot be read ({type(exc).__name__}: {why}); "
                           "save them with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NormlabError(f"pretrained weights {path} are not a state_dict of tensors")
    return state, str(path)


@torch.no_grad()
def load_pretrained(model: nn.Module, source: str) -> dict[str, Any]:
    """Load torchvision-resnet18 weights into ``model`` (still with BatchNorm); returns what was skipped."""
    state, where = _read_state_dict(source)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    load, skipped = {}, []
    for key, value in state.items():
        if key not in own:
            continue
        if value.shape != own[key].shape:
            if key == "conv1.weight" and value.shape[2:] == own[key].shape[2:] and own[key].shape[1] == 1:
                value = value.sum(1, keepdim=True)  # RGB filters -> one grey channel
            elif key == "conv1.weight" or key.startswith("fc."):
                skipped.append(key)
                continue
            else:
                raise NormlabError(f"pretrained weights {where} do not fit resnet18: {key} has shape "
                                   f"{tuple(value.shape)}, the model {tuple(own[key].shape)}")
        load[key] = value
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    if unexpected or missing:
        detail = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
        raise NormlabError(f"pretrained weights {where} are not a torchvision resnet18 state_dict ({detail})")
    model.load_state_dict(load, strict=False)
    return {"source": where, "loaded": len(load), "skipped": skipped}


# ---------------------------------------------------------------------------------- heads and freezing

def parse_head(spec: str) -> list[int]:
    """``linear`` -> [], ``mlp:512,128`` -> [512, 128]."""
    spec = str(spec).strip()
    if spec == "linear":
        return []
    kind, _, widths = spec.partition(":")
    try:
        hidden = [int(w) for w in widths.split(",")] if kind == "mlp" and widths else None
    except ValueError:
        hidden = None
    if not hidden or any(h < 1 for h in hidden):
        raise NormlabError(f"config: head={spec!r} is not linear or mlp:H1,H2,... with positive hidden widths "
                           "(e.g. mlp:512,128)")
    return hidden


def make_head(in_features: int, num_classes: int, spec: str = "linear", dropout: float = 0.0) -> nn.Module:
    """``linear``: one Linear; ``mlp:H1,...``: (Linear-ReLU-Dropout) per hidden width, then Linear."""
    layers: list[nn.Module] = []
    width = in_features
    for h in parse_head(spec):
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        width = h
    layers.append(nn.Linear(width, num_classes))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def freeze_units(model: nn.Module) -> list[list[nn.Module]]:
    """The freezable stages of a model, in order: [stem, stage 1, stage 2, ...]."""
    if hasattr(model, "layer1") and hasattr(model, "conv1"):  # torchvision ResNet
        return [[model.conv1, model.bn1]] + [[getattr(model, f"layer{i}")] for i in range(1, 5)]
    if hasattr(model, "stem") and hasattr(model, "stages"):
        return [[model.stem]] + [[s] for s in model.stages]
    raise NormlabError(f"{type(model).__name__} has no stem/stages to freeze")


def freeze(model: nn.Module, k: int) -> nn.Module:
    """``requires_grad=False`` for every parameter of the first ``k`` stages (see the module docstring)."""
    units = freeze_units(model)
    if not 0 <= k <= len(units):
        raise NormlabError(f"config: freeze={k} is out of range: this model has {len(units)} freezable stages (0..{len(units)})")
    for unit in units[:k]:
        for module in unit:
            for p in module.parameters():
                p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------ building

def default_image_size(cfg) -> int:
    """The input size the data of ``cfg`` will have (``image_size``, else the data set's own)."""
    return cfg.image_size or {"fashion-mnist": 28, "cifar10": 32}.get(cfg.dataset, 256)


def check_budget(model: nn.Module, max_params: int | None, name: str) -> None:
    count = sum(p.numel() for p in model.parameters())
    if max_params is not None and count > max_params:
        raise NormlabError(f"model {name} has {count:,} parameters, over the --max-params budget of "
                           f"{max_params:,}: lower --width/--n or pick a smaller model")


def build_resnet18(cfg, in_channels: int, num_classes: int, norm_kwargs: dict, image_size: int | None = None) -> nn.Module:
    from normlab.norms import norm_layer

    factory = norm_layer(cfg.norm, **norm_kwargs)
    model = resnet18(num_classes, in_channels, image_size or default_image_size(cfg))
    if getattr(cfg, "pretrained", None):
        load_pretrained(model, cfg.pretrained)
    return replace_norms(model, factory)


def finish_model(model: nn.Module, cfg, num_classes: int) -> nn.Module:
    """Head, parameter budget and freezing, common to every model family."""
    head, dropout = getattr(cfg, "head", "linear"), getattr(cfg, "dropout", 0.0)
    if head != "linear" or (getattr(cfg, "model", "resnet") == "resnet18" and dropout > 0):
        fc = model.fc
        if head != "linear" and isinstance(getattr(model, "dropout", None), nn.Dropout):
            model.dropout = nn.Identity()  # the head carries its own dropout
        new = make_head(fc.in_features, num_classes, head, dropout)
        if head == "linear":  # torchvision's resnet18 has no dropout slot: put it in front of fc
            new = nn.Sequential(nn.Dropout(dropout), fc)
        model.fc = new
    check_budget(model, getattr(cfg, "max_params", None), getattr(cfg, "model", "resnet"))
    if getattr(cfg, "freeze", 0):
        freeze(model, cfg.freeze)
    return model


def check_pretrained_file(cfg) -> None:
    """Fail early (one line) when ``--pretrained`` names a file that does not exist. Not part of ``validate()``:
    a finished run's saved config must stay readable after the weight file has moved."""
    if cfg.pretrained not in (None, IMAGENET) and not Path(cfg.pretrained).expanduser().is_file():
        raise NormlabError(f"config: pretrained={cfg.pretrained!r}: no such file; pass a torchvision resnet18 "
                           "state_dict file or 'imagenet'")


def validate_workbench(cfg) -> None:
    """Config checks for model/head/freeze/pretrained/budget/augmentation settings (one-line errors)."""
    from normlab.data.augmentations import check_augment

    check_augment(cfg.augment, cfg.augment_params)
    parse_head(cfg.head)
    units = FREEZE_UNITS.get(cfg.model, 4)
    if not 0 <= cfg.freeze <= units:
        stages = "conv1+bn1, layer1..layer4" if cfg.model == "resnet18" else "stem, stage1..stage3"
        raise NormlabError(f"config: freeze={cfg.freeze} is out of range for model {cfg.model}: use 0..{units} "
                           f"(stages: {stages})")
    if cfg.pretrained is not None:
        if cfg.model != "resnet18":
            raise NormlabError(f"config: pretrained={cfg.pretrained!r} needs --model resnet18 "
                               f"(weights are torchvision resnet18 state_dicts), not {cfg.model!r}")
    if cfg.max_params is not None and cfg.max_params < 1:
        raise NormlabError(f"config: max_params={cfg.max_params!r} must be >= 1 (or left unset)")
    if cfg.width < 1:
        raise NormlabError(f"config: width={cfg.width!r} must be >= 1")
