"""Run-time choices made once per run: device, threads, precision, torch.compile (the run folder's lock
lives with the run folder: ``normlab.runlock``)."""

from __future__ import annotations

import os
import platform
import warnings
from dataclasses import dataclass

import torch
from torch import nn


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def tune_malloc() -> bool:
    """Keep freed memory in the process for reuse (glibc): no page faults in every training step.

    By default glibc hands large freed blocks back to the OS (trim, or munmap for blocks it mmapped) and
    faults them in again, zero-filled, at the next allocation: a ResNet-20 step then takes thousands of
    minor page faults, more or fewer depending on where its tensors happened to land, and runs measurably
    longer. With this tuning blocks up to 32 MB come from the heap and the heap is never trimmed below 1 GB
    of free space; larger blocks are still mmapped. Returns
    True when applied (Linux with glibc, and ``NORMLAB_MALLOC`` is not 0).
    """
    if os.environ.get("NORMLAB_MALLOC", "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    if platform.system() != "Linux":
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt  # absent on musl and other libcs
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling on CUDA; bf16 (same exponent range as fp32) does not. (On CPU, fp16
    autocast runs without one: CPU fp16 is rare and slow, and the scaler's CPU path is new in torch.)

    No host sync: normlab's optimizers are fused (``registry.fused_step``), so ``GradScaler.step`` hands them
    its found-inf flag as a tensor and an overflowed step is skipped on the device. (With any other
    optimizer the scaler reads the flag with ``.item()`` in every step.)"""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


@dataclass(frozen=True)
class CompileSettings:
    """How a run compiles its model (``compile_settings``)."""

    enabled: bool
    mode: str | None = None  # torch.compile's mode; None = its default (inductor, no CUDA graphs)
    cuda_graphs: bool = False  # the mode records CUDA graphs: the step must mark where each step begins


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_settings(choice: str, device: torch.device, distributed: bool = False) -> CompileSettings:
    """``--compile on``, or ``auto`` on CUDA (where an eager step of the from-scratch norms is launch-bound),
    compiles; ``auto`` stays eager on CPU and MPS (on a CPU the compile costs tens of seconds before the
    first step for a small gain per step). ``NORMLAB_COMPILE_MODE`` picks torch.compile's mode (``default``,
    ``reduce-overhead``, ``max-autotune``, ``max-autotune-no-cudagraphs``).

    CUDA graphs (``reduce-overhead``) are opt-in, not the default: the graph trees allow the in-place
    updates of BN running statistics (module buffers have static addresses), and shapes are static (the
    last, shorter batch of an epoch gets its own graph, recorded once), but normlab's custom autograd
    Functions have not been run under graph replay on a GPU yet, and a replay that overwrites a tensor
    still in use fails late, past the compile fallback. Under DDP they are never used (its gradient
    all-reduce hooks run outside the graph)."""
    enabled = choice == "on" or (choice == "auto" and device.type == "cuda")
    if not enabled:
        return CompileSettings(False)
    mode = os.environ.get("NORMLAB_COMPILE_MODE", "").strip() or None
    if mode == "default":
        mode = None
    if mode in CUDA_GRAPH_MODES and (device.type != "cuda" or distributed):
        mode = None if mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
    return CompileSettings(True, mode, mode in CUDA_GRAPH_MODES)


def maybe_compile(model: nn.Module, mode: str, device: torch.device, log=print,
                  settings: CompileSettings | None = None) -> nn.Module:
    """``torch.compile`` the model as :func:`compile_settings` decides for ``mode`` (on | auto | off), falling
    back to eager with a warning when no compiler works here.

    ``torch.compile`` itself never fails for a missing toolchain: errors surface at the first call. So
    the fallback is made real twice: (1) a tiny function is compiled *and run* on ``device`` first
    (catches a missing or broken C++ compiler / Triton in seconds, before the model is traced), and
    (2) the compiled model is wrapped so that if its first call fails inside the compiler, the run
    continues eager with the same warning instead of crashing.

    ``dynamic=False``: a run sees two batch shapes (full batches and the epoch's last, shorter one); two
    static graphs, each compiled once, beat one dynamic-shape graph used for every step.
    """
    settings = settings or compile_settings(mode, device)
    if not settings.enabled:
        return model
    try:
        torch.compile(_probe, fullgraph=True)(torch.ones(8, device=device))
        compiled = torch.compile(model, mode=settings.mode, dynamic=False)
    except Exception as exc:  # noqa: BLE001 - any toolchain failure means "run eager"
        _fallback_warning(exc, log)
        return model
    return _CompileFallback(model, compiled, log)


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2 + 1


def _fallback_warning(exc: BaseException, log) -> None:
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    warnings.warn(f"torch.compile does not work here ({type(exc).__name__}: {first}); running eager",
                  RuntimeWarning, stacklevel=3)
    log(f"warning: torch.compile failed ({type(exc).__name__}: {first}); running eager")


class _CompileFallback(nn.Module):
    """Calls the compiled model; if the *first* call fails in the compiler, warns and stays eager.

    An error on the first call is retried eagerly: if eager fails too, that (the user's) error is raised.
    Only the first call is guarded, so later errors are never masked. Parameters and buffers are the
    eager model's (``.model``), shared with the compiled wrapper.
    """

    def __init__(self, model: nn.Module, compiled: nn.Module, log=print) -> None:
        super().__init__()
        self.model = model
        self._compiled = [compiled]  # a list: not registered as a submodule twice
        self._log = log
        self._checked = False

    @property
    def _orig_mod(self) -> nn.Module:  # what checkpoint.unwrap looks for
        return self.model

    def forward(self, *args, **kwargs):
        if self._checked:
            return self._compiled[0](*args, **kwargs)
        try:
            out = self._compiled[0](*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            out = self.model(*args, **kwargs)  # raises the real error if the input itself is bad
            _fallback_warning(exc, self._log)
            self._compiled[0] = self.model
        self._checked = True
        return out
