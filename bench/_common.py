"""Helpers shared by the bench scripts: machine facts, interleaved timing, statistics, saved-tensor bytes."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    from normlab.device import cpu_name

    cpu = cpu_name()
    import os

    import torchvision

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "platform": platform.platform(),
            "cpu_features": cpu_features(), "date": time.strftime("%Y-%m-%d")}


def cpu_features() -> list[str]:
    """The CPU's vector and matrix extensions that decide convolution speed per precision (from
    /proc/cpuinfo): AVX-512, AVX-512 BF16, AMX. Benchmarks from machines that differ here differ a lot
    (bf16 on AMX vs on AVX-512 BF16 alone)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict, digits: int = 3, scale: float = 1.0) -> str:
    return (f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})")


def timed(fn, steps: int) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls."""
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def saved_bytes(run) -> int:
    """Bytes of the distinct tensor storages autograd saves for backward while ``run()`` builds the graph.

    This is the activation memory a training step holds at its peak (the end of the forward pass),
    the part a norm layer decides; parameters, gradients and optimizer state are identical on both
    sides of a comparison. Storages are counted once even when saved by several ops.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001 - e.g. a tensor subclass without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values())


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=1))
    return path


def command() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).relative_to(Path.cwd())) if Path(sys.argv[0]).is_absolute()
                                 and Path.cwd() in Path(sys.argv[0]).parents else sys.argv[0], *sys.argv[1:]])
