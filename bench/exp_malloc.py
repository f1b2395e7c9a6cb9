"""Why normlab tunes glibc's malloc: minor page faults and step time of a ResNet-20 training step.

Each configuration runs in a fresh process (mallopt is process-wide): a normlab-BN model and a native-BN
model are built, then 6 interleaved steps each are timed while counting minor page faults
(getrusage ru_minflt). Without tuning, glibc returns big freed blocks to the OS and faults them back in,
zero-filled, at the next allocation; how many depends on where each model's tensors landed.

    python bench/exp_malloc.py      # ~1 min; writes bench/results/exp_malloc.json
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

from _common import write_json


def child(tuned: bool, norm: str) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from normlab.models.resnet import ResNet
    from normlab.norms import norm_layer
    from normlab.train.runtime import tune_malloc

    torch.set_num_threads(1)
    applied = tune_malloc() if tuned else False
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    steps = {}
    for side, make in (("normlab", norm_layer(norm)), ("native", lambda c: nn.BatchNorm2d(c))):
        torch.manual_seed(0)
        m = ResNet(3, 10, norm=make).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

        def step(m=m, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()

        step()
        steps[side] = step
    out = {k: {"faults": [], "s": []} for k in steps}
    for i in range(6):
        for k in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            steps[k]()
            out[k]["s"].append(time.perf_counter() - t0)
            out[k]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"tuned": applied, **{k: {"faults_median": statistics.median(v["faults"]),
                                     "s_median": statistics.median(v["s"])} for k, v in out.items()}}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2] == "1", "bn")))
        return
    rows = []
    for rep in range(3):
        for tuned in ("0", "1"):
            r = json.loads(subprocess.run([sys.executable, __file__, "--child", tuned], capture_output=True,
                                          text=True, check=True).stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"malloc tuned={r['tuned']!s:5}  faults/step normlab {r['normlab']['faults_median']:>7.0f} "
                  f"native {r['native']['faults_median']:>7.0f}   s/step normlab {r['normlab']['s_median']:.3f} "
                  f"native {r['native']['s_median']:.3f}", flush=True)
    write_json("exp_malloc.json", {"rows": rows})


if __name__ == "__main__":
    main()
