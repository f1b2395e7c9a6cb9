"""Target 3: training-step cost vs depth n (1, 2, 3, 5, 9) and vs input size (32, 64, 128, 256).

One training step (forward, backward, SGD) of the CIFAR ResNet with normlab's BatchNorm2d, eager, with
normlab train's defaults: channels_last and glibc malloc tuned (``runtime.tune_malloc``); ``--memory-format
contiguous`` and ``--no-tune-malloc`` switch them off.
Depth sweep: 32×32 inputs, batch ``--batch`` (128). Size sweep: n=3, batch ``--size-batch`` (16, so a
256×256 step fits in memory and time). All configurations are timed in interleaved rounds in this one
process; each point is the median (min–max) over rounds of seconds per image. A least-squares line
through the origin-free model ``t = a + b·x`` is fitted to each sweep and its R² reported; the plot
(bench/results/scaling.png) shows both sweeps with the fitted lines.

    python bench/bench_scaling.py           # ~3 min here
    python bench/bench_scaling.py --quick
    python bench/bench_scaling.py --memory-format contiguous --no-tune-malloc --out scaling_untuned.json
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from _common import RESULTS, fmt, machine, summary, write_json
from normlab.models.resnet import ResNet
from normlab.train.runtime import tune_malloc


def make(n: int, size: int, batch: int, memory_format: torch.memory_format):
    torch.manual_seed(0)
    model = ResNet(n, 10, norm="bn").train().to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1 - ss_res / ss_tot


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="1,2,3,5,9")
    ap.add_argument("--sizes", default="32,64,128,256")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-format", default="channels_last", choices=("channels_last", "contiguous"))
    ap.add_argument("--no-tune-malloc", action="store_true", help="leave glibc's malloc as it is")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 1 step")
    ap.add_argument("--out", default="scaling.json", help="results file in bench/results (the plot: same name, .png)")
    a = ap.parse_args(argv)
    if a.quick:
        a.repeats, a.steps = 3, 1
    torch.set_num_threads(a.threads)
    a.malloc_tuned = False if a.no_tune_malloc else tune_malloc()
    mf = getattr(torch, a.memory_format + ("_format" if a.memory_format == "contiguous" else ""))
    info = machine()
    print(info)
    configs = {("n", n): (make(n, 32, a.batch, mf), a.batch) for n in map(int, a.depths.split(","))}
    configs.update({("size", s): (make(3, s, a.size_batch, mf), a.size_batch) for s in map(int, a.sizes.split(","))})
    for step, _ in configs.values():
        step()  # warm-up
    per_image = {k: [] for k in configs}
    keys = list(configs)
    for r in range(a.repeats):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            step, batch = configs[k]
            t = time.perf_counter()
            for _ in range(a.steps):
                step()
            per_image[k].append((time.perf_counter() - t) / (a.steps * batch))
    rows = []
    for (kind, v), ts in per_image.items():
        s = summary(ts)
        rows.append({"sweep": kind, "value": v, "s_per_image": s,
                     "s_per_50k_images": {k: (x * 50000 if k != "n" else x) for k, x in s.items()}})
        print(f"{kind}={v:>4}: {fmt(s, 3, 1e3)} ms/image", flush=True)
    fits = {}
    for kind, xlabel in (("n", "n"), ("size", "pixels")):
        pts = [(r["value"] if kind == "n" else r["value"] ** 2, r["s_per_image"]["median"]) for r in rows
               if r["sweep"] == kind]
        a0, b0, r2 = fit([p[0] for p in pts], [p[1] for p in pts])
        fits[kind] = {"intercept_s": a0, "slope_s": b0, "r2": r2, "x": xlabel}
        print(f"fit {kind}: t = {a0 * 1e3:.3f} ms + {b0 * 1e3:.5f} ms·{xlabel}  R²={r2:.4f}")
    plot(rows, fits, a)
    write_json(a.out, {"machine": info, "args": vars(a), "results": rows, "fits": fits})


def plot(rows, fits, a):
    from normlab.plots import plt, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("n", "size")):
        pts = [r for r in rows if r["sweep"] == kind]
        xs = [r["value"] if kind == "n" else r["value"] ** 2 for r in pts]
        med = [r["s_per_image"]["median"] * 1e3 for r in pts]
        lo = [m - r["s_per_image"]["min"] * 1e3 for m, r in zip(med, pts)]
        hi = [r["s_per_image"]["max"] * 1e3 - m for m, r in zip(med, pts)]
        ax.errorbar(xs, med, yerr=[lo, hi], fmt="o", capsize=3, label="measured (median, min–max)")
        f = fits[kind]
        grid = [min(xs), max(xs)]
        ax.plot(grid, [(f["intercept_s"] + f["slope_s"] * g) * 1e3 for g in grid], "--",
                label=f"linear fit (R²={f['r2']:.3f})")
        if kind == "n":
            ax.set(xlabel="blocks per stage n (6n+2 layers)", ylabel="ms per image (train step)",
                   title=f"ResNet depth, 32×32, batch {a.batch}")
        else:
            ax.set(xlabel="pixels per image (H·W)", ylabel="ms per image (train step)",
                   title=f"Input size (32…256), n=3, batch {a.size_batch}")
            for x, r in zip(xs, pts):
                ax.annotate(f"{r['value']}²", (x, r["s_per_image"]["median"] * 1e3), textcoords="offset points",
                            xytext=(4, -10), fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save_figure(fig, RESULTS / a.out.replace(".json", ".png"))


if __name__ == "__main__":
    main()
