"""The training step and the CUDA paths that can be checked without a GPU: host syncs per step, resume on
another device, DDP start-up order, synchronised native BN, compile settings, the shared step function."""

from __future__ import annotations

import collections
import json
import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from normlab.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from normlab.config import make_config
from normlab.data.augmentations import apply_augment
from normlab.device import unwrap
from normlab.evaluation import confusion, confusion_add_
from normlab.models import ResNet
from normlab.registry import OPTIMIZERS
from normlab.train import distributed as dist_utils
from normlab.train import loop
from normlab.train.optim import build_optimizer, param_groups
from normlab.train.runtime import compile_settings, grad_scaler
from normlab.train.step import TrainStep, make_augment

# Tensor methods that read a device value on the host (each one a host-device sync on a GPU).
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")


def small_cfg(folder, out, **kw):
    base = dict(dataset="folder", data_root=str(folder), image_size=16, n=1, epochs=2, batch_size=16, lr=0.05,
                eval_batch_size=64, probe_size=16, progress="off", out=str(out), threads=1)
    base.update(kw)
    return make_config(base)


# Loading reads on the CPU before any device is involved, and a cache hit reads less than a miss.
LOADING = ("normlab.data.loader", "normlab.data.bundle", "normlab.data.splits", "normlab.data.images")


def count_host_reads(monkeypatch) -> collections.Counter:
    """Count host reads of tensor values made by normlab's own code (torch's internals excluded: on CPU
    their reads are no syncs, and on a GPU `bench/bench_gpu.py` checks the whole step with
    torch.cuda.set_sync_debug_mode)."""
    counts: collections.Counter = collections.Counter()
    for name in SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **kw):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("normlab.") and not caller.startswith(LOADING):
                counts[f"{caller}.{_name}"] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


def test_host_reads_per_epoch_do_not_grow_with_the_steps(image_folder, tmp_path, monkeypatch):
    """72 training images in 3 steps or 18 steps per epoch: the same number of host reads per run."""
    totals = {}
    for batch in (24, 4):
        counts = count_host_reads(monkeypatch)
        loop.train(small_cfg(image_folder, tmp_path / f"b{batch}", batch_size=batch, augment="standard",
                             norm="bin", grad_clip=1.0))
        monkeypatch.undo()
        totals[batch] = counts
        summary = json.loads((tmp_path / f"b{batch}" / "summary.json").read_text())
        assert summary["status"] == "finished"
    assert sum(totals[24].values()) > 0  # the counter sees normlab's reads (evaluation, metrics)
    assert totals[4] == totals[24], (totals[4], totals[24])


def test_the_check_interval_bounds_the_host_reads(image_folder, tmp_path, monkeypatch):
    """With a check every 4 steps, 18 steps per epoch read the flags 4 times + once at the epoch's end."""
    calls = []
    real = TrainStep.check

    def check(self):
        calls.append(self.steps_since_check)
        return real(self)

    monkeypatch.setattr(TrainStep, "check", check)
    orig_init = TrainStep.__init__

    def init(self, *a, **kw):
        kw["check_every"] = 4
        orig_init(self, *a, **kw)

    monkeypatch.setattr(TrainStep, "__init__", init)
    loop.train(small_cfg(image_folder, tmp_path / "run", batch_size=4, epochs=1))
    assert calls == [4, 4, 4, 4, 2]


def test_step_matches_apply_augment_and_bincount():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    for spec, params in (("standard", None), ("crop,hflip,cutout", "cutout.size=3")):
        a = apply_augment(x, spec, torch.Generator().manual_seed(3), params)
        b = make_augment(spec, params)(x, torch.Generator().manual_seed(3))
        assert torch.equal(a, b), spec
    assert make_augment("none") is None
    t, p = torch.randint(0, 5, (100,)), torch.randint(0, 5, (100,))
    expected = torch.bincount(t * 5 + p, minlength=25).reshape(5, 5)
    assert torch.equal(confusion(t, p, 5), expected)
    cm = torch.zeros(5, 5, dtype=torch.long)
    confusion_add_(cm, t[:40], p[:40])
    confusion_add_(cm, t[40:], p[40:])
    assert torch.equal(cm, expected)


def _cfg(**kw):
    return make_config({"dataset": "folder", "n": 1, "norm": "bin", "lr": 0.1, "progress": "off", **kw})


