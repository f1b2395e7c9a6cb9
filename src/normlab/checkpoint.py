"""Checkpoints: weights + config + optimizer + RNG + progress, written atomically, read safely.

Every checkpoint is loaded with ``torch.load(weights_only=True)``: nothing in it is unpickled as code.
Checkpoints are read onto the CPU by default; the caller moves what it needs to its device (RNG states
must stay CPU tensors whatever device a run uses).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.config import TrainConfig, make_config
from normlab.device import unwrap
from normlab.errors import NormlabError
from normlab.io import save_torch


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu_byte(t: torch.Tensor) -> torch.Tensor:
    # torch.set_rng_state / cuda.set_rng_state_all take CPU ByteTensors only, whatever device was mapped to
    return t.detach().to("cpu", torch.uint8) if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNGs. Tensors may arrive on any device (a checkpoint mapped to a GPU): they are
    brought back to the CPU first. CUDA states are restored for the GPUs both runs have; a checkpoint
    written without GPUs leaves the CUDA generators as seeded."""
    py = state["python"]
    random.setstate((int(py[-1]), tuple(int(v) for v in py[:-1]), None))
    n = state["numpy"]
    keys = n["keys"].detach().cpu().numpy() if isinstance(n["keys"], torch.Tensor) else np.asarray(n["keys"])
    np.random.set_state(("MT19937", keys.astype(np.uint32), int(n["pos"]), int(n["has_gauss"]), float(n["cached"])))
    torch.set_rng_state(_cpu_byte(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(list(cuda)[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_cpu_byte(s), i)


def save_checkpoint(path: Path, model: nn.Module, cfg: TrainConfig, **extra: Any) -> None:
    state = {"model": unwrap(model).state_dict(), "config": cfg.to_dict(), "format": 1, **extra}
    save_torch(path, state)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise NormlabError(f"checkpoint {path} not found: train the run first or check the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...
        first = (str(exc).strip().splitlines() or [""])[0][:120]  # some errors (empty file) have no message
        raise CheckpointUnreadable(path, f"{type(exc).__name__}{': ' + first if first else ''}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointUnreadable(path, "no model/config inside")
    return ckpt


class CheckpointUnreadable(NormlabError):
    """A checkpoint file that is truncated, damaged or not normlab's; ``reason`` says what the reader saw."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"checkpoint {path} cannot be read ({reason}); it is truncated or not a normlab checkpoint: "
                         f"retrain the run (`normlab train --resume {self.path.parent} --force` starts it over with "
                         "its saved settings)")


def config_of(ckpt: dict[str, Any]) -> TrainConfig:
    return make_config(ckpt["config"], where="checkpoint config")


def load_weights(model: nn.Module, ckpt: dict[str, Any], path: str | Path = "checkpoint") -> None:
    """Load weights, naming the mismatch (other depth, norm or class count) instead of a raw traceback.

    ``load_state_dict`` copies into the model's own tensors, so a CPU-mapped checkpoint lands on whatever
    device the model is on."""
    target = unwrap(model)
    own, theirs = target.state_dict(), ckpt["model"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    if missing or unexpected or shapes:
        saved = ckpt.get("config", {})
        what = (f"saved model norm={saved.get('norm')!r} n={saved.get('n')} "
                f"shortcut={saved.get('shortcut')!r}")
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"shape mismatch at {shapes[:2]}")
        raise NormlabError(f"checkpoint {path} does not fit this model ({what}; {detail}): "
                           "use the config saved with the checkpoint or pick the matching run")
    target.load_state_dict(theirs)
