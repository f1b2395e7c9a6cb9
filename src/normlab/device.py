"""Where and how a model runs: device choice, autocast, the CPU's name, and the plain module under wrappers.

Below both ``train/`` and ``analysis/``: both pick devices and unwrap models, neither imports the other.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch
from torch import nn

from normlab.errors import NormlabError


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def pick_device(name: str) -> torch.device:
    """``auto`` prefers CUDA, then Apple's MPS, then the CPU; an unavailable explicit choice is an error.

    ``cuda:K`` names one GPU (its index counts within ``CUDA_VISIBLE_DEVICES``)."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise NormlabError(f"device={name!r} is not a device: use auto, cpu, cuda, cuda:K or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise NormlabError("device=cuda but no CUDA GPU is visible: use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise NormlabError(f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible "
                               "(indices count within CUDA_VISIBLE_DEVICES): pick another index")
    if dev.type == "mps" and not has_mps:
        raise NormlabError("device=mps but Apple's MPS backend is not available: use --device cpu (or auto)")
    return dev


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; the normlab norms compute their statistics in float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel (``.module``) and torch.compile / normlab's compile
    fallback (``._orig_mod``) wrappers, in any nesting order."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
