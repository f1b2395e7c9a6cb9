"""Experiment: the norm Functions in the working tree vs an older revision (``git show REV:...``), one layer.

Forward + backward of BatchNormFunction and GroupNormFunction (G=8) on ResNet-20's map shapes, NCHW and
channels_last, 1 thread, 30 interleaved rounds; prints median ms and the median per-round ratio new/old.

    python bench/exp_ab_functional.py [--rev 3102f75]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import normlab.norms._functional as new

ROOT = Path(__file__).resolve().parents[1]


def old_module(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:src/normlab/norms/_functional.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_functional.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_functional", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fn(mod, kind, c):
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    if kind == "bn":
        return lambda x: mod.BatchNormFunction.apply(x, w, b, None, None, 0.1, 1e-5, False)
    return lambda x: mod.GroupNormFunction.apply(x, w, b, 8, 1e-5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="3102f75", help="the revision before the buffer reuse")
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(1)
    old = old_module(a.rev)
    for fm in ("NCHW", "channels_last"):
        for shape in [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]:
            x = torch.randn(shape)
            if fm == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            dy = torch.randn_like(x)
            for kind in ("bn", "gn"):
                fs = {"old": fn(old, kind, shape[1]), "new": fn(new, kind, shape[1])}
                ts = {k: [] for k in fs}
                for r in range(a.rounds):
                    for k in (("old", "new") if r % 2 else ("new", "old")):
                        t = time.perf_counter()
                        fs[k](x).backward(dy)
                        ts[k].append(time.perf_counter() - t)
                ratios = [n / o for n, o in zip(ts["new"], ts["old"])]
                print(f"{fm:>13} {str(shape):>18} {kind}: old {statistics.median(ts['old']) * 1e3:.2f} ms  "
                      f"new {statistics.median(ts['new']) * 1e3:.2f} ms  new/old {statistics.median(ratios):.3f} "
                      f"({min(ratios):.3f}–{max(ratios):.3f})", flush=True)


if __name__ == "__main__":
    main()
