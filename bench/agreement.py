"""How closely every norm agrees with its reference: the rows of ``tests/norm_specs.py`` measured, not asserted.

For each norm of ``SPECS`` (the one table of what each norm is: factory, independent reference from native
torch, timm or the paper's equations), on each back-end (``ops``: the tensor ops, ``NORMLAB_KERNELS=0``;
``cpp``: the C++ kernels where the norm has them, ``NORMLAB_KERNELS=1``), in float32 and float64, for a
mean-0.5 input and a large-mean input (mean 1e3), both with std 1: our layer and its reference start from the
same randomized state (the parameters ``tests/test_catalogue.py`` uses) and run side by side for two training
steps (a fresh batch each) and one eval step. Recorded per quantity, as the largest value over the three steps:

* ``abs``: max |ours − reference|, and ``rel``: that divided by max |reference| (a norm-wise relative
  difference: element-wise ratios explode where the reference is near 0);
* quantities: the output ``y``, the input gradient ``dx``, every parameter's gradient (``grad.<name>``, under
  our layer's name; a parameter the reference lacks is listed in ``no_reference``) and every running buffer
  the table says the reference updates too (``buffer.<name>``, after each step).

Two references per measurement: the reference in the same dtype (``vs_same``: what the tests compare) and the
reference in float64 from the same state and inputs (``vs_f64``: the exact answer up to float64 rounding). timm's
FRN and EvoNorm layers take their statistics through ``x.float()``, i.e. in float32 even for float64 inputs, so
the float64 run keeps float64 there (``exact_float64``); the same-dtype float64 run is timm's layer as it is. For
float32, ``ref_own`` is the float32 reference against its own float64 run: the reference's own rounding, the
scale our differences are read against (for the large-mean input, native float32 layers lose digits too).
``cpp_calls`` counts calls into the C++ kernel library during the measurement, so a ``cpp`` row of a norm
without kernels (tensor ops on both back-ends) says so.

    python bench/agreement.py              # every norm, writes bench/results/agreement.json (seconds)
    python bench/agreement.py --quick      # bn and frn only
    python bench/agreement.py --out ''     # print only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the spec table and the tests' parameter randomization

SHAPE = (8, 16, 6, 6)  # N, C, H, W: 4 ghost batches of 2 for gbn, 4 groups of 4 channels for gn / evonorm_s0
STEPS = 2  # training steps before the eval step
INPUTS = {"mean0.5": (0.5, 1.0), "mean1e3": (1e3, 1.0)}  # name -> (mean, std)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
BACKENDS = {"ops": "0", "cpp": "1"}  # name -> NORMLAB_KERNELS


@contextlib.contextmanager
def kernels(setting: str):
    """``NORMLAB_KERNELS`` set for the block (``_kernels.enabled()`` reads it at every call) and a counter of
    the calls into the C++ library made meanwhile."""
    from normlab.norms import _kernels

    old_env, old_fn, calls = os.environ.get("NORMLAB_KERNELS"), _kernels._fn, [0]

    def counting(name, dtype):
        calls[0] += 1
        return old_fn(name, dtype)

    os.environ["NORMLAB_KERNELS"] = setting
    _kernels._fn = counting
    try:
        yield calls
    finally:
        _kernels._fn = old_fn
        if old_env is None:
            os.environ.pop("NORMLAB_KERNELS", None)
        else:
            os.environ["NORMLAB_KERNELS"] = old_env


@contextlib.contextmanager
def exact_float64():
    """``Tensor.float()`` leaves float64 tensors float64 inside the block: timm's FRN / EvoNorm upcast their
    statistics with it (meant for half precision), which rounds a float64 run's statistics to float32."""
    old = torch.Tensor.float

    def keep64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else old(self, *args, **kwargs)

    torch.Tensor.float = keep64
    try:
        yield
    finally:
        torch.Tensor.float = old


