"""A model from a run config: the family (``MODELS`` in ``normlab.registry``), then what every family shares.

* ``--head linear | mlp:H1,H2,...``: the classifier; ``mlp`` is Linear-ReLU-Dropout(``--dropout``) per
  hidden width, then the output Linear.
* ``--max-params N``: refuse a model over budget.
* ``--freeze K``: ``requires_grad=False`` for the first K stages: resnet18: 1 = conv1+bn1, 2 = + layer1,
  3 = + layer2, 4 = + layer3, 5 = + layer4; normlab's resnet/compact: 1 = stem, 2..4 = + stage 1..3.
  Frozen parameters are left out of the optimizer; frozen BN layers still update their running
  statistics in training mode (kept simple on purpose).
"""

from __future__ import annotations

from torch import nn

from normlab.config import parse_head
from normlab.errors import NormlabError
from normlab.models.resnet import ResNet
from normlab.registry import MODELS, choose, is_timm


def build_model(cfg, in_channels: int, num_classes: int, *, sync: bool = False) -> nn.Module:
    """The model a ``TrainConfig`` describes. ``sync`` turns on cross-rank batch statistics (bn, bin)."""
    norm_kwargs = {"sync": sync}
    if cfg.gn_groups is not None:
        norm_kwargs["num_groups"] = cfg.gn_groups
    if getattr(cfg, "ghost_batch", None) is not None:
        norm_kwargs["virtual_batch"] = cfg.ghost_batch
    build = choose(MODELS, getattr(cfg, "model", "resnet"), "model").build()
    model = build(cfg, in_channels, num_classes, norm_kwargs)
    if getattr(cfg, "conv", "plain") == "ws":  # weight standardization (Qiao et al. 2019), with any norm
        from normlab.models.nf import standardize_convs

        standardize_convs(model)
    return finish_model(model, cfg, num_classes)


def check_model(model: str) -> None:
    """A one-line error now, before any data is loaded, for a model that cannot be built: an unknown family, a
    timm architecture that timm does not have, or timm not installed."""
    choose(MODELS, model, "model")
    if is_timm(model):
        from normlab.models.timm_models import check_name, timm_name

        check_name(timm_name(model))


def build_resnet(cfg, in_channels: int, num_classes: int, norm_kwargs: dict) -> ResNet:
    return ResNet(cfg.n, num_classes, norm=cfg.norm, in_channels=in_channels, shortcut=cfg.shortcut,
                  norm_kwargs=norm_kwargs, activation=cfg.activation, dropout=cfg.dropout)


# ---------------------------------------------------------------------------------- heads and freezing

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


def check_budget(model: nn.Module, max_params: int | None, name: str) -> None:
    count = sum(p.numel() for p in model.parameters())
    if max_params is not None and count > max_params:
        raise NormlabError(f"model {name} has {count:,} parameters, over the --max-params budget of "
                           f"{max_params:,}: lower --width/--n or pick a smaller model")


def finish_model(model: nn.Module, cfg, num_classes: int) -> nn.Module:
    """Head, parameter budget and freezing, common to every model family."""
    head, dropout = getattr(cfg, "head", "linear"), getattr(cfg, "dropout", 0.0)
    if head != "linear" and not isinstance(getattr(model, "fc", None), nn.Linear):  # timm: its classifier
        path = str(getattr(model, "pretrained_cfg", {}).get("classifier") or "")
        fc = model.get_submodule(path) if path else None
        if not isinstance(fc, nn.Linear):
            raise NormlabError(f"--head {head}: cannot find the classifier Linear of {getattr(cfg, 'model', '?')}; "
                               "use --head linear")
        model.set_submodule(path, make_head(fc.in_features, num_classes, head, dropout))
    elif head != "linear" or (getattr(cfg, "model", "resnet") == "resnet18" and dropout > 0):
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


__all__ = ["build_model", "check_budget", "check_model", "finish_model", "freeze", "freeze_units", "make_head"]
