"""Helpers shared by the norm tests (tests/test_norms.py: what each norm is; tests/test_cpp_kernels.py: the C++
kernels under them): the autouse back-end fixture, tolerances, inputs, a forward + backward step compared with a
reference layer, and BIN with random gates and its BN + IN composition."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from normlab.norms import (
    BatchInstanceNorm2d, BatchNorm2d, GroupNorm2d, InstanceNorm2d, LayerNorm2d, _functional, _kernels,
)

ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(autouse=True, params=["cpp", "ops"])
def norm_path(request, monkeypatch):
    """Every test of a module that imports this fixture runs twice: through the C++ kernels and through the
    tensor-op fallback."""
    monkeypatch.setenv("NORMLAB_KERNELS", "1" if request.param == "cpp" else "0")
    if request.param == "cpp":
        assert _kernels.library() is not None, (
            f"the C++ norm kernels did not build ({_kernels._state['error']}): install g++ (make test does)")
    return request.param


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def randomize_affine(*modules: nn.Module, seed: int = 1) -> None:
    """Give every module the same random (non-trivial) weight and bias."""
    g = torch.Generator().manual_seed(seed)
    c = modules[0].weight.numel()
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(w)
            m.bias.copy_(b)


def make_input(shape, channels_last: bool = False, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def run(m: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """Forward + backward with a random upstream gradient; returns (y, dx, dweight, dbias)."""
    x = x.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    y = m(x)
    y.backward(dy)
    return y.detach(), x.grad, m.weight.grad, m.bias.grad


def assert_same_step(ours: nn.Module, ref: nn.Module, x: torch.Tensor, seed: int = 5) -> torch.Tensor:
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    got, want = run(ours, x, dy), run(ref, x, dy)
    for what, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, want):
        assert a is not None and b is not None, what
        close(a, b)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[1].is_contiguous(memory_format=torch.channels_last)
    return got[0]


def to_double(m: nn.Module, rho: bool = False) -> nn.Module:
    m = m.double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * (0.8 if name == "rho" else 1.5)
                    + (0.1 if name == "rho" else -0.2))
    return m


FUSABLE = {  # normlab layer with forward_relu -> its native reference
    "bn": (BatchNorm2d, nn.BatchNorm2d),
    "gn": (lambda c: GroupNorm2d(c, 4), lambda c: nn.GroupNorm(4, c)),
    "ln": (LayerNorm2d, lambda c: nn.GroupNorm(1, c)),
    "in": (InstanceNorm2d, lambda c: nn.InstanceNorm2d(c, affine=True)),
}


def composed_bin(m: BatchInstanceNorm2d, x: torch.Tensor) -> torch.Tensor:
    """BIN as the BN and IN Functions summed (what BIN was before its own Function): the reference for
    ``BatchInstanceFunction``."""
    rho = m.rho + (m.rho.detach().clamp(0, 1) - m.rho.detach())
    y_bn = m.batch_norm(x, rho * m.weight, m.bias)
    return y_bn + _functional.GroupNormFunction.apply(x, (1 - rho) * m.weight, None, m.num_channels, m.eps)


def bin_pair(c: int, seed: int = 1, **kw):
    """A BIN with random weight, bias and gates (some outside [0, 1]: the clamp and its straight-through
    gradient) and an identical copy."""
    import copy

    m = BatchInstanceNorm2d(c, **kw)
    randomize_affine(m, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.rho.copy_(torch.rand(c, generator=g) * 1.6 - 0.3)
        m.rho[:2] = torch.tensor([-0.2, 1.3])
    return m, copy.deepcopy(m)


def bin_step(m, x, dy, fn):
    """Forward + backward of ``fn(m, x)``: output, input grad, weight/bias/rho grads."""
    xo = x.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    y = fn(m, xo)
    y.backward(dy)
    return [y.detach(), xo.grad, m.weight.grad, m.bias.grad, m.rho.grad]


class TwoRanks:
    """Two threads standing in for two ranks: all-reduce and broadcast exchange tensors through a barrier."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=60)
        self.slots: list = [None, None]
        self.local = threading.local()

    def _exchange(self, t: torch.Tensor, combine) -> torch.Tensor:
        self.slots[self.local.rank] = t.detach().clone()
        self.barrier.wait()
        out = combine(self.slots)
        self.barrier.wait()
        return t.copy_(out)

    def all_reduce(self, t):
        return self._exchange(t, lambda s: s[0] + s[1])

    def broadcast(self, t):
        return self._exchange(t, lambda s: s[0])

    def install(self, monkeypatch) -> None:
        """Make normlab's distributed helpers (``_functional``: active, all-reduce, broadcast) these threads'."""
        from normlab.norms import _functional

        monkeypatch.setattr(_functional, "distributed_active", lambda: True)
        monkeypatch.setattr(_functional, "_all_reduce", self.all_reduce)
        monkeypatch.setattr(_functional, "_broadcast", self.broadcast)

    def run(self, fn) -> list:
        out, errors = [None, None], []

        def work(rank):
            self.local.rank = rank
            torch.set_num_threads(1)
            try:
                out[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errors.append(e)
                self.barrier.abort()
            else:
                self.barrier.wait()  # both ranks finish together, as a process group is torn down

        threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


def fused_and_unfused(fuse: bool = True, **kw):
    """Two ResNets with the same weights: one with fused blocks (``fuse``), one unfused (keywords: ResNet's)."""
    from normlab.models.resnet import ResNet

    torch.manual_seed(0)
    a = ResNet(1, 10, fuse=fuse, **kw)
    b = ResNet(1, 10, fuse=False, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def assert_train_alike(a: nn.Module, b: nn.Module, fmt: torch.memory_format) -> None:
    """Two SGD steps of ``a`` and ``b`` on the same batches (in ``fmt``): bit-identical losses, then weights and
    running statistics (the same float operations in the same order: equal, not merely close)."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (a, b)]
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        x = torch.randn(16, 3, 12, 12, generator=g).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (16,), generator=g)
        losses = []
        for m, opt in zip((a, b), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
