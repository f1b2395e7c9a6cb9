"""Adaptive gradient clipping (Brock et al. 2021, NFNets): each unit's gradient is clipped to ``factor`` times
its weight's norm, unit-wise (a row of a linear layer, a filter of a conv; the whole tensor for 1-d ones)."""

from __future__ import annotations

import torch
from torch import nn


def _unitwise_norm(t: torch.Tensor) -> torch.Tensor:
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True)


@torch.no_grad()
def adaptive_clip_(params: list[torch.Tensor], factor: float, eps: float = 1e-3) -> None:
    """In place: ``g ← g · min(1, factor·max(‖w‖, eps) / ‖g‖)`` per unit; tensor ops only (no host sync)."""
    for p in params:
        if p.grad is None:
            continue
        w_norm = _unitwise_norm(p.detach()).clamp_min(eps)
        g_norm = _unitwise_norm(p.grad)
        max_norm = w_norm * factor
        clipped = p.grad * (max_norm / g_norm.clamp_min(1e-6))
        p.grad.copy_(torch.where(g_norm < max_norm, p.grad, clipped))


def agc_params(model: nn.Module) -> list[torch.Tensor]:
    """The parameters AGC clips: all trainable ones except the classifier's (the last Linear), as the paper."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = {id(p) for p in linears[-1].parameters()} if linears else set()
    return [p for p in model.parameters() if p.requires_grad and id(p) not in head]