def batches(mean: float, std: float, dtype: torch.dtype, shape=SHAPE, seed: int = 0):
    """(x, dy) per step: a fresh input per step (mean, std) and an output gradient of mean 0, std 1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS + 1):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        out.append((x.to(dtype), dy.to(dtype)))
    return out


def run_steps(m: torch.nn.Module, data, dtype: torch.dtype, buffers: tuple[str, ...]) -> list[dict]:
    """Per step (STEPS in training, then eval): y, dx, every parameter gradient and the named buffers."""
    out = []
    for i, (x, dy) in enumerate(data):
        m.train(i < STEPS)
        x = x.to(dtype).detach().clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        y = m(x)
        y.backward(dy.to(dtype))
        rec = {"y": y.detach(), "dx": x.grad}
        rec.update({f"grad.{n}": p.grad for n, p in m.named_parameters()})
        rec.update({f"buffer.{b}": getattr(m, b).detach().clone() for b in buffers})
        out.append(rec)
    return out


def compare(ours: list[dict], ref: list[dict], rename: dict[str, str]) -> tuple[dict, list[str]]:
    """{quantity: {"abs", "rel"}} (largest over steps) and our parameters without a reference counterpart."""
    worst: dict[str, dict] = {}
    missing: set[str] = set()
    for a, b in zip(ours, ref):
        for key, t in a.items():
            if t is None:
                continue
            other = b.get(rename.get(key, key))
            if other is None:
                missing.add(key)
                continue
            t, other = t.double(), other.double()
            d = float((t - other).abs().max()) if t.numel() else 0.0
            scale = float(other.abs().max()) if other.numel() else 0.0
            r = d / scale if scale > 0 else (0.0 if d == 0 else float("inf"))
            w = worst.setdefault(key, {"abs": 0.0, "rel": 0.0})
            w["abs"], w["rel"] = max(w["abs"], d), max(w["rel"], r)
    return worst, sorted(missing)


def measure(spec, dtype: torch.dtype, mean: float, std: float) -> dict:
    from test_catalogue import randomize

    c = SHAPE[1]
    ours = randomize(spec.factory(c)).to(dtype)
    ref_same = spec.reference(ours).to(dtype)  # built from ours' initial state, before any step
    ref64 = spec.reference(ours).double()
    data = batches(mean, std, dtype)
    rename = {f"grad.{k}": f"grad.{v}" for k, v in spec.grads.items()}
    got = run_steps(ours, data, dtype, spec.running)
    same = run_steps(ref_same, data, dtype, spec.running)
    with exact_float64():
        exact = run_steps(ref64, data, torch.float64, spec.running)
    vs_same, missing = compare(got, same, rename)
    vs_f64, _ = compare(got, exact, rename)
    rec = {"vs_same": vs_same, "vs_f64": vs_f64, "no_reference": missing}
    if dtype != torch.float64:
        rec["ref_own"], _ = compare(same, exact, {})
    return rec


def largest(q: dict, prefix: str | tuple[str, ...]) -> float:
    vals = [v["abs"] for k, v in q.items() if k.startswith(prefix)]
    return max(vals) if vals else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--norms", default=None, help="comma-separated names from tests/norm_specs.py [default: all]")
    ap.add_argument("--quick", action="store_true", help="smoke test: bn and frn only")
    ap.add_argument("--out", default="agreement.json", help="file name under bench/results/ ('' = do not write)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from _common import machine, write_json
    from norm_specs import SPECS

    names = args.norms.split(",") if args.norms else ["bn", "frn"] if args.quick else [s.name for s in SPECS]
    unknown = sorted(set(names) - {s.name for s in SPECS})
    if unknown:
        sys.exit(f"agreement: unknown norm(s) {', '.join(unknown)}: choose from {', '.join(s.name for s in SPECS)}")
    results = []
    for spec in [s for s in SPECS if s.name in names]:
        for backend, setting in BACKENDS.items():
            for dname, dtype in DTYPES.items():
                for iname, (mean, std) in INPUTS.items():
                    with kernels(setting) as calls:
                        rec = measure(spec, dtype, mean, std)
                    results.append({"norm": spec.name, "source": spec.source, "backend": backend, "dtype": dname,
                                    "input": iname, "cpp_calls": calls[0], "atol": spec.atol, "rtol": spec.rtol,
                                    **rec})
                    v = rec["vs_same"]
                    print(f"{spec.name:11s} {backend:4s} {dname} {iname:8s} y {largest(v, 'y'):.2e} "
                          f"grads {largest(v, ('dx', 'grad.')):.2e} buffers {largest(v, 'buffer.'):.2e} "
                          f"(vs float64: y {largest(rec['vs_f64'], 'y'):.2e}) cpp calls {calls[0]}", flush=True)
    out = {"machine": machine(), "args": vars(args), "quick": args.quick, "shape": list(SHAPE), "steps": STEPS,
           "inputs": {k: {"mean": m, "std": s} for k, (m, s) in INPUTS.items()}, "results": results}
    if args.out:
        print(f"wrote {write_json(args.out, out)}")


if __name__ == "__main__":
    main()
