"""Experiment: normlab's ResNet-20 with fused blocks (norm + ReLU + residual add in the norm's passes) vs the
same model unfused (``ResNet(fuse=False)``: the norm, then nn.ReLU and the add as separate ops).

Both models built from one seed, fed one batch, timed in interleaved rounds in this process (fused first in
even rounds, unfused first in odd ones); a step = forward + cross-entropy + backward + SGD step. Reported
per norm: median step time of each side and the median (min–max) over rounds of the per-round ratio
fused / unfused. Before timing, one step of each side is checked to give the same loss.

    python bench/exp_fused_blocks.py                 # bn,gn,ln,in; 2 threads (the default), channels_last
    python bench/exp_fused_blocks.py --threads 1 --norms bn
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from _common import fmt, machine, summary, write_json
from normlab.models.resnet import ResNet
from normlab.train.runtime import tune_malloc


def make(norm: str, fuse: bool, memory_format):
    torch.manual_seed(0)
    model = ResNet(3, 10, norm=norm, fuse=fuse).to(memory_format=memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, opt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--norms", default="bn,gn,ln,in")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--memory-format", default="channels_last", choices=("channels_last", "contiguous"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default="exp_fused_blocks.json")
    ap.add_argument("--quick", action="store_true", help="BN only, 3 rounds")
    a = ap.parse_args(argv)
    if a.quick:
        a.norms, a.rounds = "bn", 3
    torch.set_num_threads(a.threads)
    tune_malloc()
    mf = torch.channels_last if a.memory_format == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, 3, 32, 32, generator=g).contiguous(memory_format=mf)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    info = machine()
    print(info)
    rows = []
    for norm in a.norms.split(","):
        sides = {"fused": make(norm, True, mf), "unfused": make(norm, False, mf)}
        assert sides["fused"][0].stages[0][0].fused() and not sides["unfused"][0].stages[0][0].fused()

        def step(side):
            model, opt = sides[side]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        first = {k: step(k) for k in sides}
        torch.testing.assert_close(first["fused"], first["unfused"])
        times = {k: [] for k in sides}
        ratios = []
        for r in range(a.rounds):
            order = ["fused", "unfused"] if r % 2 == 0 else ["unfused", "fused"]
            per = {}
            for k in order:
                step(k)  # warm-up
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    step(k)
                per[k] = (time.perf_counter() - t0) / a.steps
                times[k].append(per[k])
            ratios.append(per["fused"] / per["unfused"])
        row = {"norm": norm, "fused_s": summary(times["fused"]), "unfused_s": summary(times["unfused"]),
               "ratio": summary(ratios)}
        rows.append(row)
        print(f"{norm:>3}: fused {fmt(row['fused_s'], 4)} s  unfused {fmt(row['unfused_s'], 4)} s  "
              f"ratio {fmt(row['ratio'])}", flush=True)
    write_json(a.out, {"machine": info, "args": vars(a), "results": rows})


if __name__ == "__main__":
    main()
