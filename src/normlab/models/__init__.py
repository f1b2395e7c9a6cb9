"""Models: the CIFAR-style 6n+2 ResNet (``ResNet``), a builder from a run config, and inspection helpers."""

from __future__ import annotations

from normlab.models.resnet import ACTIVATIONS, BasicBlock, ResNet, count_parameters, count_weighted_layers

__all__ = ["ACTIVATIONS", "BasicBlock", "ResNet", "build_model", "count_parameters", "count_weighted_layers"]


def build_model(cfg, in_channels: int, num_classes: int, *, sync: bool = False) -> ResNet:
    """The model a ``TrainConfig`` describes (resnet, resnet18, compact; see ``normlab.models.transfer`` for
    heads, pretrained weights and freezing). ``sync`` turns on cross-rank batch statistics (bn, bin)."""
    norm_kwargs = {"sync": sync}
    if cfg.gn_groups is not None:
        norm_kwargs["num_groups"] = cfg.gn_groups
    from normlab.models.transfer import finish_model  # head, --max-params, --freeze

    kind = getattr(cfg, "model", "resnet")
    if kind == "resnet18":
        from normlab.models.transfer import build_resnet18

        return finish_model(build_resnet18(cfg, in_channels, num_classes, norm_kwargs), cfg, num_classes)
    if kind == "compact":
        from normlab.models.compact import build_compact

        return finish_model(build_compact(cfg, in_channels, num_classes, norm_kwargs), cfg, num_classes)
    model = ResNet(cfg.n, num_classes, norm=cfg.norm, in_channels=in_channels, shortcut=cfg.shortcut,
                   norm_kwargs=norm_kwargs, activation=cfg.activation, dropout=cfg.dropout)
    return finish_model(model, cfg, num_classes)
