"""Experiment: ResNet-20 (native BN) training step with 1 vs 2 torch threads, interleaved in one process.

    python bench/exp_threads.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from normlab.models.resnet import ResNet


def main(rounds: int = 8) -> None:
    torch.manual_seed(0)
    model = ResNet(3, 10, norm=lambda c: nn.BatchNorm2d(c))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    ts = {1: [], 2: []}
    for r in range(rounds):
        for th in ((1, 2) if r % 2 == 0 else (2, 1)):
            torch.set_num_threads(th)
            t = time.perf_counter()
            step()
            ts[th].append(time.perf_counter() - t)
    for th, v in ts.items():
        print(f"{th} thread(s): median {statistics.median(v):.3f} s/step ({min(v):.3f}–{max(v):.3f})")
    print(f"ratio 2 threads / 1 thread: {statistics.median(b / a for a, b in zip(ts[1], ts[2])):.2f}")


if __name__ == "__main__":
    main()