def test_the_step_records_the_first_non_finite_step_and_keeps_sums_on_the_device():
    torch.manual_seed(0)
    model = ResNet(1, 3, norm="bin")
    cfg = _cfg(augment="standard")
    opt = build_optimizer(model, cfg)
    st = TrainStep(model, model, opt, cfg, device=torch.device("cpu"), num_classes=3, mean=(0.5,) * 3,
                   std=(0.25,) * 3, steps_per_epoch=6, total_steps=6, check_every=100)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (8,))
    for s in range(2):
        st(x, y, s, g)
    assert st.check() is None and st.last_loss == st.last_loss
    loss_sum, cm, seen = st.sums()
    assert seen == 16 and int(cm.sum()) == 16 and loss_sum.dtype == torch.float64
    rho = [m.rho for m in model.modules() if hasattr(m, "rho")]
    with torch.no_grad():
        rho[0].fill_(3.0)
        rho[-1].fill_(-2.0)
    st(x, y, 2, g)
    assert float(rho[0].detach().max()) <= 1.0 and float(rho[-1].detach().min()) >= 0.0  # clamped after the step
    hook = next(model.parameters()).register_hook(lambda grad: grad * float("inf"))
    st(x, y, 3, g)
    hook.remove()
    st(x, y, 4, g)  # non-finite from here on (the weights took the inf step): the first one is kept
    bad = st.check()
    assert bad is not None and (bad.step, bad.grad) == (3, True) and bad.loss == bad.loss
    assert bad.record(1) == {"epoch": 1, "step": 3, "loss": bad.loss, "grad": "non-finite"}
    st.begin_epoch()
    assert st.check() is None


