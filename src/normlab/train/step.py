"""The training step of ``normlab train``: one function that the loop and the benchmarks both run.

One call = learning rate for the step, augmentation of the global batch (this rank's share kept),
normalisation, forward under autocast, loss, backward (through the grad scaler for fp16 on CUDA),
gradient clipping or the gradient norm, optimizer step, BIN gate clamping, and the epoch's loss and
confusion sums.

Nothing in a step reads a value back to the host. On a GPU the host queues steps ahead of the device;
any ``.item()``, Python ``bool`` of a tensor, ``bincount`` or pageable copy would make it wait for the
device every step. So the epoch's sums and the non-finite flags stay on the device, and :meth:`check`
reads them once per ``check_every`` steps (and before every checkpoint): a diverged run is caught at the
first check after its first bad step, which is recorded exactly. The steps between a bad step and that
check run on non-finite values and are thrown away with the run; no checkpoint is written after them.
Under fp16 the grad scaler's skip of an overflowed step happens on the device too: the optimizer is fused
and takes the scaler's found-inf flag as a tensor (``registry.fused_step``).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normlab.data.augment import normalize
from normlab.data.augmentations import CATALOGUE, check_augment, settings
from normlab.device import autocast, unwrap
from normlab.evaluation import confusion_add_, sum_dtype
from normlab.norms import BatchInstanceNorm2d
from normlab.train.agc import adaptive_clip_, agc_params
from normlab.train.optim import lr_at

CHECK_EVERY = 50  # steps between host reads of the device-side flags and the progress bar's loss
_NONE = torch.iinfo(torch.long).max  # "no bad step yet"


def make_augment(spec: str, params: str | Mapping[str, Any] | None = None,
                 ) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """``--augment`` and ``--augment-params`` parsed and checked once, as one function ``(x, generator) -> x``
    applying the same transforms as ``apply_augment(x, spec, generator, params)``; ``None`` for ``none``."""
    names, parsed = check_augment(spec, params)
    if not names:
        return None
    chain = [(CATALOGUE[name][0], settings(name, parsed)) for name in names]

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for fn, kw in chain:
            x = fn(x, generator, **kw)
        return x

    return augment


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The 2-norm of all gradients together (``nn.utils.get_total_norm`` where torch has it: 2.6+)."""
    if not grads:
        return None
    if hasattr(nn.utils, "get_total_norm"):
        return nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


@dataclass
class Divergence:
    """The first step of an interval whose loss or gradient was not finite."""

    step: int  # step within the epoch
    loss: float
    grad: bool  # True: the loss was finite, the gradient was not

    def record(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "step": self.step, "loss": self.loss, **({"grad": "non-finite"} if self.grad else {})}


