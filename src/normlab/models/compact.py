"""``--model compact``: a narrow residual family for small parameter budgets.

The CIFAR ResNet's layout (3x3 stem, three stages of ``n`` basic blocks, option-A shortcuts, global
average pooling, one linear layer) at stage widths ``w, 2w, 5w/2`` (``--width w``), with the second
norm of every block zero-initialised (each residual branch starts as the identity, which speeds up
short schedules). Any norm plugs in through ``--norm`` (bn, gn, ln, ...).

Parameter counts with BatchNorm, 10 classes:

    ======  ===  ==============  ========
    width    n   stage widths    params
    ======  ===  ==============  ========
    16       1   16 / 32 / 40    ~46k
    12       2   12 / 24 / 30    ~55k
    16       2   16 / 32 / 40    ~98k
    ======  ===  ==============  ========

``--max-params N`` makes the builder refuse a configuration over budget. The < 50k configuration
(``--width 16 --n 1``) targets >= 70 % CIFAR-10 test accuracy in 20 epochs with standard augmentation,
SGD + one-cycle and label smoothing.
"""

from __future__ import annotations

from torch import nn

from normlab.models.resnet import ResNet


def compact_widths(width: int) -> tuple[int, int, int]:
    return (width, 2 * width, (5 * width) // 2)


class CompactResNet(ResNet):
    """A narrow 6n+2 ResNet with stage widths ``compact_widths(width)``; exposes ``stem``, ``stages``, ``fc``."""

    def __init__(self, n: int, num_classes: int, width: int = 16, norm="bn", in_channels: int = 3, *,
                 norm_kwargs: dict | None = None, activation: str = "relu", dropout: float = 0.0,
                 zero_init_residual: bool = True) -> None:
        super().__init__(n, num_classes, norm=norm, in_channels=in_channels, widths=compact_widths(width),
                         shortcut="A", norm_kwargs=norm_kwargs, activation=activation, dropout=dropout)
        self.width = width
        if zero_init_residual:
            for stage in self.stages:
                for block in stage:
                    weight = getattr(block.bn2, "weight", None)
                    if isinstance(weight, nn.Parameter):
                        nn.init.zeros_(weight)


def build_compact(cfg, in_channels: int, num_classes: int, norm_kwargs: dict) -> CompactResNet:
    return CompactResNet(cfg.n, num_classes, width=cfg.width, norm=cfg.norm, in_channels=in_channels,
                         norm_kwargs=norm_kwargs, activation=cfg.activation, dropout=cfg.dropout)
