"""Target 2: training images/s of normlab's pipeline vs a conventional PyTorch pipeline, same model and batch.

normlab: the CIFAR-10 JPEG tarball decoded once into normlab's uint8 cache (``load_data``, warm cache),
then per step exactly what ``normlab.train.loop`` does: index the resident uint8 tensor, ``augment_batch``
(pad 4 + random crop + flip, vectorised), ``normalize``, forward/backward/SGD step of ResNet-20 with
normlab's BatchNorm2d.

conventional: torchvision ``ImageFolder`` over the unpacked JPEG folder, ``DataLoader`` with worker
processes (``--workers``, default 2 = the machine's cores), PIL transforms (RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor, Normalize), the eager model with ``nn.BatchNorm2d`` in NCHW.

Both: ResNet-20, batch 128, SGD(lr 0.1, momentum 0.9, wd 5e-4), the same torch thread count in the
training process (``--threads``, default 1; see bench_norms.py for why). Throughput: images/s over
``--steps`` (40) steps after ``--warmup`` (5) steps, in ``--repeats`` alternating rounds.

Accuracy (``--accuracy``, on by default, off with ``--quick``): one epoch on a 10k stratified subset of
train (1000 per class, cosine lr over the epoch), test accuracy on the full 10k test folder, same seed.
normlab's side runs ``normlab.train.loop.train`` itself; the conventional side its own loop.

    python bench/bench_pipeline.py           # ~5 min here
    python bench/bench_pipeline.py --quick   # 1 round, no accuracy
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

def conventional(root: Path, workers: int, subset: list[int] | None = None, train: bool = True):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = (T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
          if train else T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)]))
    ds = ImageFolder(str(root / ("train" if train else "test")), transform=tf)
    if subset is not None:
        ds = torch.utils.data.Subset(ds, subset)
    g = torch.Generator().manual_seed(0)
    return ds, torch.utils.data.DataLoader(ds, batch_size=128, shuffle=train, num_workers=workers, drop_last=train,
                                           persistent_workers=workers > 0, generator=g)


def conv_model():
    from normlab.models.resnet import ResNet

    torch.manual_seed(0)
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


def normlab_steps(threads: int, channels_last: bool, compile_mode: str):
    """The inner step of normlab.train.loop, on normlab's warm uint8 cache."""
    from normlab.data import augment_batch, load_data, normalize
    from normlab.models import build_model
    from normlab.train.loop import epoch_generator
    from normlab.train.runtime import maybe_compile

    cfg = normlab_cfg(threads=threads, compile=compile_mode)
    data = load_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, data.in_channels, data.num_classes).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = sgd(model)
    run_model = maybe_compile(model, compile_mode, torch.device("cpu"))
    train_x, train_y = data.train_x, data.train_y
    epoch = 0
    while True:
        epoch += 1
        order = torch.randperm(len(train_x), generator=epoch_generator(0, epoch, 0))
        gen = epoch_generator(0, epoch, 1)
        for step in range(len(train_x) // 128):
            idx = order[step * 128:(step + 1) * 128]
            xb = normalize(augment_batch(train_x[idx], gen), data.mean, data.std)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(run_model(xb), train_y[idx]).backward()
            opt.step()
            yield


def throughput(args) -> dict:
    root = unpacked(TARBALL)
    t0 = time.perf_counter()
    sides = {"normlab": normlab_steps(args.threads, args.channels_last, args.compile),
             "conventional": conventional_steps(root, args.workers)}
    threads = {"normlab": args.normlab_threads or args.threads, "conventional": args.conv_threads or args.threads}
    first = {}
    for k, it in sides.items():
        torch.set_num_threads(threads[k])
        t = time.perf_counter()
        next(it)
        first[k] = time.perf_counter() - t
        for _ in range(args.warmup):
            next(it)
    ips = {k: [] for k in sides}
    ratios = []
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
    for it in sides.values():
        it.close()
    res = {"threads": threads, "normlab_img_s": summary(ips["normlab"]), "conventional_img_s": summary(ips["conventional"]),
           "ratio": summary(ratios), "first_step_s": first, "setup_s": time.perf_counter() - t0}
    print(f"images/s: normlab {fmt(res['normlab_img_s'], 0)}  conventional {fmt(res['conventional_img_s'], 0)}  "
          f"ratio {fmt(res['ratio'], 2)}", flush=True)
    return res


# ----------------------------------------------------------------------------------------------- accuracy

def stratified(targets: list[int], per_class: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(targets)
    out = []
    for c in t.unique().tolist():
        idx = (t == c).nonzero().flatten()
        out += idx[torch.randperm(len(idx), generator=g)[:per_class]].tolist()
    return sorted(out)


def accuracy(args) -> dict:
    from torchvision.datasets import ImageFolder

    from normlab.train.loop import summary_of, train

    root = unpacked(TARBALL)
    torch.set_num_threads(args.conv_threads or args.threads)
    # conventional: 1 epoch on a stratified 10k subset, cosine lr, test on the full test folder
    full = ImageFolder(str(root / "train"))
    subset = stratified(full.targets, args.subset // 10)
    _, loader = conventional(root, args.workers, subset)
    model = conv_model().train()
    opt = sgd(model)
    total = len(loader) * args.epochs
    step = 0
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for x, y in loader:
            for gr in opt.param_groups:
                gr["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
    conv_train_s = time.perf_counter() - t0
    model.eval()
    _, test_loader = conventional(root, args.workers, train=False)
    correct = n = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += (model(x).argmax(1) == y).sum().item()
            n += len(y)
    conv_acc = correct / n
    # normlab: its own training loop, same budget
    with tempfile.TemporaryDirectory() as tmp:
        cfg = normlab_cfg(threads=args.normlab_threads or args.threads, train_subset=args.subset, epochs=args.epochs, out=tmp + "/run",
                          compile=args.compile)
        t0 = time.perf_counter()
        train(cfg, force=True, log=lambda *_: None)
        nl_wall = time.perf_counter() - t0
        s = summary_of(tmp + "/run")
    res = {"subset": args.subset, "epochs": args.epochs, "conventional_test_acc": conv_acc,
           "conventional_train_s": conv_train_s, "normlab_test_acc": s["test"]["acc"],
           "normlab_epoch_s": s["seconds_per_epoch"], "normlab_wall_s": nl_wall}
    print(f"accuracy after {args.epochs} epoch(s) on {args.subset} images: normlab {res['normlab_test_acc']:.4f} "
          f"conventional {conv_acc:.4f}", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--normlab-threads", type=int, default=None, help="torch threads, normlab side")
    ap.add_argument("--conv-threads", type=int, default=None, help="torch threads, conventional side")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--channels-last", action="store_true", help="normlab side in channels_last")
    ap.add_argument("--compile", default="off", choices=("off", "on"), help="normlab side: torch.compile")
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    ap.add_argument("--quick", action="store_true", help="1 round of 20 steps, no accuracy run")
    ap.add_argument("--out", default="pipeline.json")
    a = ap.parse_args(argv)
    if a.quick:
        a.repeats, a.steps, a.warmup, a.accuracy = 1, 20, 3, False
    torch.set_num_threads(a.threads)
    info = machine()
    print(info)
    out = {"machine": info, "args": vars(a), "throughput": throughput(a)}
    if a.accuracy:
        out["accuracy"] = accuracy(a)
    write_json(a.out, out)


if __name__ == "__main__":
    main()
