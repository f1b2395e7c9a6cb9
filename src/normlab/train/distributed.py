"""torch.distributed helpers: set up from torchrun's environment, rank-0-only side effects."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> tuple[int, int, int | None]:
    """``(WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)`` as torchrun sets them: ``(1, 0, None)`` without torchrun
    (``None``: not set)."""
    env = os.environ
    local_world = env.get("LOCAL_WORLD_SIZE")
    return int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")), int(local_world) if local_world else None


def world_of() -> dict[str, Any]:
    """Processes of this run (torchrun): world size, ranks, per-node processes and nodes; 1 otherwise (an
    unset ``LOCAL_WORLD_SIZE``: one node)."""
    world, _, local = torchrun_env()
    backend = None
    if dist.is_available() and dist.is_initialized():
        world, backend = dist.get_world_size(), dist.get_backend()
    local = local or world
    return {"world_size": world, "ranks": list(range(world)), "local_world_size": local,
            "nodes": max(1, world // max(1, local)), "backend": backend}


def setup(device_kind: str) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise.

    On CUDA each rank selects its GPU (``LOCAL_RANK``, counted within ``CUDA_VISIBLE_DEVICES``) *before*
    the process group exists and binds the group to it (``device_id``): otherwise NCCL's first
    collective (the start-up barrier) runs every rank on GPU 0, which can hang or put all ranks'
    memory on one card."""
    world, local_rank, _ = torchrun_env()
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        if device_kind == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if dist.get_backend() == "nccl":  # on this rank's GPU (set in setup), never GPU 0 by default
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def sync_native_batchnorm(model: nn.Module, device: torch.device, log=None) -> nn.Module:
    """PyTorch's own BatchNorm layers (the ``torch_bn`` reference, resnet18's BN) made to share batch
    statistics across ranks like normlab's synced BN, so the reference compares like with like.

    ``nn.SyncBatchNorm`` runs on GPUs only (it refuses CPU tensors in training): on CPU (gloo) the native
    layers stay per-process, and ``log`` says so."""
    native = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and not isinstance(m, nn.SyncBatchNorm)]
    if not native:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if log is not None:
        log(f"warning: {len(native)} native torch.nn BatchNorm layer(s) keep per-process statistics under "
            f"distributed training on {device.type} (torch's SyncBatchNorm needs a GPU): the torch_bn "
            "reference is not synchronised across ranks here, normlab's bn and bin are")
    return model


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if it is True on any rank (used to stop all ranks together; once per epoch: it
    reads the result on the host)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
