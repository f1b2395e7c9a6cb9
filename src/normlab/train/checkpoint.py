"""Kept for imports written before the move: checkpoints live in :mod:`normlab.checkpoint`."""

from normlab.checkpoint import config_of, load_checkpoint, load_weights, rng_state, save_checkpoint, set_rng_state
from normlab.device import unwrap

__all__ = ["config_of", "load_checkpoint", "load_weights", "rng_state", "save_checkpoint", "set_rng_state", "unwrap"]
