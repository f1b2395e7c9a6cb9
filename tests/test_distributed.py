"""DistributedDataParallel on CPU with the gloo backend: synchronized batch statistics and torchrun training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from normlab.models import ResNet


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(128, 3, 16, 16, generator=g) * 2 + 0.5, torch.randint(0, 10, (128,), generator=g)


def _model(norm: str, sync: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return ResNet(1, 10, norm=norm, norm_kwargs={"sync": sync})


def _stats(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _worker(rank: int, world: int, store_dir: str, norm: str, sync: bool) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(store_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        model = _model(norm, sync)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = _batch()
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = F.cross_entropy(ddp(xs), ys)
        loss.backward()  # DDP averages the gradients over the ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.save({"loss": mean_loss / world, "grads": {n: p.grad for n, p in model.named_parameters()},
                    "stats": _stats(model)}, os.path.join(store_dir, f"rank{rank}.pt"))
        # both ranks destroy the group together, as normlab's training loop does: a rank that tore gloo down
        # while its peer was still finishing its side aborted the peer ("terminate called without an active
        # exception", SIGABRT) once in a CI run
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _single(norm: str):
    model = _model(norm, sync=False)
    x, y = _batch()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, _stats(model)


def _run_two(tmp_path, norm: str, sync: bool):
    mp.spawn(_worker, args=(2, str(tmp_path), norm, sync), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("norm", ["bn", "bin", "sn", "mobn"])  # sn, mobn: batch statistics synced by the spec engine
def test_synced_two_process_step_equals_one_process_on_the_whole_batch(tmp_path, norm):
    loss, grads, stats = _single(norm)
    ranks = _run_two(tmp_path, norm, sync=True)
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        for name, s in stats.items():
            torch.testing.assert_close(r["stats"][name], s, rtol=1e-5, atol=1e-6, msg=name)


def test_unsynced_two_process_statistics_differ(tmp_path):
    _, _, stats = _single("bn")
    ranks = _run_two(tmp_path, "bn", sync=False)
    name = "stem.1.running_var"
    assert not torch.allclose(ranks[0]["stats"][name], stats[name], rtol=1e-3)
    assert not torch.allclose(ranks[0]["stats"][name], ranks[1]["stats"][name], rtol=1e-3)


def _metrics(run) -> list[dict[str, str]]:
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


ENV_1_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def _small_run_args(folder, epochs: int) -> list[str]:
    return ["--dataset", "folder", "--data-root", str(folder), "--image-size", "16", "--depth", "1", "--epochs",
            str(epochs), "--batch-size", "16", "--lr", "0.05", "--progress", "plain", "--threads", "1"]


def _torchrun_train(args: list[str], out) -> subprocess.CompletedProcess:
    # --standalone: torchrun binds its own free port (a port picked here could be taken before it binds)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "normlab", "train", *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=ENV_1_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_torchrun_two_processes_train_end_to_end(image_folder, tmp_path):
    common = _small_run_args(image_folder, epochs=2) + ["--augment", "standard"]
    env = ENV_1_THREAD
    two = tmp_path / "two"
    res = _torchrun_train(common, two)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_run"] == 2
    rows = _metrics(two)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # rank 0 alone writes: one line per epoch in the log, not two
    assert res.stderr.count("epoch   2/2") == 1
    one = tmp_path / "one"
    res1 = subprocess.run([sys.executable, "-m", "normlab", "train", *common, "--out", str(one)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert res1.returncode == 0, res1.stderr[-3000:]
    a, b = _metrics(one), _metrics(two)
    # the same global batches, the same crops and synchronized BN statistics: only rounding differs
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert abs(float(ra[key]) - float(rb[key])) < 0.01, (key, ra, rb)


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_on_one(image_folder, tmp_path):
    """A run trained for an epoch on 2 ranks continues on 1 process from its last.pt."""
    import yaml

    run = tmp_path / "run"
    _torchrun_train(_small_run_args(image_folder, epochs=1), run)
    # pretend it had been asked for 2 epochs and stopped after the first (as a killed run would be)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["epochs"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "summary.json").unlink()
    res = subprocess.run([sys.executable, "-m", "normlab", "train", "--resume", str(run)],
                         capture_output=True, text=True, timeout=600, env=ENV_1_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stderr
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2"]
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 2
