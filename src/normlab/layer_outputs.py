"""Record what named layers output during a forward pass: the one way normlab probes a model's layers (the
training loop's feature quantiles, the feature-map grids). Forward hooks are registered on entry and every one
is removed on exit, whatever happens in between -- the way pytorch-grad-cam releases its hooks.

The hooks go through each layer's own ``register_forward_hook`` and their handles' ``remove()``: normlab's norms
and the registry's ReLU report both to the block that owns them (``normlab.norms._hooks``), so a block does not
fuse past a recorded layer while it is recorded, and fuses again once the recording ends.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn


@contextmanager
def record_outputs(layers: Mapping[str, nn.Module],
                   keep: Callable[[torch.Tensor], Any] = torch.Tensor.detach) -> Iterator[dict[str, Any]]:
    """``with record_outputs({"stage1": model.stages[0]}) as out: model(x)`` leaves ``keep(output)`` of every
    named layer in ``out[name]`` (the last call's, should a layer run twice). All hooks are removed on exit, also
    when the forward pass raises or registering one of them fails."""
    out: dict[str, Any] = {}
    handles = []

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            out[name] = keep(output)
        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_hook(hook_for(name)))
        yield out
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["record_outputs"]
