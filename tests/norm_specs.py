"""What every norm IS, as one table: its factory, an independent reference, tolerances and its traits.

``tests/test_catalogue.py`` is parameterized over ``SPECS``; adding a norm adds a row here. A reference is a
module built from our layer's settings, with our layer's state copied into it (``Spec.reference(ours)``):
PyTorch's own layer where one exists (``source="torch"``), timm's where timm has one (``"timm"``), otherwise
the paper's equations written here, separately from the layer (``"paper"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from normlab.norms import make_norm


@dataclass(frozen=True)
class Spec:
    name: str
    factory: Callable[..., nn.Module]  # (num_channels) -> our layer
    reference: Callable[[nn.Module], nn.Module]  # our layer -> an independent module with the same state
    source: str  # torch | timm | paper
    batch_stats: bool = False  # statistics over the batch: running statistics, eval differs from training
    sync: bool = False  # statistics synchronised over ranks
    has_act: bool = False  # contains its activation
    atol: float = 1e-5
    rtol: float = 1e-4
    grads: dict[str, str] = field(default_factory=dict)  # our parameter -> the reference's, where names differ
    running: tuple[str, ...] = ()  # buffers the reference updates too
    override: bool = False  # a spec with a hand-fused override (normlab.norms.override): both paths are tested


def copy_state(dst: nn.Module, src: nn.Module, rename: dict[str, str] | None = None) -> nn.Module:
    """``dst`` with every tensor of ``src``'s state whose (renamed) name it has; returns ``dst``."""
    rename = rename or {}
    have = dict(dst.state_dict())
    with torch.no_grad():
        for name, t in src.state_dict().items():
            name = rename.get(name, name)
            if name in have and have[name].shape == t.shape:
                have[name].copy_(t)
    return dst.to(next(iter(src.state_dict().values())).dtype).train(src.training)


# ---------------------------------------------------------------------- the paper's equations, written apart


class RefBIN(nn.Module):
    """BIN (Nam & Kim 2018): γ(ρ·BN(x) + (1−ρ)·IN(x)) + β, with native BN and IN and ρ clamped to [0, 1]."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias, self.rho = (nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)),
                                            nn.Parameter(torch.ones(c)))
        self.bn = nn.BatchNorm2d(c, affine=False)

    def forward(self, x):
        rho = self.rho.clamp(0, 1).view(1, -1, 1, 1)
        mix = rho * self.bn(x) + (1 - rho) * F.instance_norm(x, eps=1e-5)
        return mix * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _bn_update(module, mean, var, n):
    with torch.no_grad():
        m = module.momentum
        module.running_mean.mul_(1 - m).add_(m * mean)
        module.running_var.mul_(1 - m).add_(m * var * n / (n - 1))


class _RefRunning(nn.Module):
    def __init__(self, c: int, eps: float, momentum: float) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def affine(self, xhat):
        return xhat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    def eval_bn(self, x):
        return self.affine((x - self.running_mean.view(1, -1, 1, 1)) / torch.sqrt(self.running_var.view(1, -1, 1, 1) + self.eps))


class RefBRN(_RefRunning):
    """Batch Renorm, Ioffe 2017, Algorithm 1 (r, d without gradient), r_max/d_max opened linearly over warm-up."""

    def __init__(self, c, eps, momentum, r_max, d_max, warmup):
        super().__init__(c, eps, momentum)
        self.r_max, self.d_max, self.warmup = r_max, d_max, warmup

    def forward(self, x):
        if not self.training:
            return self.eval_bn(x)
        t = float(self.num_batches_tracked)
        ramp = min(1.0, t / self.warmup) if self.warmup else 1.0
        r_max, d_max = 1 + (self.r_max - 1) * ramp, self.d_max * ramp
        mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        sigma_b = torch.sqrt(var + self.eps)
        sigma = torch.sqrt(self.running_var + self.eps)
        r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
        d = ((mu - self.running_mean) / sigma).clamp(-d_max, d_max).detach()
        v = (1, -1, 1, 1)
        y = self.affine((x - mu.view(v)) / sigma_b.view(v) * r.view(v) + d.view(v))
        _bn_update(self, mu.detach(), var.detach(), x.numel() // x.shape[1])
        self.num_batches_tracked += 1
        return y


class RefGBN(_RefRunning):
    """Ghost BN, Hoffer et al. 2017: native batch_norm on each chunk of ``vb`` samples; running statistics from
    the mean over chunks of their mean and unbiased variance."""

    def __init__(self, c, eps, momentum, vb):
        super().__init__(c, eps, momentum)
        self.vb = vb

    def forward(self, x):
        if not self.training:
            return self.eval_bn(x)
        chunks = x.split(self.vb)
        ys = [F.batch_norm(ch, None, None, self.weight, self.bias, True, 0.0, self.eps) for ch in chunks]
        means = torch.stack([ch.mean((0, 2, 3)) for ch in chunks])
        uvars = torch.stack([ch.var((0, 2, 3), unbiased=True) for ch in chunks])
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * means.mean(0))
            self.running_var.mul_(1 - m).add_(m * uvars.mean(0))
        self.num_batches_tracked += 1
        return torch.cat(ys)


class RefSN(_RefRunning):
    """Switchable Norm, Luo et al. 2019: softmax-weighted IN, LN, BN means and (biased) variances computed
    directly with mean/var over each pattern; BN's running statistics in eval."""

    def __init__(self, c, eps, momentum):
        super().__init__(c, eps, momentum)
        self.mean_weight, self.var_weight = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))

    def forward(self, x):
        n, c = x.shape[:2]
        m_in, v_in = x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)
        m_ln, v_ln = x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), unbiased=False, keepdim=True)
        if self.training:
            m_bn, v_bn = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
            _bn_update(self, m_bn.detach().flatten(), v_bn.detach().flatten(), x.numel() // c)
            self.num_batches_tracked += 1
        else:
            m_bn, v_bn = self.running_mean.view(1, -1, 1, 1), self.running_var.view(1, -1, 1, 1)
        wm, wv = torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)
        mean = wm[0] * m_in + wm[1] * m_ln + wm[2] * m_bn
        var = wv[0] * v_in + wv[1] * v_ln + wv[2] * v_bn
        return self.affine((x - mean) / torch.sqrt(var + self.eps))


