"""Optimizer and learning-rate schedule builders. The learning rate is a pure function of the step."""

from __future__ import annotations

import torch
from torch import nn

from normlab.config import TrainConfig
from normlab.registry import OPTIMIZERS, SCHEDULES, choose


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on tensors with 2+ dims (conv and linear weights), never on norm affines,
    BIN gates or biases: decaying a norm's scale towards 0 fights the normalization itself."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over the model's trainable parameters, after the model is on its device: the
    optimizer is fused on CPU and CUDA (``registry.fused_step`` says why)."""
    return choose(OPTIMIZERS, cfg.optimizer, "optimizer")(param_groups(model, cfg.weight_decay), cfg)


def lr_at(step: int, total_steps: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total_steps - warmup)  # progress after warm-up, in [0, 1)
    return choose(SCHEDULES, cfg.schedule, "schedule")(t, cfg)
