"""The registered norms, by name, as ``module:attribute`` import paths: the one list a new norm is added to.

``normlab.norms.NORMS`` resolves it to the layer classes (importing torch); ``registry.NORM_NAMES`` reads the
names without importing torch, so the configuration and the command line offer every norm. Plain strings, so
this module imports nothing. The order is the order of every listing (``--help``, studies, reports).

``BATCH_STATISTICS`` names the norms that normalize with statistics over the batch and keep running estimates
for eval (built with their defaults): what ``config`` asks, without torch, to refuse a batch of one. The layers
answer the same question themselves (``normlab.norms.traits.uses_batch_statistics``); a test checks the two for
every norm above, so a new norm with batch statistics that is not listed here fails it.
"""

from __future__ import annotations

NORM_PATHS: dict[str, str] = {
    # the seven of the course
    "bn": "normlab.norms.batch:BatchNorm2d",
    "in": "normlab.norms.instance:InstanceNorm2d",
    "bin": "normlab.norms.batch_instance:BatchInstanceNorm2d",
    "ln": "normlab.norms.layer:LayerNorm2d",
    "gn": "normlab.norms.group:GroupNorm2d",
    "nn": "normlab.norms.none:NoNorm2d",
    "torch_bn": "normlab.norms.native:torch_batch_norm",
    # the catalogue
    "frn": "normlab.norms.frn:FilterResponseNorm2d",
    "evonorm_b0": "normlab.norms.evonorm:EvoNormB0",
    "evonorm_s0": "normlab.norms.evonorm:EvoNormS0",
    "sn": "normlab.norms.switchable:SwitchableNorm2d",
    "brn": "normlab.norms.batch_renorm:BatchRenorm2d",
    "gbn": "normlab.norms.ghost:GhostBatchNorm2d",
    "rms": "normlab.norms.rms:RMSNorm2d",
    "ln2d": "normlab.norms.channel:ChannelLayerNorm2d",
    "rms2d": "normlab.norms.channel:ChannelRMSNorm2d",
    "dyt": "normlab.norms.dyt:DynamicTanh2d",
    "mobn": "normlab.norms.mean_only:MeanOnlyBatchNorm2d",
}

BATCH_STATISTICS: frozenset[str] = frozenset({"bn", "bin", "torch_bn", "evonorm_b0", "sn", "brn", "gbn"})

__all__ = ["BATCH_STATISTICS", "NORM_PATHS"]
