"""Target 1: one ResNet-20 training step with each normlab norm vs the same model with PyTorch's native layer.

Per norm and memory format (NCHW, channels_last), the normlab and native models are built from the same
seed, fed the same batch, and timed in interleaved steps inside this one process (A B, B A, A B, ...),
so machine noise hits both sides alike. A step = forward + cross-entropy + backward + SGD step
(momentum 0.9, weight decay 5e-4). Each of ``--rounds`` rounds builds a fresh pair of models, in
alternating order: where a model's tensors land in memory shifts its step time by a few percent (two
identical native models differed by up to 7% in one pair), so a single pair can favour either side.
Reported: median step time of each side, and the median (min–max) over rounds of the per-round ratio
normlab / native (each round's time being the median of its steps). The control row ``aa`` puts native
BN on both sides: its spread is the measurement's own.

Memory: the bytes of distinct tensor storages autograd saves for backward during one step's forward
(torch.autograd.graph.saved_tensors_hooks). That is the activation memory held at a step's peak -- the
part a norm decides; weights, gradients and optimizer state are the same on both sides. (CPU has no
allocator peak counter, and RSS deltas are too coarse for a 0.27M-parameter model.)

Native references: bn -> nn.BatchNorm2d, in -> nn.InstanceNorm2d(affine=True), ln -> nn.GroupNorm(1, C),
gn -> nn.GroupNorm(8, C), bin -> "BN + IN together": the same gated mix built from F.batch_norm and
F.instance_norm (both native kernels), i.e. what BIN costs with PyTorch's own layers.

The catalogue (``--norms catalogue``): timm's layers where timm has one (frn -> FilterResponseNormTlu2d,
evonorm_b0/s0 -> EvoNorm2dB0/S0, ln2d -> LayerNorm2d, rms2d -> RmsNorm2d), otherwise the paper's equations on
native ops (sn, brn: torch.var_mean; gbn: F.batch_norm per ghost batch; rms: F.rms_norm; dyt: torch.tanh; mobn: torch.mean).
``--layer`` times one layer's forward + backward on a (batch, 32, 16, 16) tensor instead of a ResNet-20 step.

normlab's blocks fuse norm + ReLU (+ the residual add) by default (``ResNet(fuse=True)``). The rows compare
the norm layers alone, so every row builds normlab's ResNet with ``fuse=False``; a row ``X+relu`` (X = bn, in,
ln, gn) is normlab's default ResNet-20 with norm X (fused blocks) against the same native-X model: what a user
gets.

    python bench/bench_norms.py            # all norms + control, NCHW and channels_last (~12 min here)
    python bench/bench_norms.py --quick    # fewer repeats
    python bench/bench_norms.py --compile  # also torch.compile both sides (compile time reported apart)
    python bench/bench_norms.py --norms bn+relu,in+relu,ln+relu,gn+relu,aa --out norms_fused.json
    python bench/bench_norms.py --norms catalogue,aa            # every catalogue norm vs its reference
    python bench/bench_norms.py --norms catalogue,aa --layer    # the same, per layer
    python bench/bench_norms.py --engine   # bn, in, ln, gn, bin (+relu): spec engine vs hand-fused override

``--engine`` (rows ``X@engine``, ``X+relu@engine``): the course norms (bn, in, ln, gn, bin) are specs on the
engine of ``normlab.norms.spec`` with their hand-fused Function as the default override (see
``normlab.norms.override``). Side A is normlab's model with every such layer on the engine path
(``override = False``: what ``NORMLAB_FUSED=0`` does), side B the same model on the override; the ratio is
engine / override, so a ratio above 1 is what the override saves. ``X+relu@engine`` compares the fused blocks
(on the engine path the residual add and ReLU run inside the engine's affine sweep). ``--norms`` names without
``@engine`` get it added.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from _common import fmt, machine, saved_bytes, summary, write_json
from normlab.models.resnet import ResNet
from normlab.train.runtime import tune_malloc


class NativeBIN(nn.Module):
    """BIN with PyTorch's native kernels: rho * BN(x) + (1 - rho) * IN(x), then the affine."""

    def __init__(self, c: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.rho = nn.Parameter(torch.ones(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        rho = self.rho + (self.rho.detach().clamp(0, 1) - self.rho.detach())
        w = self.weight
        y_bn = F.batch_norm(x, self.running_mean, self.running_var, rho * w, self.bias, self.training,
                            self.momentum, self.eps)
        y_in = F.instance_norm(x, None, None, (1 - rho) * w, None, eps=self.eps)
        return y_bn + y_in


class _Affine(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def affine(self, y):
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class EqSN(_Affine):
    """Switchable Norm from the paper's equations on native reductions (torch.var_mean)."""

    def __init__(self, c: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(c)
        self.eps, self.momentum = eps, momentum
        self.mean_weight, self.var_weight = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        v_in, m_in = torch.var_mean(x, (2, 3), correction=0, keepdim=True)
        v_ln, m_ln = torch.var_mean(x, (1, 2, 3), correction=0, keepdim=True)
        v_bn, m_bn = torch.var_mean(x, (0, 2, 3), correction=0, keepdim=True)
        with torch.no_grad():
            self.running_mean.lerp_(m_bn.flatten(), self.momentum)
            self.running_var.lerp_(v_bn.flatten(), self.momentum)
        wm, wv = torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)
        mean = wm[0] * m_in + wm[1] * m_ln + wm[2] * m_bn
        var = wv[0] * v_in + wv[1] * v_ln + wv[2] * v_bn
        return self.affine((x - mean) * torch.rsqrt(var + self.eps))


class EqBRN(_Affine):
    """Batch Renorm from the paper's Algorithm 1 on native reductions (r_max 3, d_max 5, no warm-up)."""

    def __init__(self, c: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(c)
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        var, mu = torch.var_mean(x, (0, 2, 3), correction=0)
        sb = torch.sqrt(var + self.eps)
        with torch.no_grad():
            s = torch.sqrt(self.running_var + self.eps)
            r = (sb / s).clamp(1 / 3, 3)
            d = ((mu - self.running_mean) / s).clamp(-5, 5)
            self.running_mean.lerp_(mu, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        v = (1, -1, 1, 1)
        return self.affine((x - mu.view(v)) / sb.view(v) * r.view(v) + d.view(v))


class EqGBN(_Affine):
    """Ghost BN: native F.batch_norm on each ghost batch of 32 samples."""

    def __init__(self, c: int, vb: int = 32) -> None:
        super().__init__(c)
        self.vb = vb
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return torch.cat([F.batch_norm(ch, self.running_mean, self.running_var, self.weight, self.bias, True)
                          for ch in x.split(self.vb)])


class EqRMS(_Affine):
    """RMS norm over (C, H, W) per sample with native F.rms_norm, then the per-channel affine."""

    def forward(self, x):
        return self.affine(F.rms_norm(x, x.shape[1:], eps=1e-5))


class EqDyT(_Affine):
    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.alpha = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x):
        return self.affine(torch.tanh(self.alpha * x))


class EqMOBN(_Affine):
    """Mean-only BN: x minus its batch mean per channel (native mean), running mean updated."""

    def __init__(self, c: int, momentum: float = 0.1) -> None:
        super().__init__(c)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(c))

    def forward(self, x):
        mu = x.mean((0, 2, 3))
        with torch.no_grad():
            self.running_mean.lerp_(mu, self.momentum)
        return self.affine(x - mu.view(1, -1, 1, 1))


def _timm(name: str, has_act: bool = False, **kw):
    def make(c: int) -> nn.Module:
        import timm.layers

        m = getattr(timm.layers, name)(c, **kw)
        m.has_act = has_act  # normlab's ResNet drops the ReLU after it, as after normlab's layer
        return m

    return make


NATIVE = {
    "bn": lambda c: nn.BatchNorm2d(c),
    "in": lambda c: nn.InstanceNorm2d(c, affine=True),
    "ln": lambda c: nn.GroupNorm(1, c),
    "gn": lambda c: nn.GroupNorm(8, c),
    "bin": NativeBIN,
    "frn": _timm("FilterResponseNormTlu2d", True, eps=1e-6),
    "evonorm_b0": _timm("EvoNorm2dB0", True),
    "evonorm_s0": _timm("EvoNorm2dS0", True, groups=8),
    "sn": EqSN,
    "brn": EqBRN,
    "gbn": EqGBN,
    "rms": EqRMS,
    "ln2d": _timm("LayerNorm2d"),
    "rms2d": _timm("RmsNorm2d"),
    "dyt": EqDyT,
    "mobn": EqMOBN,
}
CATALOGUE = ["frn", "evonorm_b0", "evonorm_s0", "sn", "brn", "gbn", "rms", "ln2d", "rms2d", "dyt", "mobn"]


def build(norm, fmt_name: str, seed: int = 0, fuse: bool = False):
    torch.manual_seed(seed)
    model = ResNet(3, 10, norm=norm, fuse=fuse)
    if fmt_name == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def make_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


ENGINE = "@engine"
ENGINE_NORMS = ["bn", "in", "ln", "gn", "bin", "bn+relu", "in+relu", "ln+relu", "gn+relu", "aa"]


def on_engine(model: nn.Module) -> nn.Module:
    """``model`` with every course norm (a spec with a hand-fused override) on its engine path."""
    from normlab.norms.override import FusedSpecNorm

    layers = [m for m in model.modules() if isinstance(m, FusedSpecNorm)]
    assert layers, "no norm with a hand-fused override in the model"
    for m in layers:
        m.override = False
    return model


def sides_of(norm: str) -> tuple[str, str]:
    """What the row's two sides are, for the printout: (A, B)."""
    return ("engine", "fused") if norm.endswith(ENGINE) else ("normlab", "native")


def build_side(norm: str, side: str, fmt_name: str):
    """The model for one side: normlab's layer, or the native reference. The control row "aa" is native BN on
    both sides; a row "X+relu" is normlab's default ResNet with norm X (blocks and stem fuse X + ReLU + the
    residual add) against the same model with X's native layer. A row "X@engine": normlab's model with X on the
    engine path (side "normlab") against the same model on X's hand-fused override (side "native")."""
    engine = norm.endswith(ENGINE)
    norm = norm.removesuffix(ENGINE)
    base, fused = norm.removesuffix("+relu"), norm.endswith("+relu")
    if engine:
        model = build(base, fmt_name, fuse=fused)
        return on_engine(model) if side == "normlab" else model
    if side == "normlab" and norm != "aa":
        return build(base, fmt_name, fuse=fused)
    return build(NATIVE["bn" if norm == "aa" else base], fmt_name)


def run(norms, formats, rounds, steps, warmup, batch, compile_, build_side=build_side):
    """Step rows; ``build_side(norm, side, fmt_name)`` builds each side's model (``bench_versions.py`` passes its own)."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    results = []
    for fmt_name in formats:
        x = x0.contiguous(memory_format=torch.channels_last) if fmt_name == "channels_last" else x0
        for norm in norms:
            times = {"normlab": [], "native": []}
            ratios, compile_s, mem = [], {}, {}
            for r in range(rounds):
                # fresh models every round, built in alternating order: where a model's tensors land in
                # memory moves its step time by a few percent, and the first-built one is not always
                # the faster (see the control row)
                order = ["normlab", "native"] if r % 2 == 0 else ["native", "normlab"]
                sides = {k: build_side(norm, k, fmt_name) for k in order}
                if r == 0:
                    mem = {k: saved_bytes(lambda m=m: F.cross_entropy(m(x), y)) for k, m in sides.items()}
                if compile_:
                    for k in order:
                        torch._dynamo.reset()
                        sides[k] = torch.compile(sides[k])
                stepfns = {k: make_step(sides[k], x, y) for k in order}
                for k in order:
                    t0 = time.perf_counter()
                    stepfns[k]()
                    if r == 0:
                        compile_s[k] = time.perf_counter() - t0  # first step (incl. compilation if any)
                    for _ in range(warmup):
                        stepfns[k]()
                per = {k: [] for k in order}
                for i in range(steps):  # interleaved A B, B A, ...
                    for k in (order if i % 2 == 0 else order[::-1]):
                        t0 = time.perf_counter()
                        stepfns[k]()
                        per[k].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in per.items()}
                for k in order:
                    times[k].append(med[k])
                ratios.append(med["normlab"] / med["native"])
                del sides, stepfns
            row = {"norm": norm, "format": fmt_name, "compiled": compile_,
                   "normlab_s": summary(times["normlab"]), "native_s": summary(times["native"]),
                   "ratio": summary(ratios), "ratios": ratios, "normlab_saved_MB": mem["normlab"] / 2**20,
                   "native_saved_MB": mem["native"] / 2**20, "mem_ratio": mem["normlab"] / mem["native"],
                   "first_step_s": compile_s}
            row["sides"] = sides_of(norm)
            results.append(row)
            a_, b_ = row["sides"]
            print(f"{norm:>7} {fmt_name:>13}{' compiled' if compile_ else ''}: {a_} {fmt(row['normlab_s'], 4)} s  "
                  f"{b_} {fmt(row['native_s'], 4)} s  ratio {fmt(row['ratio'])}  "
                  f"saved {row['normlab_saved_MB']:.1f}/{row['native_saved_MB']:.1f} MB ({row['mem_ratio']:.3f}x)"
                  + (f"  first step {compile_s['normlab']:.1f}/{compile_s['native']:.1f} s" if compile_ else ""),
                  flush=True)
    return results


def run_layers(norms, formats, rounds, steps, warmup, batch):
    """Per layer: forward + backward of one norm on a (batch, 32, 16, 16) tensor, normlab vs its reference,
    interleaved as the step rows are."""
    from normlab.norms import make_norm

    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, 32, 16, 16, generator=g) * 2 + 0.5
    dy = torch.randn(batch, 32, 16, 16, generator=g)
    results = []
    for fmt_name in formats:
        cl = fmt_name == "channels_last"
        for norm in norms:
            ratios, times = [], {"normlab": [], "native": []}
            for r in range(rounds):
                order = ["normlab", "native"] if r % 2 == 0 else ["native", "normlab"]
                if norm.endswith(ENGINE):  # the same layer on the engine path and on its fused override
                    base = norm.removesuffix(ENGINE)
                    layers = {k: make_norm(base, 32).train() for k in order}
                    layers["normlab"].override = False
                else:
                    layers = {k: (make_norm("bn" if norm == "aa" else norm, 32) if k == "normlab" and norm != "aa"
                                  else NATIVE["bn" if norm == "aa" else norm](32)).train() for k in order}
                x = (x0.contiguous(memory_format=torch.channels_last) if cl else x0).requires_grad_()

                def once(m):
                    x.grad = None
                    m(x).backward(dy)

                for k in order:
                    for _ in range(warmup + 1):
                        once(layers[k])
                per = {k: [] for k in order}
                for i in range(steps):
                    for k in (order if i % 2 == 0 else order[::-1]):
                        t0 = time.perf_counter()
                        once(layers[k])
                        per[k].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in per.items()}
                for k in order:
                    times[k].append(med[k])
                ratios.append(med["normlab"] / med["native"])
            row = {"norm": norm, "format": fmt_name, "what": "layer", "normlab_s": summary(times["normlab"]),
                   "native_s": summary(times["native"]), "ratio": summary(ratios), "ratios": ratios,
                   "sides": sides_of(norm) if norm.endswith(ENGINE) else ("normlab", "reference")}
            results.append(row)
            a_, b_ = row["sides"]
            print(f"{norm:>10} {fmt_name:>13} layer: {a_} {fmt(row['normlab_s'], 5)} s  "
                  f"{b_} {fmt(row['native_s'], 5)} s  ratio {fmt(row['ratio'])}", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--norms", default=None,
                    help="aa = control: native BN on both sides (shows the measurement's own spread); X+relu "
                         "(X = bn, in, ln, gn) = normlab's default fused blocks with norm X vs native X; "
                         "catalogue = every catalogue norm against its reference (timm's or the paper's equations); "
                         "default bn,in,ln,gn,bin,bn+relu,aa (with --engine: bn, in, ln, gn, bin and their +relu)")
    ap.add_argument("--engine", action="store_true",
                    help="the course norms on the spec engine (side A) vs their hand-fused override (side B), "
                         "rows X@engine")
    ap.add_argument("--formats", default="nchw,channels_last")
    ap.add_argument("--rounds", type=int, default=8, help="fresh pairs of models, built in alternating order")
    ap.add_argument("--steps", type=int, default=6, help="interleaved timed steps per side and round (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (adds compile time)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on this shared 2-core machine 2 threads oversubscribe "
                         "and a step gets 3-4x slower and far noisier)")
    ap.add_argument("--quick", action="store_true", help="4 rounds of 4 steps")
    ap.add_argument("--no-tune-malloc", action="store_true",
                    help="leave glibc's malloc as it is (normlab train tunes it; see runtime.tune_malloc)")
    ap.add_argument("--layer", action="store_true", help="time one layer's forward + backward, not a ResNet-20 step")
    ap.add_argument("--out", default="norms.json")
    a = ap.parse_args(argv)
    if a.norms is None:
        a.norms = ",".join(ENGINE_NORMS) if a.engine else "bn,in,ln,gn,bin,bn+relu,aa"
    norms = [n for part in a.norms.split(",") for n in (CATALOGUE if part == "catalogue" else [part])]
    if a.engine:
        norms = [n if n == "aa" or n.endswith(ENGINE) else n + ENGINE for n in norms]
    if a.quick:
        a.rounds, a.steps, a.warmup = 4, 4, 1
    torch.set_num_threads(a.threads)
    a.malloc_tuned = False if a.no_tune_malloc else tune_malloc()  # process-wide: both sides alike
    formats = [f.replace("nchw", "NCHW") for f in a.formats.split(",")]
    info = machine()
    print(info)
    if a.layer:
        res = run_layers(norms, formats, a.rounds, a.steps, a.warmup, a.batch)
    else:
        res = run(norms, formats, a.rounds, a.steps, a.warmup, a.batch, a.compile)
    write_json(a.out, {"machine": info, "args": vars(a), "results": res})


if __name__ == "__main__":
    main()
