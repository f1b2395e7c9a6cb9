"""Experiment: the C++ norm kernels (and the Functions around them) in the working tree vs an older revision.

The old revision's whole ``src/normlab`` package is extracted (``git archive REV``) into a temp dir and imported
as ``normlab_old`` (its own kernel build: the cache key covers the source), so old and new run in one process,
1 thread, interleaved (old first in even rounds, new first in odd ones). Two tables:

* per layer, forward + backward of bn, bn + ReLU + residual (``forward_relu``), gn (make_norm's default groups),
  in and ln on ResNet-20's stage shapes (batch 128: 16x32x32, 32x16x16, 64x8x8), channels_last and NCHW;
* the kernel calls alone (``_kernels.bn_sums`` forward and masked backward, ``gn_forward``, ``gn_backward``).

Each line: median time of each side and new/old of the medians; last line: the median over lines.

    python bench/exp_ab_kernels.py [--rev main] [--rounds 61] [--reps 10]
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def old_package(rev: str) -> Path:
    """``src/normlab`` at ``rev`` as package ``normlab_old`` in a temp dir (returned: put it on sys.path)."""
    tar = subprocess.run(["git", "archive", rev, "src/normlab"], cwd=ROOT, check=True, capture_output=True).stdout
    out = Path(tempfile.mkdtemp())
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(out)
    pkg = out / "normlab_old"
    (out / "src" / "normlab").rename(pkg)
    for f in pkg.rglob("*.py"):
        s = f.read_text()
        f.write_text(re.sub(r"\b(from|import) normlab\b", r"\1 normlab_old", s))
    return out


def interleaved(f_old, f_new, rounds: int, reps: int) -> tuple[float, float]:
    f_old(), f_new()
    t = {0: [], 1: []}
    for r in range(rounds):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            f = (f_old, f_new)[k]
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            t[k].append((time.perf_counter() - t0) / reps)
    return statistics.median(t[0]), statistics.median(t[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="main")
    ap.add_argument("--rounds", type=int, default=61)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(old_package(a.rev)))
    import normlab.norms as new
    import normlab_old.norms as old
    from normlab.norms import _kernels as kn
    from normlab_old.norms import _kernels as ko

    assert kn.library() is not None and ko.library() is not None, "kernels did not build"
    layer, kern = [], []
    for cl in (True, False):
        for c, s in ((16, 32), (32, 16), (64, 8)):
            g = torch.Generator().manual_seed(0)
            x, dy, res = (torch.randn(128, c, s, s, generator=g) for _ in range(3))
            if cl:
                x, dy, res = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy, res))
            x.requires_grad_()
            tag = f"{'CL  ' if cl else 'NCHW'} {c:2d}x{s:2d}x{s:2d}"
            for name in ("bn", "bn+relu+res", "gn", "in", "ln"):
                ms = [pkg.make_norm(name.split("+")[0], c) for pkg in (old, new)]

                def step(m, name=name):
                    x.grad = None
                    (m.forward_relu(x, res) if "relu" in name else m(x)).backward(dy)

                to, tn = interleaved(lambda: step(ms[0]), lambda: step(ms[1]), a.rounds, a.reps)
                layer.append(tn / to)
                print(f"layer  {tag} {name:17s} old {to * 1e3:7.3f} ms  new {tn * 1e3:7.3f} ms  new/old {tn / to:.3f}",
                      flush=True)
            xd, y = x.detach(), res
            fmt = kn.layout(xd)
            mean, rstd = torch.rand(c), torch.rand(c) + 0.5
            gm, gr = torch.rand(128, 8), torch.rand(128, 8) + 0.5
            ops = {
                "bn_sums fwd": lambda K: K.bn_sums(xd, None, fmt),
                "bn_sums bwd+mask": lambda K: K.bn_sums(dy, xd, fmt, center=mean, rstd=rstd, grad_weight=True,
                                                        grad_bias=True, mask=y),
                "gn_forward g=8": lambda K: K.gn_forward(xd, fmt, 8, None, None, 1e-5),
                "gn_backward g=8": lambda K: K.gn_backward(dy, xd, fmt, 8, None, gm, gr, True, True, True),
            }
            for name, f in ops.items():
                to, tn = interleaved(lambda: f(ko), lambda: f(kn), a.rounds, a.reps)
                kern.append(tn / to)
                print(f"kernel {tag} {name:17s} old {to * 1e6:7.1f} us  new {tn * 1e6:7.1f} us  new/old {tn / to:.3f}",
                      flush=True)
    for what, r in (("layer fwd+bwd", layer), ("kernel calls", kern)):
        print(f"{what}: median new/old {statistics.median(r):.3f} (min {min(r):.3f}, max {max(r):.3f}) "
              f"over {len(r)} lines")


if __name__ == "__main__":
    main()
