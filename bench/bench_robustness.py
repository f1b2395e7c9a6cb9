"""Cost of the robustness step per run at CIFAR-10 size: 10,000 test images × 15 corruptions × 5 severities.

Phases, timed separately (seconds, the sum over every corruption × severity):

* generate: ``corrupted_set`` of every set into an empty cache (a study pays it once per data set and seed;
  every other run loads the cached sets); the seconds per corruption are kept too;
* load: reading the cached sets back (what each further run of the study pays);
* plain: the eval-mode pass of the model on every set, at the evaluation batch size;
* adapted: the full re-estimation of the batch statistics (a train-mode pass of the norms) plus its eval pass;
* mixed: Schneider et al.'s prior-mixed pass (forward pre-hooks at the evaluation batch size);
* batch stats: the clean batch-statistics sweep at batch sizes 1, 8, 32, 128 over ``--batch-stats-images``.

adapted, mixed and batch stats run only for norms with batch statistics (bn, bin, torch_bn, ...): the default
``--norm bn`` times the most expensive run. As context for "does it dominate a study", the same process times

* clean eval: one plain evaluation of the clean test set (what every run's test evaluation costs);
* train epoch: one training epoch of the cifar10-paper protocol (45,000 images at batch 128 = 352 steps of
  ``normlab.train.step.TrainStep``, the step ``normlab train`` runs, with standard augmentation and glibc
  malloc tuned as ``normlab train`` tunes it), estimated from ``--train-steps`` timed steps scaled to 352;
  the per-epoch validation pass and checkpoint are left out.

The model is normlab's CIFAR ResNet (``--n``, default 3 = ResNet-20) with ``--norm`` and random weights: the
cost of an evaluation does not depend on what the weights learned. The images are the CIFAR-10 test set when
``../shared/data/cifar10-jpg.tar.gz`` is there (``--data-root``), random uint8 images otherwise.

    python bench/bench_robustness.py                 # the full protocol, writes bench/results/robustness.json
    python bench/bench_robustness.py --quick         # smoke test: 256 images, 3 corruptions, severity 3
    python bench/bench_robustness.py --out ''        # print only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TARBALL = HERE.parents[1] / "shared" / "data" / "cifar10-jpg.tar.gz"
TRAIN_IMAGES = 45_000  # the cifar10-paper protocol's training split (50k minus 5k validation)
TRAIN_BATCH = 128


def images(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    root = Path(args.data_root) if args.data_root else TARBALL
    if root.exists() and not args.random:
        from normlab.config import make_config
        from normlab.data import load_data

        data = load_data(make_config({"dataset": "cifar10", "data_root": str(root), "progress": "off"}))
        n = args.images
        return data.test_x[:n].contiguous(), data.test_y[:n].contiguous(), f"CIFAR-10 test ({root})"
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (args.images,), generator=g), "random uint8 images")


def train_epoch_seconds(args, x: torch.Tensor, y: torch.Tensor, mean, std) -> tuple[float, int]:
    """Seconds of one 352-step training epoch, from ``args.train_steps`` timed TrainSteps (after 3 untimed
    ones) on batches of ``x`` (the images' content does not change a step's cost)."""
    from normlab.config import make_config
    from normlab.models import build_model
    from normlab.train.loop import epoch_generator, memory_format_of
    from normlab.train.optim import build_optimizer
    from normlab.train.runtime import tune_malloc
    from normlab.train.step import TrainStep

    tune_malloc()
    cfg = make_config({"dataset": "cifar10", "n": args.n, "norm": args.norm, "augment": "standard",
                       "batch_size": TRAIN_BATCH, "lr": 0.1, "epochs": 100, "device": "cpu", "progress": "off"})
    torch.manual_seed(0)
    fmt = memory_format_of(cfg)
    model = build_model(cfg, 3, 10).train().to(memory_format=fmt)
    opt = build_optimizer(model, cfg)
    per_epoch = math.ceil(TRAIN_IMAGES / TRAIN_BATCH)
    step = TrainStep(model, model, opt, cfg, device=torch.device("cpu"), num_classes=10, mean=mean, std=std,
                     steps_per_epoch=per_epoch, total_steps=per_epoch * cfg.epochs, memory_format=fmt)
    gen = epoch_generator(0, 1, 1)
    order = torch.randperm(len(x), generator=epoch_generator(0, 1, 0))

    def one(s: int) -> None:
        idx = order[torch.arange(s * TRAIN_BATCH, (s + 1) * TRAIN_BATCH) % len(x)]
        step(x.index_select(0, idx), y.index_select(0, idx), s, gen)
        if step.due():
            step.check()

    for s in range(3):
        one(s)
    t0 = time.perf_counter()
    for s in range(3, 3 + args.train_steps):
        one(s)
    step.check()  # the steps' device-side flags read back, as the loop does
    return (time.perf_counter() - t0) / args.train_steps * per_epoch, per_epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--corruptions", default=None, help="comma-separated (default: all 15)")
    ap.add_argument("--severities", default="1,2,3,4,5")
    ap.add_argument("--n", type=int, default=3, help="ResNet 6n+2 depth parameter [default: 3 = ResNet-20]")
    ap.add_argument("--norm", default="bn")
    ap.add_argument("--eval-batch-size", type=int, default=512)
    ap.add_argument("--batch-stats-images", type=int, default=2000)
    ap.add_argument("--train-steps", type=int, default=40, help="timed training steps, scaled to one epoch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--random", action="store_true", help="random images even when CIFAR-10 is there")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 256 images, 3 corruptions, severity 3, 4 training steps")
    ap.add_argument("--out", default="robustness.json", help="file name under bench/results/ ('' = do not write)")
    args = ap.parse_args()
    if args.quick:
        args.images, args.severities, args.batch_stats_images, args.train_steps = 256, "3", 64, 4
        args.corruptions = args.corruptions or "gaussian_noise,glass_blur,jpeg_compression"
    if args.threads:
        torch.set_num_threads(args.threads)

    from _common import machine, write_json
    from normlab.analysis.robustness import PriorMixed, batch_stats_accuracy, has_batch_stats, logits_of, reestimated
    from normlab.data import corruptions as dc
    from normlab.models.resnet import ResNet

    x, y, source = images(args)
    names = args.corruptions.split(",") if args.corruptions else list(dc.CORRUPTIONS)
    sevs = [int(s) for s in args.severities.split(",")]
    dev = torch.device("cpu")
    model = ResNet(args.n, 10, norm=args.norm).eval().to(memory_format=torch.channels_last)  # normlab's default
    batch_stats = has_batch_stats(model)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    t = {k: 0.0 for k in ("generate", "load", "plain", "adapted", "mixed", "batch_stats")}
    per_corruption: dict[str, float] = {}
    bs = args.eval_batch_size
    logits_of(model, x[:bs], mean, std, dev, bs)  # warm-up: the first pass pays one-time allocations
    t0 = time.perf_counter()
    logits_of(model, x, mean, std, dev, bs)
    clean_eval = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        key = dc.fingerprint(x)  # once per study: the cache key's data part
        fingerprint = time.perf_counter() - t0
        for name in names:
            for s in sevs:
                t0 = time.perf_counter()
                xc = dc.corrupted_set(x, name, s, key=key, cache_dir=cache)  # generated and written once
                t1 = time.perf_counter()
                xc = dc.corrupted_set(x, name, s, key=key, cache_dir=cache)  # a later run: read back
                t2 = time.perf_counter()
                logits_of(model, xc, mean, std, dev, bs)
                t3 = time.perf_counter()
                if batch_stats:
                    m = reestimated(model, xc, mean, std, dev, bs)
                    logits_of(m, xc, mean, std, dev, bs)
                t4 = time.perf_counter()
                if batch_stats:
                    with PriorMixed(model) as mm:
                        logits_of(mm, xc, mean, std, dev, bs)
                t5 = time.perf_counter()
                t["generate"] += t1 - t0
                t["load"] += t2 - t1
                t["plain"] += t3 - t2
                t["adapted"] += t4 - t3
                t["mixed"] += t5 - t4
                per_corruption[name] = per_corruption.get(name, 0.0) + (t1 - t0)
                print(f"{name} {s}: generate {t1 - t0:.2f} s, load {t2 - t1:.2f} s, plain {t3 - t2:.2f} s, "
                      f"adapted {t4 - t3:.2f} s, mixed {t5 - t4:.2f} s", flush=True)
    if batch_stats:
        t0 = time.perf_counter()
        k = min(len(x), args.batch_stats_images)
        batch_stats_accuracy(model, x[:k], y[:k], mean, std, dev, (1, 8, 32, 128), bs)
        t["batch_stats"] = time.perf_counter() - t0
    epoch, steps = train_epoch_seconds(args, x, y, mean, std)  # last: it tunes malloc for the whole process
    per_run = sum(t.values()) - t["generate"]
    out = {"machine": machine(), "args": vars(args), "quick": args.quick, "images": len(x), "source": source,
           "corruptions": names, "severities": sevs, "model": f"ResNet-{6 * args.n + 2}", "norm": args.norm,
           "batch_statistics": batch_stats, "eval_batch_size": bs, "threads": torch.get_num_threads(),
           "seconds": t, "fingerprint_seconds": fingerprint,
           "generate_seconds_per_corruption": per_corruption,
           "first_run_seconds": per_run + t["generate"] + fingerprint,
           "later_run_seconds": per_run,
           "context": {"clean_eval_seconds": clean_eval, "train_epoch_seconds": epoch,
                       "train_epoch_images": TRAIN_IMAGES, "train_batch": TRAIN_BATCH, "train_epoch_steps": steps,
                       "train_steps_timed": args.train_steps}}
    print(json.dumps({k: v for k, v in out.items() if k not in ("machine", "args")}, indent=1))
    if args.out:
        print(f"wrote {write_json(args.out, out)}")


if __name__ == "__main__":
    main()