class HostReads(TorchDispatchMode):
    """Counts the host's reads of tensor values by any caller, torch's own code included: ``item``, ``bool``,
    ``int``, ``float`` all end in ``aten._local_scalar_dense``. ``tolist``, ``numpy`` and ``cpu`` do not
    dispatch it on a CPU, so they raise while the mode is on."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads = 0
        for name in ("tolist", "numpy", "cpu"):
            def refuse(self, *a, _name=name, **kw):
                raise AssertionError(f"Tensor.{_name} in a steady-state step")
            monkeypatch.setattr(torch.Tensor, name, refuse)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _scaled_step(optimizer="sgd", make_optimizer=None):
    """A fp16 TrainStep of a small BIN ResNet with a CPU grad scaler and clipping (so the scaler's
    ``unscale_`` runs before ``step``, as in training): ``(step, run(step_index))``."""
    torch.manual_seed(0)
    model = ResNet(1, 3, norm="bin")
    cfg = _cfg(optimizer=optimizer, precision="fp16", grad_clip=1.0, augment="standard")
    opt = build_optimizer(model, cfg) if make_optimizer is None else make_optimizer(model)
    st = TrainStep(model, model, opt, cfg, device=torch.device("cpu"), num_classes=3, mean=(0.5,) * 3,
                   std=(0.25,) * 3, steps_per_epoch=10, total_steps=10, check_every=100,
                   scaler=torch.amp.GradScaler("cpu"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (8,))
    return st, lambda s: st(x, y, s, g)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fp16_steps_with_the_grad_scaler_read_nothing_on_the_host(name, monkeypatch):
    """The optimizers normlab builds are fused: the scaler hands them its found-inf flag as a tensor
    instead of reading it with ``.item()`` in every ``step``."""
    st, run = _scaled_step(name)
    assert st.optimizer.param_groups[0]["fused"] is True
    for s in range(2):  # warm-up: the scaler's and the optimizer's state are created here
        run(s)
    with HostReads(monkeypatch) as mode:
        for s in range(2, 5):
            run(s)
    monkeypatch.undo()
    assert mode.reads == 0
    assert st.check() is None


def test_the_host_read_counter_sees_the_scalers_read_with_an_unfused_optimizer(monkeypatch):
    st, run = _scaled_step(make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9,
                                                                    foreach=True))
    for s in range(2):
        run(s)
    with HostReads(monkeypatch) as mode:
        for s in range(2, 5):
            run(s)
    assert mode.reads >= 3  # GradScaler.step: found_inf.item(), once per step


def _snapshot(st):
    params = [p.detach().clone() for p in st.params]
    state = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for s in st.optimizer.state.values()]
    return params, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_step_with_an_inf_gradient_is_skipped_on_the_device(name):
    """After the explicit unscale_ and clipping (which turns the inf gradient into nan), the fused step
    still skips: weights and optimizer state unchanged, the scale halved, no divergence recorded."""
    st, run = _scaled_step(name)
    for s in range(3):
        run(s)
    params, state = _snapshot(st)
    scale = st.scaler.get_scale()
    hook = st.params[0].register_hook(lambda grad: grad * float("inf"))
    run(3)
    hook.remove()
    after, state_after = _snapshot(st)
    assert all(torch.equal(a, b) for a, b in zip(params, after))
    assert len(state) == len(state_after) > 0
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(state, state_after))
    assert st.scaler.get_scale() == scale * 0.5
    run(4)
    assert not torch.equal(params[0], st.params[0].detach())  # the next good step moves the weights again
    assert st.check() is None  # skipped by the scaler: not a divergence


def test_sgd_skipping_its_first_step_keeps_zero_momentum(monkeypatch):
    """Fused SGD allocates its momentum buffers uninitialised at its first step and leaves them so when the
    scaler skips that step (fp16's first steps often overflow). Here uninitialised memory reads as nan:
    normlab's zero buffers must survive the skipped step, and the next steps match unfused SGD's."""
    fused, run_fused = _scaled_step("sgd")
    plain, run_plain = _scaled_step(make_optimizer=lambda m: torch.optim.SGD(
        param_groups(m, make_config({}).weight_decay), lr=0.1, momentum=0.9, foreach=True))
    for st, run in ((fused, run_fused), (plain, run_plain)):
        hook = st.params[0].register_hook(lambda grad: grad * float("inf"))
        with monkeypatch.context() as m:
            m.setattr(torch, "empty_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))
            run(0)
        hook.remove()
    buffers = [s["momentum_buffer"] for s in fused.optimizer.state.values()]
    assert len(buffers) == len(fused.params) and all(int(torch.count_nonzero(b)) == 0 for b in buffers)
    assert not plain.optimizer.state  # unfused: the scaler never called its step
    for s in (1, 2):
        run_fused(s)
        run_plain(s)
    for a, b in zip(fused.params, plain.params):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_resume_reads_on_the_cpu_and_lands_on_the_models_device(tmp_path, monkeypatch):
    """A checkpoint written on one device resumes a model on another (here: the meta device, which holds
    no data but checks placement): last.pt is read with map_location="cpu", the optimizer state moves to
    the parameters' device, the RNG state is restored as a CPU tensor."""
    torch.manual_seed(0)
    cfg = _cfg(optimizer="adamw")
    model = ResNet(1, 3, norm="bn")
    opt = build_optimizer(model, cfg)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    torch.manual_seed(123)
    saved_rng = rng_state()
    save_checkpoint(tmp_path / "last.pt", model, cfg, optimizer=opt.state_dict(), rng=saved_rng,
                    state={"epoch": 1, "best_acc": 0.5}, scaler=None)
    torch.manual_seed(999)

    with torch.device("meta"):
        other = ResNet(1, 3, norm="bn")
    other_opt = build_optimizer(other, cfg)
    seen = {}
    real_load = torch.load

    def spy(*a, **kw):
        seen["map_location"] = kw.get("map_location")
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    state = {"epoch": 0}
    loop.resume_from(tmp_path / "last.pt", other, other_opt, None, state)
    assert seen["map_location"] == "cpu"
    assert state == {"epoch": 1, "best_acc": 0.5}
    exp_avg = [s["exp_avg"] for s in other_opt.state.values()]
    assert exp_avg and all(t.device.type == "meta" for t in exp_avg)
    assert torch.equal(torch.get_rng_state(), saved_rng["torch"])


def test_rng_state_on_another_device_is_brought_back_to_the_cpu():
    torch.manual_seed(7)
    state = rng_state()
    expected = state["torch"].clone()
    on_gpu = mock.Mock(spec=torch.Tensor)  # what map_location="cuda" used to hand over
    on_gpu.detach.return_value.to.return_value = expected
    state["torch"] = on_gpu
    torch.manual_seed(8)
    set_rng_state(state)
    on_gpu.detach.return_value.to.assert_called_once_with("cpu", torch.uint8)
    assert torch.equal(torch.get_rng_state(), expected)
    # a CUDA state in a checkpoint read where no GPU is visible is ignored, not an error
    set_rng_state({**rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)]})


