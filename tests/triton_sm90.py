"""The norms' Triton kernels compiled for an H100 (sm_90) without a GPU: Triton's front end, LLVM and ptxas.

The interpreter (``TRITON_INTERPRET=1``, how ``test_triton_norms.py`` runs the kernels on CPU tensors) is
lenient where the GPU compiler is not (dtype conversions, constexpr branches, pointer types), so a kernel
can pass every interpreter test and still fail to compile on the GPU. ``Recorder`` notes the signature of
every launch a test makes (pointer dtypes, integer widths, constexpr values, ``num_warps``); ``python
tests/triton_sm90.py SIGNATURES.json`` then compiles each distinct one for sm_90 with the non-interpreted
Triton, in a process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import inspect
import json
import sys

PTR = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float64": "fp64",
       "torch.int64": "i64", "torch.int32": "i32", "torch.bool": "i1"}
OPTIONS = ("num_warps", "num_stages")


def constexpr_names(fn) -> set[str]:
    """The parameters of a jitted (or interpreted) kernel annotated ``tl.constexpr``."""
    params = inspect.signature(fn.fn).parameters
    return {name for name, p in params.items() if "constexpr" in str(p.annotation)}


def _type(value) -> str:
    if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
        return "*" + PTR[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def signature(name: str, kernel, args: tuple, kwargs: dict) -> dict:
    """One launch as a JSON-able record: kernel name, argument types, constexpr values and launch options."""
    consts = constexpr_names(kernel)
    values = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in OPTIONS}
    return {"kernel": name,
            "signature": {k: "constexpr" if k in consts else _type(values[k]) for k in kernel.arg_names},
            "constexprs": {k: values[k] for k in kernel.arg_names if k in consts},
            "options": {k: v for k, v in kwargs.items() if k in OPTIONS}}


class Recorder:
    """Stands in for one kernel of ``_triton_kernels``: ``kernel[grid](...)`` records the launch's signature
    into ``records`` (distinct ones only) and then launches the kernel as before."""

    def __init__(self, name: str, kernel, records: dict) -> None:
        self.name, self.kernel, self.records = name, kernel, records

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            rec = signature(self.name, self.kernel, args, kwargs)
            self.records.setdefault(json.dumps(rec, sort_keys=True), rec)
            return self.kernel[grid](*args, **kwargs)
        return launch


def compile_all(records: list[dict], arch: int = 90) -> list[str]:
    """Compiles every record for ``cuda:sm_<arch>``; returns one message per failure."""
    import triton
    from triton.backends.compiler import GPUTarget

    from normlab.norms import _triton_kernels as K

    target = GPUTarget("cuda", arch, 32)
    failures = []
    for rec in records:
        fn = getattr(K, rec["kernel"])
        try:
            src = triton.compiler.ASTSource(fn, rec["signature"], rec["constexprs"])
            kernel = triton.compile(src, target=target, options=rec["options"])
            assert kernel.asm.get("cubin"), "no cubin"
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not only the first
            failures.append(f"{rec['kernel']} {rec['constexprs']} {rec['signature']}: "
                            f"{type(exc).__name__}: {str(exc)[:600]}")
    return failures


def main(argv: list[str]) -> int:
    records = json.loads(open(argv[0]).read())
    failures = compile_all(records)
    for f in failures:
        print("FAIL", f)
    kernels = sorted({r["kernel"] for r in records})
    print(f"{len(records) - len(failures)}/{len(records)} launch signatures of {len(kernels)} kernels "
          f"({', '.join(kernels)}) compiled for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
