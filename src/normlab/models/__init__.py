"""Models: the CIFAR-style 6n+2 ResNet (``ResNet``), a builder from a run config, and inspection helpers."""

from __future__ import annotations

from normlab.models.resnet import ACTIVATIONS, BasicBlock, ResNet, count_parameters, count_weighted_layers

__all__ = ["ACTIVATIONS", "BasicBlock", "ResNet", "build_model", "count_parameters", "count_weighted_layers"]


def build_model(cfg, in_channels: int, num_classes: int, *, sync: bool = False) -> ResNet:
    """The model a ``TrainConfig`` describes. ``sync`` turns on cross-rank batch statistics (bn, bin)."""
    norm_kwargs = {"sync": sync}
    if cfg.gn_groups is not None:
        norm_kwargs["num_groups"] = cfg.gn_groups
    return ResNet(cfg.n, num_classes, norm=cfg.norm, in_channels=in_channels, shortcut=cfg.shortcut,
                  norm_kwargs=norm_kwargs, activation=cfg.activation, dropout=cfg.dropout)