class TrainStep:
    """``step(xb_uint8, yb, step, generator)`` runs one optimizer step on the global batch ``xb_uint8``
    (uint8, on the device) and its labels; :meth:`begin_epoch`, :meth:`check` and :meth:`sums` bracket
    an epoch. ``model`` is the plain module (its parameters, gates); ``run_model`` is what is called
    (the same module, or its DDP / compiled wrapper)."""

    def __init__(self, model: nn.Module, run_model: nn.Module, optimizer: torch.optim.Optimizer, cfg, *,
                 device: torch.device, num_classes: int, mean, std, steps_per_epoch: int, total_steps: int,
                 scaler: torch.amp.GradScaler | None = None, rank: int = 0, world_size: int = 1,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 check_every: int = CHECK_EVERY, all_reduce_min: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 mark_step: bool = False) -> None:
        self.model, self.run_model, self.optimizer, self.cfg = unwrap(model), run_model, optimizer, cfg
        self.device, self.k, self.mean, self.std = device, num_classes, mean, std
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.scaler, self.rank, self.world_size, self.fmt = scaler, rank, world_size, memory_format
        self.check_every = max(1, int(check_every))
        self.all_reduce_min = all_reduce_min
        self.mark_step = mark_step  # CUDA graphs: a new step begins, the previous one's outputs may be reused
        self.augment = make_augment(cfg.augment, cfg.augment_params)
        # found once: walking every module after every step cost as much for a bn model as for bin
        self.gates = [m.rho for m in self.model.modules() if isinstance(m, BatchInstanceNorm2d)]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.agc_params = agc_params(self.model) if getattr(cfg, "agc", None) else []
        self.begin_epoch()

    def begin_epoch(self) -> None:
        dev = self.device
        self.loss_sum = torch.zeros((), dtype=sum_dtype(dev), device=dev)
        self.cm = torch.zeros(self.k, self.k, dtype=torch.long, device=dev)
        self.seen = 0
        self.steps_since_check = 0
        self._first_bad = torch.full((), _NONE, dtype=torch.long, device=dev)
        self._bad_loss = torch.zeros((), dtype=torch.float32, device=dev)
        self._bad_grad = torch.zeros((), dtype=torch.bool, device=dev)
        self._last_loss = torch.zeros((), dtype=torch.float32, device=dev)
        self.last_loss: float | None = None

    def set_lr(self, global_step: int) -> float:
        lr = lr_at(global_step, self.total_steps, self.cfg, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor, step: int, generator: torch.Generator,
                 global_step: int | None = None) -> None:
        cfg = self.cfg
        self.set_lr(global_step if global_step is not None else step)
        # The whole global batch is augmented on every rank (cheap next to the model), then each rank keeps
        # its share: every image gets the same crop/flip as in a 1-process run of the same seed.
        if self.augment is not None:
            xb = self.augment(xb, generator)
        if self.world_size > 1:
            xb, yb = xb.tensor_split(self.world_size)[self.rank], yb.tensor_split(self.world_size)[self.rank]
        xb = normalize(xb, self.mean, self.std).contiguous(memory_format=self.fmt)
        if self.mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(self.device, cfg.precision):
            logits = self.run_model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clipping and the norm below see the true gradients
        else:
            loss.backward()
        if self.agc_params:  # adaptive gradient clipping (NF-ResNets), on the true (unscaled) gradients
            adaptive_clip_(self.agc_params, cfg.agc)
        if cfg.grad_clip is not None:
            gnorm = nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:  # still computed: an inf gradient at the last step would otherwise be saved as nan weights
            gnorm = total_norm([p.grad for p in self.params if p.grad is not None])
        loss = loss.detach()
        loss_ok = torch.isfinite(loss)
        # With the scaler, inf/nan gradients are its business: it skips that step and lowers the scale.
        ok = loss_ok if self.scaler is not None or gnorm is None else loss_ok & torch.isfinite(gnorm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            if self.gates:  # BIN's gates back into [0, 1] (clamp_gates_ without its walk over all modules)
                torch._foreach_clamp_min_(self.gates, 0.0)
                torch._foreach_clamp_max_(self.gates, 1.0)
            newly = ~ok & (self._first_bad == _NONE)
            self._first_bad.masked_fill_(newly, step)
            self._bad_loss = torch.where(newly, loss.float(), self._bad_loss)
            self._bad_grad = self._bad_grad | (newly & loss_ok)
            self._last_loss = loss.float()
            self.loss_sum += loss.to(self.loss_sum.dtype) * len(yb)
            confusion_add_(self.cm, yb, logits.detach().argmax(1))
        self.seen += len(yb)
        self.steps_since_check += 1

    def due(self) -> bool:
        return self.steps_since_check >= self.check_every

    def check(self) -> Divergence | None:
        """The first non-finite step since :meth:`begin_epoch` on any rank, or None; one host read (plus one
        all-reduce under DDP). Also refreshes :attr:`last_loss` for the progress display."""
        self.steps_since_check = 0
        first = self._first_bad if self.all_reduce_min is None else self.all_reduce_min(self._first_bad.clone())
        first_bad, mine, bad_loss, bad_grad, last = torch.stack(
            [first.double(), self._first_bad.double(), self._bad_loss.double(), self._bad_grad.double(),
             self._last_loss.double()]).tolist()
        self.last_loss = last
        if first_bad >= _NONE:
            return None
        if mine != first_bad:  # another rank went first: its loss is not known here
            bad_loss, bad_grad = float("nan"), 0.0
        return Divergence(int(first_bad), bad_loss, bool(bad_grad))

    def sums(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's (loss sum, confusion matrix, images seen) of the epoch so far, on the device."""
        return self.loss_sum, self.cm, self.seen