def test_ddp_setup_selects_the_gpu_before_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    info = dist_utils.setup("cuda")
    gpu1 = torch.device("cuda", 1)
    assert calls == [("set_device", gpu1), ("init", {"backend": "nccl", "device_id": gpu1})]
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)

    calls.clear()
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append(("barrier", kw)))
    dist_utils.barrier(info)
    assert calls == [("barrier", {"device_ids": [1]})]

    calls.clear()
    info = dist_utils.setup("cpu")
    assert calls == [("init", {"backend": "gloo"})]


def test_native_batchnorm_is_synchronised_on_cuda_and_said_to_be_per_process_on_cpu():
    model = ResNet(1, 3, norm="torch_bn")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    synced = dist_utils.sync_native_batchnorm(model, torch.device("cuda", 0))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == n_bn > 0
    messages = []
    same = dist_utils.sync_native_batchnorm(ResNet(1, 3, norm="torch_bn"), torch.device("cpu"), messages.append)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in same.modules())
    assert len(messages) == 1 and "SyncBatchNorm needs a GPU" in messages[0]
    normlab_bn = ResNet(1, 3, norm="bn")
    assert dist_utils.sync_native_batchnorm(normlab_bn, torch.device("cuda", 0)) is normlab_bn


def test_compile_auto_means_cuda_and_cuda_graphs_are_opt_in(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("NORMLAB_COMPILE_MODE", raising=False)
    assert compile_settings("auto", cuda).enabled and not compile_settings("auto", cuda).cuda_graphs
    assert not compile_settings("auto", cpu).enabled and not compile_settings("off", cuda).enabled
    assert compile_settings("on", cpu).enabled
    monkeypatch.setenv("NORMLAB_COMPILE_MODE", "reduce-overhead")
    assert compile_settings("auto", cuda).cuda_graphs and compile_settings("auto", cuda).mode == "reduce-overhead"
    assert not compile_settings("auto", cuda, distributed=True).cuda_graphs
    assert not compile_settings("on", cpu).cuda_graphs
    assert make_config({}).compile == "auto"


def test_fp16_scaler_only_on_cuda_and_unwrap_any_nesting():
    assert grad_scaler(torch.device("cpu"), "fp16") is None
    scaler = grad_scaler(torch.device("cuda", 0), "fp16")
    assert isinstance(scaler, torch.amp.GradScaler) and scaler._device == "cuda"
    assert grad_scaler(torch.device("cuda", 0), "bf16") is None
    inner = nn.Linear(2, 2)

    class Wrap(nn.Module):
        def __init__(self, m, attr):
            super().__init__()
            setattr(self, attr, m)

    assert unwrap(Wrap(Wrap(inner, "_orig_mod"), "module")) is inner
    assert unwrap(Wrap(Wrap(inner, "module"), "_orig_mod")) is inner
    assert unwrap(inner) is inner


def test_checkpoint_module_is_the_one_train_uses(tmp_path):
    cfg = _cfg()
    model = ResNet(1, 3, norm="bn")
    save_checkpoint(tmp_path / "w.pt", model, cfg)
    assert loop.save_checkpoint is save_checkpoint and loop.load_checkpoint is load_checkpoint
    assert set(load_checkpoint(tmp_path / "w.pt")["model"]) == set(model.state_dict())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_state_saved_unfused_loads_fused_and_steps_under_the_scaler(name, monkeypatch):
    """``load_state_dict`` takes every param group's settings from the saved state: an unfused one (an older
    checkpoint) would unfuse the optimizer, and the scaler, which still hands it found_inf, would make torch's
    unfused step fail. The optimizer keeps the settings it was built with: the resumed steps read nothing on
    the host either."""
    st, run = _scaled_step(name)
    for s in range(2):
        run(s)
    saved = st.optimizer.state_dict()
    for group in saved["param_groups"]:
        group["fused"], group["foreach"] = None, True  # as an unfused optimizer writes it
    st.optimizer.load_state_dict(saved)
    assert all(g["fused"] is True for g in st.optimizer.param_groups)
    run(2)
    with HostReads(monkeypatch) as mode:
        run(3)
    monkeypatch.undo()
    assert mode.reads == 0 and st.check() is None
