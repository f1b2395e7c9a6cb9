"""Experiment: one norm layer's forward and forward+backward, normlab vs native, at ResNet-20's three shapes.

The step-level bench (bench_norms.py) says whether a model with normlab's layer is slower; this one says
which layer, shape, layout and direction makes the difference. Per (norm, layout, shape): the two layers
are timed in interleaved calls (A B, B A, ...) in this one process, on inputs rotated over 4 tensors
(32 MB at the first stage's shape: past the L2 cache, as a training step's activations are). Reported:
median ms per call and the normlab/native ratio of the medians; fused rows (``+relu``) time normlab's
``forward_relu(x, residual)`` against native norm + add + ReLU.

    python bench/exp_layer_ops.py                         # bn, ln, gn, in x NCHW, channels_last; 1 thread
    python bench/exp_layer_ops.py --norms bn --formats channels_last --reps 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _common import machine, write_json
from bench_norms import NATIVE  # the native reference of each norm, as the step-level bench uses
from normlab.norms import make_norm
from normlab.train.runtime import tune_malloc

SHAPES = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]


def timings(fns: dict, reps: int) -> dict:
    per = {k: [] for k in fns}
    keys = list(fns)
    for k in keys:  # warm-up
        fns[k]()
    for i in range(reps):
        for k in (keys if i % 2 == 0 else keys[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            per[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in per.items()}


def case(norm: str, fmt_name: str, shape, reps: int, fused: bool) -> dict:
    n, c, h, w = shape
    mf = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
    xs = [torch.randn(shape).contiguous(memory_format=mf).requires_grad_() for _ in range(4)]
    rs = [torch.randn(shape).contiguous(memory_format=mf).requires_grad_() for _ in range(4)]
    dys = [torch.randn(shape).contiguous(memory_format=mf) for _ in range(4)]
    layers = {"normlab": make_norm(norm, c).train(), "native": NATIVE[norm](c).train()}
    layers = {k: m.to(memory_format=mf) for k, m in layers.items()}
    ctr = {"i": 0}

    def fwd(side, backward):
        def run():
            i = ctr["i"] = (ctr["i"] + 1) % 4
            m = layers[side]
            if fused and side == "normlab":
                y = m.forward_relu(xs[i], rs[i])
            elif fused:
                y = F.relu(m(xs[i]) + rs[i])
            else:
                y = m(xs[i])
            if backward:
                y.backward(dys[i])
        return run

    f = timings({k: fwd(k, False) for k in layers}, reps)
    fb = timings({k: fwd(k, True) for k in layers}, reps)
    row = {"norm": norm + ("+relu" if fused else ""), "format": fmt_name, "shape": list(shape),
           "fwd_ms": f, "fwd_bwd_ms": fb, "fwd_ratio": f["normlab"] / f["native"],
           "fwd_bwd_ratio": fb["normlab"] / fb["native"]}
    print(f"{row['norm']:>8} {fmt_name:>13} {str(tuple(shape)):>20}: fwd {f['normlab']:.3f}/{f['native']:.3f} ms "
          f"({row['fwd_ratio']:.2f})  fwd+bwd {fb['normlab']:.3f}/{fb['native']:.3f} ms ({row['fwd_bwd_ratio']:.2f})",
          flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--norms", default="bn,ln,gn,in")
    ap.add_argument("--formats", default="nchw,channels_last")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fused", action="store_true", help="also normlab's forward_relu vs native norm + add + ReLU")
    ap.add_argument("--out", default="exp_layer_ops.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tune_malloc()
    print(machine())
    rows = []
    for fmt_name in [f.replace("nchw", "NCHW") for f in a.formats.split(",")]:
        for norm in a.norms.split(","):
            for shape in SHAPES:
                for fused in ([False, True] if a.fused else [False]):
                    rows.append(case(norm, fmt_name, shape, a.reps, fused))
    write_json(a.out, {"machine": machine(), "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
