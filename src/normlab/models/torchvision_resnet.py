"""``--model resnet18``: torchvision's ResNet-18 with any norm, and its pretrained weights.

* For inputs of 32x32 or less the stem is a 3x3 stride-1 conv without max-pool; for other than 3 input
  channels ``conv1`` is rebuilt (pretrained 7x7 RGB filters are summed over the channels for 1-channel
  inputs; a 3x3 small-input stem keeps its random initialisation).
* ``--pretrained PATH|imagenet``: a local torchvision-resnet18 state_dict (read with
  ``torch.load(weights_only=True)``; the ``fc`` layer is skipped when the class count differs), or
  torchvision's ``ResNet18_Weights.IMAGENET1K_V1`` (downloaded, so it needs internet or a filled
  torch hub cache).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.hub import load_state_dict_from_url

from normlab.config import IMAGENET
from normlab.errors import NormlabError
from normlab.models.swap import norm_paths, norm_swaps, replace_norms

SMALL_INPUT = 32  # inputs up to this size get the CIFAR-style stem


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


def build_resnet18(cfg, in_channels: int, num_classes: int, norm_kwargs: dict, image_size: int | None = None) -> nn.Module:
    """``--model resnet18``: norms are swapped in after any weights are loaded (the weights are BN's)."""
    from normlab.norms import norm_layer

    factory = norm_layer(cfg.norm, **norm_kwargs)
    model = resnet18(num_classes, in_channels, image_size or cfg.input_size)
    pretrained = load_pretrained(model, cfg.pretrained) if getattr(cfg, "pretrained", None) else None
    stock = norm_paths(model)
    model = replace_norms(model, factory)
    model.normlab_swaps = {**norm_swaps(stock, model, (type(factory(16)),)), "via": "replace_norms"}
    if pretrained is not None:
        model.normlab_pretrained = pretrained
    return model
