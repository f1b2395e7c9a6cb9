"""The registered norms, by name, as ``module:attribute`` import paths: the one list a new norm is added to.

``normlab.norms.NORMS`` resolves it to the layer classes (importing torch); ``registry.NORM_NAMES`` reads the
names without importing torch, so the configuration and the command line offer every norm. Plain strings, so
this module imports nothing. The order is the order of every listing (``--help``, studies, reports).

Whether a norm normalizes with batch statistics is the layer's own answer (``normlab.norms.traits``), not a
second list here: a new norm is one line.
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

__all__ = ["NORM_PATHS"]
