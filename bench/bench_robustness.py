"""Cost of the robustness step per run at CIFAR-10 size: 10,000 test images × 15 corruptions × 5 severities.

Phases, timed separately (seconds, the sum over every corruption × severity):

* generate: ``corrupt`` of every set, without the cache (a study pays it once per data set and seed; every
  other run loads the cached sets);
* load: reading the cached sets back (what each further run of the study pays);
* plain: the eval-mode pass of the model on every set, at the evaluation batch size;
* adapted: the full re-estimation of the batch statistics (a train-mode pass of the norms) plus its eval pass;
* mixed: Schneider et al.'s prior-mixed pass (forward pre-hooks at the evaluation batch size);
* batch stats: the clean batch-statistics sweep at batch sizes 1, 8, 32, 128 over ``--batch-stats-images``.

The model is normlab's CIFAR ResNet (``--n``, default 3 = ResNet-20) with ``--norm`` (default bn) and random
weights: the cost of an evaluation does not depend on what the weights learned. The images are the CIFAR-10
test set when ``../shared/data/cifar10-jpg.tar.gz`` is there (``--data-root``), random uint8 images otherwise.

    python bench/bench_robustness.py                 # the full protocol (long on 2 cores)
    python bench/bench_robustness.py --quick         # smoke test: 256 images, 3 corruptions, severity 3
    python bench/bench_robustness.py --out bench/results/robustness.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"


def images(args) -> tuple[torch.Tensor, str]:
    root = Path(args.data_root) if args.data_root else TARBALL
    if root.exists() and not args.random:
        from normlab.config import make_config
        from normlab.data import load_data

        data = load_data(make_config({"dataset": "cifar10", "data_root": str(root)}))
        return data.test_x[: args.images].contiguous(), f"CIFAR-10 test ({root})"
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g), "random uint8 images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--corruptions", default=None, help="comma-separated (default: all 15)")
    ap.add_argument("--severities", default="1,2,3,4,5")
    ap.add_argument("--n", type=int, default=3, help="ResNet 6n+2 depth parameter [default: 3 = ResNet-20]")
    ap.add_argument("--norm", default="bn")
    ap.add_argument("--eval-batch-size", type=int, default=512)
    ap.add_argument("--batch-stats-images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--random", action="store_true", help="random images even when CIFAR-10 is there")
    ap.add_argument("--quick", action="store_true", help="smoke test: 256 images, 3 corruptions, severity 3")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.images, args.severities, args.batch_stats_images = 256, "3", 64
        args.corruptions = args.corruptions or "gaussian_noise,glass_blur,jpeg_compression"
    if args.threads:
        torch.set_num_threads(args.threads)

    from normlab.analysis.robustness import PriorMixed, batch_stats_accuracy, logits_of, reestimated
    from normlab.data import corruptions as dc
    from normlab.models.resnet import ResNet

    x, source = images(args)
    names = args.corruptions.split(",") if args.corruptions else list(dc.CORRUPTIONS)
    sevs = [int(s) for s in args.severities.split(",")]
    dev = torch.device("cpu")
    model = ResNet(args.n, 10, norm=args.norm).eval().to(memory_format=torch.channels_last)  # normlab's default
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    y = torch.zeros(len(x), dtype=torch.long)
    t = {k: 0.0 for k in ("generate", "load", "plain", "adapted", "mixed", "batch_stats")}
    per_corruption: dict[str, float] = {}
    bs = args.eval_batch_size
    with tempfile.TemporaryDirectory() as cache:
        key = dc.fingerprint(x)
        for name in names:
            for s in sevs:
                t0 = time.perf_counter()
                xc = dc.corrupted_set(x, name, s, key=key, cache_dir=cache)  # generated and written once
                t1 = time.perf_counter()
                xc = dc.corrupted_set(x, name, s, key=key, cache_dir=cache)  # a later run: read back
                t2 = time.perf_counter()
                logits_of(model, xc, mean, std, dev, bs)
                t3 = time.perf_counter()
                m = reestimated(model, xc, mean, std, dev, bs)
                logits_of(m, xc, mean, std, dev, bs)
                t4 = time.perf_counter()
                with PriorMixed(model) as mm:
                    logits_of(mm, xc, mean, std, dev, bs)
                t5 = time.perf_counter()
                t["generate"] += t1 - t0
                t["load"] += t2 - t1
                t["plain"] += t3 - t2
                t["adapted"] += t4 - t3
                t["mixed"] += t5 - t4
                per_corruption[name] = per_corruption.get(name, 0.0) + (t1 - t0)
                print(f"{name} {s}: generate {t1 - t0:.2f} s, plain {t3 - t2:.2f} s, adapted {t4 - t3:.2f} s, "
                      f"mixed {t5 - t4:.2f} s", flush=True)
    t0 = time.perf_counter()
    k = min(len(x), args.batch_stats_images)
    batch_stats_accuracy(model, x[:k], y[:k], mean, std, dev, (1, 8, 32, 128), bs)
    t["batch_stats"] = time.perf_counter() - t0
    out = {"images": len(x), "source": source, "corruptions": names, "severities": sevs, "model": f"ResNet-{6 * args.n + 2}",
           "norm": args.norm, "eval_batch_size": bs, "threads": torch.get_num_threads(), "seconds": t,
           "generate_seconds_per_corruption": per_corruption,
           "first_run_seconds": sum(t.values()) - t["load"],
           "later_run_seconds": sum(t.values()) - t["generate"]}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
