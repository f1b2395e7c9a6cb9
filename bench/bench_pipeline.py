"""Target 2: training images/s of normlab's pipeline vs a conventional PyTorch pipeline, same model and batch.

normlab: the CIFAR-10 JPEG tarball decoded once into normlab's uint8 cache (``load_data``, warm cache),
then per step the very function ``normlab train`` runs (``normlab.train.step.TrainStep``) with its
defaults: index the resident uint8 tensor, per-step learning rate, ``augment_batch`` (pad 4 + random crop
+ flip, vectorised), ``normalize``, channels_last, forward/backward, gradient norm and non-finite flags,
SGD step of ResNet-20 with normlab's BatchNorm2d (C++ kernels), gate clamping, loss and confusion sums;
glibc malloc tuned (``tune_malloc``; process-wide, so the conventional side, measured in the same
process, gets it too).

conventional: torchvision ``ImageFolder`` over the unpacked JPEG folder, ``DataLoader`` with worker
processes (``--workers``, default 2 = the machine's cores), PIL transforms (RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor, Normalize), the eager model with ``nn.BatchNorm2d`` in NCHW.

Both: ResNet-20, batch 128, SGD(lr 0.1, momentum 0.9, wd 5e-4 on conv/linear weights), the same torch
thread count in the training process (``--threads``; default torch's own = one per core, as each pipeline
runs out of the box; ``--threads 1`` isolates the model step). Throughput: images/s over ``--steps`` (40)
steps after ``--warmup`` (5) steps, in ``--repeats`` alternating rounds.

bound (measured in the same rounds): the same ResNet-20 with its norms and ReLUs replaced by identities,
stepping on one resident batch in normlab's layout and precision -- convolutions, residual adds, pooling,
classifier and SGD only. Its ratio to the conventional side is the ceiling for any norm and data path.

Accuracy (on by default, off with ``--no-accuracy`` / ``--quick``): ``--epochs`` (2) on the *same*
``--subset`` (10k) training images -- normlab's stratified hold-out and subset, checked label by label and
pixel by pixel --, the same per-epoch order, normalization statistics, initial weights (per seed) and
per-step cosine lr; test accuracy on the full 10k test folder, ``--seeds`` (3) seeds per side, mean ± sd.
Only the augmentation's random draws differ (PIL in workers vs normlab's generator). normlab's side runs
``normlab.train.loop.train`` itself (it tests its best-on-val weights: ``normlab_best_epoch`` in the JSON
says whether that was the last epoch, as the conventional side's final weights are).

    python bench/bench_pipeline.py           # ~15 min here
    python bench/bench_pipeline.py --quick   # 1 round, no accuracy
    python bench/bench_pipeline.py --no-throughput --epochs 8 --seeds 4 --out pipeline_long.json
"""

from __future__ import annotations

import argparse
import math
import os
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _common import fmt, machine, summary, write_json

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"
DEFAULT_THREADS = torch.get_num_threads()  # what both pipelines use out of the box (one per core)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def unpacked(tarball: Path) -> Path:
    """The tarball unpacked once under $NORMLAB_CACHE/bench (re-used while the tarball is unchanged)."""
    from normlab.data.loader import cache_dir

    st = tarball.stat()
    dest = cache_dir() / "bench" / f"cifar10-jpg-{st.st_size}-{st.st_mtime_ns}"
    if not (dest / "cifar10-jpg" / "train").is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent))
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")
        os.replace(tmp, dest)
    return dest / "cifar10-jpg"


def sgd(model):
    from normlab.config import TrainConfig
    from normlab.train.optim import build_optimizer

    return build_optimizer(model, TrainConfig(lr=0.1))


# ------------------------------------------------------------------------------------------ conventional

def pil_transform(train: bool, mean=MEAN, std=STD):
    """The conventional PIL transforms: pad 4 + random crop + flip (train), to-tensor, normalize."""
    import torchvision.transforms as T

    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*aug, T.ToTensor(), T.Normalize(mean, std)])


