"""Mean-only batch normalization (Salimans & Kingma 2016) as a spec: the batch mean subtracted, no division."""

from __future__ import annotations

from normlab.norms._functional import init_affine
from normlab.norms.spec import RunningStats, SpecNorm, Stats


class MeanOnlyBatchNorm2d(RunningStats, SpecNorm):
    """``y = γ·(x − μ_B) + β`` with ``μ_B`` each channel's mean over (N, H, W): the "mean-only batch
    normalization" that Salimans & Kingma pair with weight normalization (their layer is γ = 1, the scale coming
    from the weight-normalized conv; γ is kept here so the layer has the per-channel affine every normlab norm
    has). Eval subtracts the running mean. The running variance is tracked as BN tracks it (unused by the
    output), so test-time statistics (``normlab robustness``) treat the layer as they treat BN. ``sync=True``
    takes the mean over every rank's batch."""

    batch_stats = True

    def __init__(self, num_channels: int, momentum: float | None = 0.1, *, sync: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.num_channels = self.num_features = num_channels
        self.sync = sync
        init_affine(self, num_channels, device=device, dtype=dtype)
        self.init_running(num_channels, momentum, device)

    def coefficients(self, stats: Stats):
        if not self.training:
            return self.weight, stats.offset(self.running_mean), self.bias
        m = self.batch_moments(stats)
        self.update_running(m)
        return self.weight, m.centre, self.bias

    def extra_repr(self) -> str:
        return f"{self.num_channels}, momentum={self.momentum}, sync={self.sync}"
