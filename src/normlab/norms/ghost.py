"""Ghost Batch Normalization (Hoffer et al. 2017) as a spec: BN statistics per virtual batch."""

from __future__ import annotations

import torch

from normlab.errors import NormlabError
from normlab.norms._functional import init_affine
from normlab.norms.spec import RunningStats, SpecNorm, Stats, positive

DEFAULT_GHOST = 32


class GhostBatchNorm2d(RunningStats, SpecNorm):
    """BN whose training statistics are computed per ghost batch of ``virtual_batch`` consecutive samples (a
    batch of at most ``virtual_batch`` samples is one ghost batch: plain BN; a smaller last ghost batch, e.g. an
    epoch's last batch, is normalized on its own). The running statistics are updated once per call with the
    mean over the ghost batches of their means and unbiased variances; eval uses them. Ghost batches are a
    rank's own, so there is no ``sync``. ``normlab train`` refuses a batch size that is not a multiple of
    ``--ghost-batch``.

    Test-time statistics (``normlab robustness``): re-estimation runs training-mode forwards, so the running
    statistics become the cumulative mean over the corrupted set's ghost batches of their statistics; the
    prior-weighted mix combines the running statistics with the same estimate from the evaluation batch (the
    mean over its ghost batches); the batch-statistics sweep normalizes per ghost batch, as in training (an
    evaluation batch above ``virtual_batch`` is cut into ghost batches).
    """

    batch_stats = True

    def __init__(self, num_channels: int, virtual_batch: int | None = None, eps: float = 1e-5,
                 momentum: float | None = 0.1, *, device=None, dtype=None) -> None:
        super().__init__()
        vb = DEFAULT_GHOST if virtual_batch is None else virtual_batch
        if isinstance(vb, bool) or not isinstance(vb, int) or vb < 1:
            raise NormlabError(f"GhostBatchNorm: virtual_batch must be a whole number >= 1, got {vb!r}; use "
                               "--ghost-batch 8, 16, 32, ...")
        positive("GhostBatchNorm", "eps", eps)
        self.num_channels = self.num_features = num_channels
        self.virtual_batch, self.eps = vb, eps
        init_affine(self, num_channels, device=device, dtype=dtype)
        self.init_running(num_channels, momentum, device)

    def batch_moments(self, stats: Stats):
        """Statistics per ghost batch of ``virtual_batch`` samples."""
        return stats.moments("batch", ghost=self.virtual_batch)

    def coefficients(self, stats: Stats):
        if not self.training:
            a = self.weight * torch.rsqrt(self.running_var.to(stats.ct) + self.eps)
            return a, stats.offset(self.running_mean), self.bias
        m = self.batch_moments(stats)
        self.update_running(m)
        return self.weight * torch.rsqrt(m.var + self.eps), m.centre, self.bias

    def extra_repr(self) -> str:
        return f"{self.num_channels}, virtual_batch={self.virtual_batch}, eps={self.eps}, momentum={self.momentum}"
