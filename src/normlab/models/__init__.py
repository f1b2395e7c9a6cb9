"""Models, one job per module: ``resnet`` (the CIFAR-style 6n+2 ResNet), ``compact`` (its narrow family),
``torchvision_resnet`` (ResNet-18 with any norm, pretrained weights), ``timm_models`` (``--model timm:<name>``),
``swap`` (``replace_norms`` for any model) and ``build`` (a model from a run config: family, head, budget,
freezing)."""

from __future__ import annotations

from normlab.models.build import build_model, check_model
from normlab.models.resnet import BasicBlock, ResNet, count_parameters, count_weighted_layers
from normlab.models.swap import replace_norms
from normlab.registry import ACTIVATIONS

__all__ = ["ACTIVATIONS", "BasicBlock", "ResNet", "build_model", "check_model", "count_parameters", "count_weighted_layers",
           "replace_norms"]