class RefRMS(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) over (C, H, W) per sample, per-channel affine."""

    def __init__(self, c, eps):
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        rms = torch.sqrt(x.pow(2).mean((1, 2, 3), keepdim=True) + self.eps)
        return x / rms * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class RefMeanOnlyBN(_RefRunning):
    """Mean-only BN, Salimans & Kingma 2016 (section 3.1): x minus its batch mean per channel (the running mean
    in eval), then the per-channel affine; running mean and (unused) unbiased variance updated as BN's."""

    def __init__(self, c, momentum):
        super().__init__(c, 0.0, momentum)

    def forward(self, x):
        if not self.training:
            return self.affine(x - self.running_mean.view(1, -1, 1, 1))
        mu = x.mean((0, 2, 3))
        _bn_update(self, mu.detach(), x.var((0, 2, 3), unbiased=False).detach(), x.numel() // x.shape[1])
        self.num_batches_tracked += 1
        return self.affine(x - mu.view(1, -1, 1, 1))


class RefDyT(nn.Module):
    """Dynamic Tanh, Zhu et al. 2025: γ·tanh(α·x) + β."""

    def __init__(self, c):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return torch.tanh(self.alpha * x) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class PlusBias(nn.Module):
    """timm's RmsNorm2d (weight only) followed by our per-channel bias."""

    def __init__(self, inner: nn.Module, c: int):
        super().__init__()
        self.inner, self.bias = inner, nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return self.inner(x) + self.bias.view(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------ timm references


def _timm():
    import timm.layers as tl

    return tl


def _ref_frn(m):
    return copy_state(_timm().FilterResponseNormTlu2d(m.num_channels, eps=m.eps), m)


def _ref_b0(m):
    return copy_state(_timm().EvoNorm2dB0(m.num_channels, eps=m.eps, momentum=m.momentum), m)


def _ref_s0(m):
    return copy_state(_timm().EvoNorm2dS0(m.num_channels, groups=m.num_groups, eps=m.eps), m)


def _ref_ln2d(m):
    return copy_state(_timm().LayerNorm2d(m.num_channels, eps=m.eps), m)


def _ref_rms2d(m):
    return copy_state(PlusBias(_timm().RmsNorm2d(m.num_channels, eps=m.eps), m.num_channels), m,
                      {"weight": "inner.weight"})


def _native_bn(m):
    return copy_state(nn.BatchNorm2d(m.num_channels, eps=m.eps, momentum=m.momentum), m)


SPECS: list[Spec] = [
    # the existing norms: native torch references
    Spec("bn", lambda c: make_norm("bn", c), _native_bn, "torch", batch_stats=True, sync=True,
         running=("running_mean", "running_var"), override=True),
    Spec("torch_bn", lambda c: make_norm("torch_bn", c),
         lambda m: copy_state(nn.BatchNorm2d(m.num_features), m), "torch", batch_stats=True,
         running=("running_mean", "running_var")),
    Spec("in", lambda c: make_norm("in", c), lambda m: copy_state(nn.InstanceNorm2d(m.num_channels, affine=True), m),
         "torch", override=True),
    Spec("ln", lambda c: make_norm("ln", c), lambda m: copy_state(nn.GroupNorm(1, m.num_channels), m), "torch",
         override=True),
    Spec("gn", lambda c: make_norm("gn", c, num_groups=4), lambda m: copy_state(nn.GroupNorm(4, m.num_channels), m),
         "torch", override=True),
    Spec("bin", lambda c: make_norm("bin", c), lambda m: copy_state(RefBIN(m.num_channels), m, {
        "running_mean": "bn.running_mean", "running_var": "bn.running_var",
        "num_batches_tracked": "bn.num_batches_tracked"}), "torch", batch_stats=True, sync=True,
         override=True),
    Spec("nn", lambda c: make_norm("nn", c), lambda m: nn.Identity(), "torch"),
    # the catalogue
    Spec("frn", lambda c: make_norm("frn", c), _ref_frn, "timm", has_act=True),
    Spec("evonorm_b0", lambda c: make_norm("evonorm_b0", c), _ref_b0, "timm", batch_stats=True, sync=True,
         has_act=True, running=("running_var",)),
    Spec("evonorm_s0", lambda c: make_norm("evonorm_s0", c, num_groups=4), _ref_s0, "timm", has_act=True),
    Spec("sn", lambda c: make_norm("sn", c),
         lambda m: copy_state(RefSN(m.num_channels, m.eps, m.momentum), m), "paper", batch_stats=True, sync=True,
         running=("running_mean", "running_var")),
    Spec("brn", lambda c: make_norm("brn", c, r_max=1.5, d_max=0.3, warmup=2),
         lambda m: copy_state(RefBRN(m.num_channels, m.eps, m.momentum, m.r_max, m.d_max, m.warmup), m), "paper",
         batch_stats=True, sync=True, running=("running_mean", "running_var")),
    Spec("gbn", lambda c: make_norm("gbn", c, virtual_batch=2),
         lambda m: copy_state(RefGBN(m.num_channels, m.eps, m.momentum, m.virtual_batch), m), "paper",
         batch_stats=True, running=("running_mean", "running_var")),
    Spec("rms", lambda c: make_norm("rms", c), lambda m: copy_state(RefRMS(m.num_channels, m.eps), m), "paper"),
    Spec("ln2d", lambda c: make_norm("ln2d", c), _ref_ln2d, "timm"),
    Spec("rms2d", lambda c: make_norm("rms2d", c), _ref_rms2d, "timm", grads={"weight": "inner.weight"}),
    Spec("dyt", lambda c: make_norm("dyt", c), lambda m: copy_state(RefDyT(m.num_channels), m), "paper"),
    Spec("mobn", lambda c: make_norm("mobn", c), lambda m: copy_state(RefMeanOnlyBN(m.num_channels, m.momentum), m),
         "paper", batch_stats=True, sync=True, running=("running_mean", "running_var")),
]

BY_NAME = {s.name: s for s in SPECS}