def conventional(root: Path, workers: int):
    """ImageFolder over train with the PIL transforms, shuffled DataLoader with worker processes."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root / "train"), transform=pil_transform(True))
    g = torch.Generator().manual_seed(0)
    return ds, torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=workers, drop_last=True,
                                           persistent_workers=workers > 0, generator=g)


def conv_model(seed: int = 0):
    from normlab.models.resnet import ResNet

    torch.manual_seed(seed)
    return ResNet(3, 10, norm=lambda c: nn.BatchNorm2d(c))


def conventional_steps(root: Path, workers: int):
    """A generator: each next() runs one conventional training step; the loader is cycled."""
    _, loader = conventional(root, workers)
    model = conv_model().train()
    opt = sgd(model)
    while True:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            yield


# ------------------------------------------------------------------------------------------------ normlab

def normlab_cfg(**kw):
    from normlab.config import make_config

    base = {"dataset": "cifar10", "data_root": str(TARBALL), "augment": "standard", "norm": "bn", "n": 3,
            "batch_size": 128, "lr": 0.1, "device": "cpu", "progress": "off"}
    return make_config(base, kw)


def normlab_steps(threads: int, memory_format: str, compile_mode: str, precision: str = "fp32", fuse: bool = True):
    """``normlab train``'s own step (``normlab.train.step.TrainStep``: per-step lr, augmentation, normalize,
    forward/backward, gradient norm and non-finite flags, SGD, gate clamping, loss and confusion sums, the
    flag check every 50 steps) over its epoch order, on normlab's warm uint8 cache, with its defaults
    (channels_last, tuned malloc -- process-wide, so the conventional side in this process gets it too --
    and blocks that fuse BN + ReLU + residual add; ``fuse=False`` for the unfused blocks). What is left out
    of a ``normlab train`` epoch: the per-epoch evaluation, probe and checkpoint."""
    from normlab.data import load_data
    from normlab.models import build_model
    from normlab.train.loop import epoch_generator, memory_format_of
    from normlab.train.optim import build_optimizer
    from normlab.train.runtime import maybe_compile, tune_malloc
    from normlab.train.step import TrainStep

    tune_malloc()
    cfg = normlab_cfg(threads=threads, compile=compile_mode, memory_format=memory_format, precision=precision,
                      epochs=100)
    data = load_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, data.in_channels, data.num_classes).train()
    for m in model.modules():
        if hasattr(m, "fuse"):
            m.fuse = fuse
    fmt = memory_format_of(cfg)
    model = model.to(memory_format=fmt)
    device = torch.device("cpu")
    opt = build_optimizer(model, cfg)
    run_model = maybe_compile(model, compile_mode, device)
    train_x, train_y, bs = data.train_x, data.train_y, cfg.batch_size
    steps_per_epoch = math.ceil(len(train_x) / bs)
    step = TrainStep(model, run_model, opt, cfg, device=device, num_classes=data.num_classes, mean=data.mean,
                     std=data.std, steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * cfg.epochs,
                     memory_format=fmt)
    epoch = 0
    while True:
        epoch += 1
        order = torch.randperm(len(train_x), generator=epoch_generator(0, epoch, 0))
        gen = epoch_generator(0, epoch, 1)
        step.begin_epoch()
        for s in range(steps_per_epoch):
            idx = order[s * bs:(s + 1) * bs]
            if len(idx) < 2:
                continue
            step(train_x.index_select(0, idx), train_y.index_select(0, idx), s, gen,
                 global_step=((epoch - 1) * steps_per_epoch + s) % step.total_steps)
            if step.due() and step.check() is not None:
                raise RuntimeError("the benchmark's normlab run diverged")
            yield


def bound_steps(memory_format: str, precision: str = "fp32"):
    """The ceiling no norm or data path can pass: ResNet-20 with its norms and ReLUs replaced by identities
    (left: the 19 convolutions, the residual adds, pooling, the classifier, loss and SGD -- at lr 0, so the
    values stay finite) stepping on one resident, already normalized batch -- no data path at all. Its images/s over the conventional side's is
    the largest ratio any implementation of normlab's norms and data pipeline could reach here."""
    from normlab.models.resnet import ResNet
    from normlab.device import autocast

    torch.manual_seed(0)
    model = ResNet(3, 10, norm=lambda c: nn.Identity()).train()
    for name, m in list(model.named_modules()):
        for child, mod in list(m.named_children()):
            if isinstance(mod, nn.ReLU):
                setattr(m, child, nn.Identity())
    xb = torch.randn(128, 3, 32, 32)
    if memory_format == "channels_last":
        model, xb = model.to(memory_format=torch.channels_last), xb.contiguous(memory_format=torch.channels_last)
    yb = torch.randint(0, 10, (128,))
    opt = sgd(model)
    for group in opt.param_groups:  # the same optimizer work, but the weights stay at their initial values:
        group["lr"] = 0.0           # without norms, steps at lr 0.1 diverge to NaN within a few dozen steps
    while True:
        with autocast(torch.device("cpu"), precision):
            loss = F.cross_entropy(model(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        yield


def throughput(args) -> dict:
    root = unpacked(TARBALL)
    t0 = time.perf_counter()
    threads = {"normlab": args.normlab_threads or args.threads or DEFAULT_THREADS,
               "conventional": args.conv_threads or args.threads or DEFAULT_THREADS}
    sides = {"normlab": normlab_steps(threads["normlab"], args.memory_format, args.compile, args.precision,
                                      not args.no_fuse),
             "conventional": conventional_steps(root, args.workers),
             "bound": bound_steps(args.memory_format, args.precision)}
    threads["bound"] = threads["normlab"]
    first = {}
    for k, it in sides.items():
        torch.set_num_threads(threads[k])
        t = time.perf_counter()
        next(it)
        first[k] = time.perf_counter() - t
        for _ in range(args.warmup):
            next(it)
    ips = {k: [] for k in sides}
    ratios, bound_ratios = [], []
    order = list(sides)
    for r in range(args.repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            it = sides[k]
            torch.set_num_threads(threads[k])
            t = time.perf_counter()
            for _ in range(args.steps):
                next(it)
            ips[k].append(128 * args.steps / (time.perf_counter() - t))
        ratios.append(ips["normlab"][-1] / ips["conventional"][-1])
        bound_ratios.append(ips["bound"][-1] / ips["conventional"][-1])
    for it in sides.values():
        it.close()
    res = {"threads": threads, "normlab_img_s": summary(ips["normlab"]), "conventional_img_s": summary(ips["conventional"]),
           "ratio": summary(ratios), "bound_img_s": summary(ips["bound"]), "bound_ratio": summary(bound_ratios),
           "first_step_s": first, "setup_s": time.perf_counter() - t0}
    print(f"images/s: normlab {fmt(res['normlab_img_s'], 0)}  conventional {fmt(res['conventional_img_s'], 0)}  "
          f"ratio {fmt(res['ratio'], 2)}; convolutions-only bound {fmt(res['bound_img_s'], 0)}, "
          f"ratio {fmt(res['bound_ratio'], 2)}", flush=True)
    return res


# ----------------------------------------------------------------------------------------------- accuracy

class EpochOrder(torch.utils.data.Sampler):
    """normlab's per-epoch image order (``epoch_generator(seed, epoch, 0)``) for the conventional loader."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 1

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        from normlab.train.loop import epoch_generator

        return iter(torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch, 0)).tolist())


def same_images(root: Path, n: int):
    """The indices into ImageFolder(train) of exactly the images normlab trains on with ``--train-subset n``
    (its stratified 10% validation hold-out, then its stratified subset), checked label by label and pixel
    by pixel; and normlab's normalization statistics of that subset."""
    import numpy as np
    from torchvision.datasets import ImageFolder

    from normlab.data import load_data
    from normlab.data.splits import SPLIT_SEED, SUBSET_SEED, stratified_holdout, stratified_subset

    full = ImageFolder(str(root / "train"))
    t = torch.tensor(full.targets)
    keep, _ = stratified_holdout(t, 10, 0.1, SPLIT_SEED)
    subset = keep[stratified_subset(t[keep], 10, n, SUBSET_SEED)].tolist()
    data = load_data(normlab_cfg(train_subset=n))
    assert torch.equal(t[subset], data.train_y), "normlab's subset and the ImageFolder indices disagree (labels)"
    for j in (0, len(subset) // 2, len(subset) - 1):
        img = np.asarray(full.loader(full.samples[subset[j]][0]).convert("RGB"))
        assert torch.equal(torch.from_numpy(img).permute(2, 0, 1), data.train_x[j]), "images differ"
    return subset, data.mean, data.std


def conventional_run(root: Path, subset: list[int], mean, std, seed: int, epochs: int, workers: int) -> float:
    """The conventional pipeline trained as normlab trains: same images, same per-epoch order, same
    normalization, same init (seed), SGD and per-step cosine lr over every batch (a last short batch
    included); test accuracy of the final weights on the full test folder."""
    from torchvision.datasets import ImageFolder

    ds = torch.utils.data.Subset(ImageFolder(str(root / "train"), transform=pil_transform(True, mean, std)), subset)
    sampler = EpochOrder(len(ds), seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=128, sampler=sampler, num_workers=workers,
                                         persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = conv_model(seed).train()
    opt = sgd(model)
    total, step = len(loader) * epochs, 0
    for epoch in range(1, epochs + 1):
        sampler.epoch = epoch
        for x, y in loader:
            for gr in opt.param_groups:
                gr["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
    model.eval()
    test = ImageFolder(str(root / "test"), transform=pil_transform(False, mean, std))
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=512, num_workers=workers):
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(test)


def accuracy(args) -> dict:
    """Test accuracy after ``--epochs`` on the same ``--subset`` images, ``--seeds`` seeds per side."""
    import statistics

    from normlab.train.loop import summary_of, train

    root = unpacked(TARBALL)
    subset, mean, std = same_images(root, args.subset)
    rows = []
    for seed in range(args.seeds):
        torch.set_num_threads(args.conv_threads or args.threads or DEFAULT_THREADS)
        t0 = time.perf_counter()
        conv_acc = conventional_run(root, subset, mean, std, seed, args.epochs, args.workers)
        conv_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            cfg = normlab_cfg(threads=args.normlab_threads or args.threads, train_subset=args.subset,
                              epochs=args.epochs, seed=seed, out=tmp + "/run", compile=args.compile,
                              precision=args.precision)
            t0 = time.perf_counter()
            train(cfg, force=True, log=lambda *_: None)
            nl_s = time.perf_counter() - t0
            s = summary_of(tmp + "/run")
        rows.append({"seed": seed, "conventional": conv_acc, "normlab": s["test"]["acc"],
                     "normlab_best_epoch": s.get("best_epoch"), "conventional_s": conv_s, "normlab_s": nl_s})
        print(f"seed {seed}: test accuracy normlab {s['test']['acc']:.4f} ({nl_s:.0f} s)  conventional "
              f"{conv_acc:.4f} ({conv_s:.0f} s)", flush=True)
    res = {"subset": args.subset, "epochs": args.epochs, "runs": rows}
    for k in ("normlab", "conventional"):
        v = [r[k] for r in rows]
        res[k] = {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
    print(f"accuracy after {args.epochs} epoch(s) on {args.subset} images, {args.seeds} seeds: normlab "
          f"{res['normlab']['mean']:.4f} ± {res['normlab']['std']:.4f}, conventional "
          f"{res['conventional']['mean']:.4f} ± {res['conventional']['std']:.4f}", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None,
                    help=f"torch threads in both training processes (default: torch's own, {DEFAULT_THREADS} here)")
    ap.add_argument("--normlab-threads", type=int, default=None, help="torch threads, normlab side")
    ap.add_argument("--conv-threads", type=int, default=None, help="torch threads, conventional side")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-format", default="channels_last", choices=("channels_last", "contiguous"),
                    help="normlab side (normlab's default: channels_last)")
    ap.add_argument("--compile", default="off", choices=("off", "on"), help="normlab side: torch.compile")
    ap.add_argument("--no-fuse", action="store_true",
                    help="throughput, normlab side: blocks without the fused BN + ReLU + add (normlab's default fuses)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="normlab side: autocast precision (bf16 uses the CPU's AMX/AVX-512 bf16 units where present)")
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    ap.add_argument("--no-throughput", dest="throughput", action="store_false",
                    help="accuracy runs only (e.g. a longer budget: --epochs 8 --seeds 4)")
    ap.add_argument("--quick", action="store_true",
                    help="1 round of 20 steps, no accuracy run (with --no-throughput: 1 epoch, 2 seeds)")
    ap.add_argument("--out", default="pipeline.json")
    a = ap.parse_args(argv)
    if a.quick:  # accuracy-only runs shrink to 1 epoch x 2 seeds instead
        a.repeats, a.steps, a.warmup = 1, 20, 3
        if a.throughput:
            a.accuracy = False
        else:
            a.epochs, a.seeds = 1, 2
    torch.set_num_threads(a.threads or DEFAULT_THREADS)
    info = machine()
    print(info)
    out = {"machine": info, "args": vars(a)}
    if a.throughput:
        out["throughput"] = throughput(a)
    if a.accuracy:
        out["accuracy"] = accuracy(a)
    write_json(a.out, out)


if __name__ == "__main__":
    main()
