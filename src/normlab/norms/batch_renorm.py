"""Batch Renormalization (Ioffe 2017) as a spec: BN corrected towards the running statistics by r and d."""

from __future__ import annotations

import torch

from normlab.errors import NormlabError
from normlab.norms._functional import init_affine
from normlab.norms.spec import RunningStats, SpecNorm, Stats, positive


class BatchRenorm2d(RunningStats, SpecNorm):
    """``y = γ·((x − μ_B)/σ_B · r + d) + β`` in training, with ``σ_B = sqrt(σ²_B + ε)``, ``σ = sqrt(running_var + ε)``,
    ``r = clip(σ_B/σ, 1/r_max, r_max)`` and ``d = clip((μ_B − running_mean)/σ, −d_max, d_max)``, both treated as
    constants (no gradient), as the paper's Algorithm 1; eval is BN with the running statistics.

    Warm-up: the clip bounds open linearly from (1, 0) -- plain BN -- to (``r_max``, ``d_max``) over the first
    ``warmup`` training steps (counted by ``num_batches_tracked``, read as a tensor: no host sync); ``warmup=0``
    starts at the full bounds. Running statistics as BN's (``momentum``, unbiased batch variance), synced batch
    statistics with ``sync``.

    ``renorm`` (an attribute, True): False switches r and d off (r = 1, d = 0), so the training forward is
    plain BN on the batch statistics. The test-time statistics of ``normlab robustness`` do that on their copy
    of the model: they replace the running statistics r and d correct towards, so the corrections have nothing
    to aim at. Re-estimation then recomputes the running statistics (BN's: the mean and unbiased variance of
    the layer's input) on the corrupted data with BN forwards, the prior-weighted mix normalizes in eval mode
    with the mix of running and evaluation-batch statistics, and the batch-statistics sweep normalizes each
    batch with its own statistics, as BN does.
    """

    batch_stats = True

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1, r_max: float = 3.0,
                 d_max: float = 5.0, warmup: int = 1000, *, sync: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        positive("BatchRenorm", "eps", eps)
        positive("BatchRenorm", "r_max", r_max, minimum=1.0, strict=False)
        positive("BatchRenorm", "d_max", d_max, strict=False)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise NormlabError(f"BatchRenorm: warmup must be a whole number of steps >= 0, got {warmup!r}")
        self.num_channels = self.num_features = num_channels
        self.eps, self.r_max, self.d_max, self.warmup, self.sync = eps, float(r_max), float(d_max), warmup, sync
        self.renorm = True
        init_affine(self, num_channels, device=device, dtype=dtype)
        self.init_running(num_channels, momentum, device)

    def bounds(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) at the current step of the warm-up, as tensors of ``dtype`` (the compute dtype: a
        float64 layer's bounds are not rounded to float32)."""
        step = self.num_batches_tracked.to(dtype)
        ramp = (step / self.warmup).clamp(0, 1) if self.warmup else torch.ones_like(step)
        return 1 + (self.r_max - 1) * ramp, self.d_max * ramp

    def coefficients(self, stats: Stats):
        ct = stats.ct
        if not self.training:
            a = self.weight * torch.rsqrt(self.running_var.to(ct) + self.eps)
            return a, stats.offset(self.running_mean), self.bias
        m = self.batch_moments(stats)
        if not getattr(self, "renorm", True):  # plain BN (a module pickled before the attribute existed: on)
            self.update_running(m)
            return self.weight * torch.rsqrt(m.var + self.eps), m.centre, self.bias
        sigma_b = torch.sqrt(m.var + self.eps)
        with torch.no_grad():
            r_max, d_max = self.bounds(ct)
            sigma = torch.sqrt(self.running_var.to(ct) + self.eps)
            r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)
            d = torch.clamp((m.mean - self.running_mean.to(ct)) / sigma, -d_max, d_max)
        self.update_running(m)
        return self.weight * r / sigma_b, m.centre, self.bias + self.weight * d

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, "
                f"d_max={self.d_max}, warmup={self.warmup}, sync={self.sync}")
