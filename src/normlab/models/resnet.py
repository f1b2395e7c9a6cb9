"""The CIFAR-style ResNet of He et al. 2016, §4.2: 6n+2 weighted layers, any norm plugged in.

Layout (for a 32×32 input): a 3×3 conv stem (16 filters) + norm + ReLU, then three stages of n basic
blocks at 16/32/64 filters on 32×32/16×16/8×8 maps, global average pooling and one fully connected
layer. The first block of stages 2 and 3 down-samples with a stride-2 conv. Nothing depends on the
input size, so 28×28 (Fashion-MNIST) and 256×256 (birds: stage maps 256/128/64) work unchanged.

Parameter counts with BatchNorm and option-A shortcuts (the paper's table, 10 classes):

    =========  ===  ========  ==========
    model       n   layers    params
    =========  ===  ========  ==========
    ResNet-20   3   20        0.27M
    ResNet-32   5   32        0.46M
    ResNet-44   7   44        0.66M
    ResNet-56   9   56        0.85M
    =========  ===  ========  ==========

``tests/test_models.py`` checks this table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import NormlabError
from normlab.norms._hooks import HookWatched
from normlab.registry import ACTIVATIONS, SHORTCUTS, ReLU

NormLayer = Callable[[int], nn.Module]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by a norm (or, for "nn", by nothing that needs one -- the
    # paper's no-norm baselines also drop it, keeping the parameter budget comparable).
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A: parameter-free identity shortcut; subsample by 2 and zero-pad the new channels."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            half = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra - half))
        return x


def _global_hooks() -> bool:
    """Whether global module hooks (``torch.nn.modules.module.register_module_forward_hook`` & co.) are registered.

    torch has no public way to ask this, nor to learn when one is added or removed (those functions only return a
    handle), so this reads torch's own private test (or, on torch releases that lack it, such as 2.4, the hook
    dicts that test reads), and only when fusion is decided, never per call."""
    from torch.nn.modules import module as m

    test = getattr(m, "_has_any_global_hook", None)
    if test is not None:
        return bool(test())
    return any(getattr(m, name, None) for name in _GLOBAL_HOOK_DICTS)


# what torch's ``_has_any_global_hook`` reads; 2.4 has no ``_with_kwargs`` dict (kwargs hooks are in the others)
_GLOBAL_HOOK_DICTS = ("_global_backward_pre_hooks", "_global_backward_hooks", "_global_forward_pre_hooks",
                      "_global_forward_hooks", "_global_forward_hooks_always_called",
                      "_global_forward_hooks_with_kwargs")


class _Fusing:
    """Mixin for the stem and the blocks: whether forward fuses norm + ReLU (+ residual) is decided once, when
    something it depends on changes, and kept in ``_fusable``; forward only reads it.

    It fuses when ``fuse`` is on, in training mode, when the norms offer ``forward_relu`` and are normlab's
    (hook-watched) norms, the activations are the registry's ``ReLU`` (exactly: a plain ``nn.ReLU`` cannot tell
    anyone of its hooks, so it is never skipped), none of them has a module hook, and no global module hook is
    registered. Decided again on: construction, ``train()``/``eval()``, setting ``fuse``, a layer assigned
    (another norm or activation), a copy or unpickling of the block, and -- told by the layers themselves (see
    ``normlab.norms._hooks``) -- a module hook registered on one of its norms or ReLUs or that hook's handle
    removed. Global hooks cannot be watched: one registered after the decision is seen at the next one (call
    ``model.train()``, or ``decide_fusion()``, after registering it; until then the fused path skips the
    norms' and ReLUs' calls, so it does not fire there)."""

    _fusable: bool = False
    _watch: tuple = ()

    def _fusion_parts(self) -> tuple[tuple[nn.Module, ...], tuple[nn.Module, ...]]:
        """(norms, activations) that the fused path replaces."""
        raise NotImplementedError

    def decide_fusion(self) -> None:
        """Decide (again) whether forward takes the fused path; see the class docstring for when it is called."""
        norms, acts = self._fusion_parts()
        parts = norms + acts
        for old in self._watch:
            if isinstance(old, HookWatched) and not any(old is p for p in parts):
                old.unwatch_hooks(self)  # a layer swapped out no longer reports here
        for part in parts:
            if isinstance(part, HookWatched):
                part.watch_hooks(self)
        self._watch = parts
        self._fusable = bool(self.fuse and self.training
                             and all(isinstance(n, HookWatched) and hasattr(n, "forward_relu") for n in norms)
                             and all(type(a) is ReLU for a in acts)
                             and not any(p.has_hooks() for p in parts)
                             and not _global_hooks())

    @property
    def fuse(self) -> bool:
        return self.__dict__.get("_fuse", True)

    @fuse.setter
    def fuse(self, value: bool) -> None:
        self.__dict__["_fuse"] = bool(value)
        if "_modules" in self.__dict__ and self._modules:
            self.decide_fusion()

    def train(self, mode: bool = True):
        out = super().train(mode)
        self.decide_fusion()
        return out

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if isinstance(value, nn.Module) and getattr(self, "_built", False):
            self.decide_fusion()  # a layer swapped in (e.g. another norm or activation)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.decide_fusion()  # a copy or an unpickled block: its layers do not know it as their owner yet

    def fused(self) -> bool:
        """Whether forward takes the fused norm + ReLU (+ residual) path now."""
        return self._fusable


def _act_after(norm: nn.Module, act: Callable[[], nn.Module]) -> nn.Module:
    """The activation that follows ``norm``: none (``nn.Identity``) when the norm contains its own (``has_act``:
    FRN's TLU, EvoNorm's), as timm's norm+activation convention; the block's ``act`` otherwise."""
    return nn.Identity() if getattr(norm, "has_act", False) else act()


class BasicBlock(_Fusing, nn.Module):
    """Two 3×3 convs, a norm after each, ReLU, and a residual connection around both.

    With ``fuse`` (the default), a norm that offers ``forward_relu`` (normlab's BN, GN, LN, IN and spec norms)
    computes ``relu(norm(x))`` and ``relu(norm(x) + shortcut)`` itself in training: the same values without the
    separate ReLU and add ops and their sweeps over memory. A norm that contains its activation (``has_act``:
    frn, evonorm_b0, evonorm_s0) replaces the norm + ReLU pairs: the ReLU after ``bn1`` (and the stem's) is
    ``nn.Identity``; ``bn2`` keeps its activation and the ReLU after the residual add stays. Not in eval mode, and not while a module hook is
    registered on the norms or ReLUs (feature probes, Grad-CAM, user hooks: they get the unfused modules'
    outputs) or a global module hook was registered when fusion was last decided (see ``_Fusing``).
    """

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: NormLayer, shortcut: str = "A",
                 act: Callable[[], nn.Module] = ACTIVATIONS["relu"], fuse: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = norm_layer(cout)
        self.act1 = _act_after(self.bn1, act)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = norm_layer(cout)
        self.act2 = act()
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(cin, cout, stride)
        else:  # option B: projection
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm_layer(cout))
        self.fuse = fuse
        self._built = True

    def _fusion_parts(self):
        return (self.bn1, self.bn2), (self.act1, self.act2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable:
            out = self.bn1.forward_relu(self.conv1(x))
            return self.bn2.forward_relu(self.conv2(out), self.shortcut(x))
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class Stem(_Fusing, nn.Sequential):
    """The first 3×3 conv, its norm and the activation: an ``nn.Sequential`` (parameters ``stem.0``, ``stem.1``),
    whose norm computes ``relu(norm(x))`` itself in training with ``fuse``, under the same conditions as
    ``BasicBlock``."""

    def __init__(self, conv: nn.Module, norm: nn.Module, act: nn.Module, fuse: bool = True) -> None:
        super().__init__(conv, norm, nn.Identity() if getattr(norm, "has_act", False) else act)
        self.fuse = fuse
        self._built = True

    def _fusion_parts(self):
        return (self[1],), (self[2],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable:
            return self[1].forward_relu(self[0](x))
        return super().forward(x)


class ResNet(nn.Module):
    """CIFAR ResNet with 6n+2 weighted layers and ``num_classes`` outputs.

    ``norm`` is a registry name (``"bn"``, ``"gn"``, ...) or any callable taking the channel count;
    ``norm_kwargs`` (e.g. ``num_groups``, ``sync``) go to the registry factory. ``shortcut`` is
    ``"A"`` (zero padding, the paper's CIFAR choice) or ``"B"`` (1×1 conv + norm). ``fuse``: the stem and
    blocks fuse norm + ReLU (+ residual) in training when the norm supports it (see ``BasicBlock``).
    """

    def __init__(self, n: int, num_classes: int, norm: str | NormLayer = "bn", in_channels: int = 3,
                 widths: tuple[int, ...] = (16, 32, 64), shortcut: str = "A", *,
                 norm_kwargs: dict | None = None, activation: str = "relu", dropout: float = 0.0,
                 fuse: bool = True) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise NormlabError(f"ResNet depth n must be an integer >= 1 (6n+2 layers), got {n!r}: use --n 1, 2, 3, ...")
        if num_classes < 2:
            raise NormlabError(f"num_classes must be >= 2, got {num_classes}")
        if shortcut not in SHORTCUTS:
            raise NormlabError(f"shortcut must be 'A' (zero padding) or 'B' (1x1 conv), got {shortcut!r}")
        if isinstance(norm, str):
            from normlab.norms import norm_layer as registry_norm_layer

            norm_fn: NormLayer = registry_norm_layer(norm, **(norm_kwargs or {}))
        else:
            norm_fn = norm
        act = activation_factory(activation)
        self.n, self.widths = n, tuple(widths)
        self.stem = Stem(_conv3x3(in_channels, widths[0]), norm_fn(widths[0]), act(), fuse)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, w, stride, norm_fn, shortcut, act, fuse))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)  # stages[i] is stage i+1; probes and Grad-CAM hook here
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


def activation_factory(name: str) -> Callable[[], nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise NormlabError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}") from None


def count_weighted_layers(model: nn.Module) -> int:
    """Convs and linear layers on the main path (option-B projection shortcuts excluded, as in the paper)."""
    count = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and ".shortcut" not in name:
            count += 1
    return count


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
