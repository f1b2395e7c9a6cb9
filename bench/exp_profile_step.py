"""Experiment: where normlab's training step spends its time (torch.profiler, self CPU time per op).

The step is bench_pipeline's normlab side (warm uint8 cache, augmentation, channels_last, normlab BN with
its C++ kernels, SGD): the share of convolutions vs norms vs ReLU vs adds bounds what faster norms or a
faster data path can gain end to end. Ops are grouped into a few families; the log keeps the raw table.

    python bench/exp_profile_step.py             # 1 thread, 10 profiled steps
    python bench/exp_profile_step.py --threads 2
"""

from __future__ import annotations

import argparse

import torch

from _common import machine
from bench_pipeline import normlab_steps

FAMILIES = {  # op name prefix -> family
    "aten::convolution_backward": "convolutions", "aten::mkldnn_convolution": "convolutions",
    "BatchNormFunction": "normlab BN", "aten::threshold_backward": "ReLU", "aten::clamp_min": "ReLU",
    "aten::relu": "ReLU", "aten::add": "adds (residual, gradient accumulation, SGD)",
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(machine())
    steps = normlab_steps(a.threads, "channels_last", "off", a.precision)
    for _ in range(5):
        next(steps)
    with torch.profiler.profile() as prof:
        for _ in range(a.steps):
            next(steps)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=20))
    total = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = {}
    for e in events:
        fam = next((f for p, f in FAMILIES.items() if e.key.startswith(p)), "other")
        shares[fam] = shares.get(fam, 0.0) + e.self_cpu_time_total
    print(f"step: {total / a.steps / 1e3:.1f} ms self CPU time ({a.threads} thread(s), {a.precision})")
    for fam, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:45s} {100 * t / total:5.1f}%")


if __name__ == "__main__":
    main()
