"""Optimizer and learning-rate schedule builders. The learning rate is a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from normlab.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on tensors with 2+ dims (conv and linear weights), never on norm affines,
    BIN gates or biases: decaying a norm's scale towards 0 fights the normalization itself."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_at(step: int, total_steps: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total_steps - warmup)  # progress after warm-up, in [0, 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** sum(t >= m for m in cfg.step_milestones)
    # one-cycle: linear rise from lr/25 over the first 30 %, then cosine down to lr/1e4
    if t < 0.3:
        return cfg.lr / 25 + (cfg.lr - cfg.lr / 25) * t / 0.3
    return cfg.lr / 1e4 + 0.5 * (cfg.lr - cfg.lr / 1e4) * (1 + math.cos(math.pi * (t - 0.3) / 0.7))
