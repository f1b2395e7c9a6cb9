"""GPU acceptance and benchmark (issue 14): everything normlab claims on a GPU, checked and timed in one go.

    PYTHONPATH=src python3 bench/bench_gpu.py --out $OUT/gpu.json        # one H100/H200: < 8 min, no network
    make gpu-check                                                       # the same, results under bench/results
    PYTHONPATH=src python bench/bench_gpu.py --device cpu --quick        # tiny shapes: the CI smoke test

Runs with the torch a GPU machine already has (no install of normlab: ``PYTHONPATH=src``); Grad-CAM needs
grad-cam and ttach, which GPU images rarely have: ``bash scripts/gpu-wheels.sh`` here, then on the machine
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site``
before the command above (without them that part reports its error and the rest runs). Sections, each
recorded in the JSON even when it fails (``{"error": ...}``) or runs out of the time budget (``--budget``):

1. ``equivalence``: every from-scratch norm against PyTorch's native layer on the device (outputs, input and
   affine gradients, BN's running statistics) in fp32, bf16 and fp16, NCHW and channels_last, plus the
   large-mean case (|mean|/std = 1000). Errors are relative to a float64 reference; normlab passes when
   its error is within the tolerance of the precision or within 2x native's own error.
2. ``syncs``: host-device synchronisations per steady-state training step of ``normlab.train.step.TrainStep``
   (``torch.cuda.set_sync_debug_mode("warn")``, warnings counted), fp32 / bf16 / fp16, eager and compiled.
3. ``step_time``: ResNet-20 training step (SGD, channels_last) normlab vs native per norm, eager and compiled,
   32x32 at batch 128 and 256x256 at batch 32; interleaved rounds, medians, CUDA events.
4. ``train``: a short ``normlab train`` on a generated image folder, the same run interrupted after one
   epoch and continued with ``--resume``, then ``normlab gradcam`` on it; whole-loop images/s.
5. ``study``: ``normlab study`` with 4 runs and ``--jobs 4`` (several runs on one GPU) against ``--jobs 1``.

Writes JSON (``--out``) and a Markdown table beside it (``.md``). Nothing here claims a figure it did not
measure: a skipped or failed section says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

NORMS = ("bn", "in", "ln", "gn", "bin")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def env_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
        with contextlib.suppress(Exception):
            import triton

            info["triton"] = triton.__version__
    else:
        from normlab.device import cpu_name

        info["cpu"] = cpu_name()
    return info


# ------------------------------------------------------------------------------------------- equivalence

def _native(name: str, c: int) -> nn.Module:
    from bench_norms import NATIVE

    return NATIVE[name](c)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def equivalence(device: torch.device, quick: bool) -> list[dict]:
    from normlab.norms import make_norm

    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
    shapes = [(8, 16, 8, 8)] if quick else [(64, 32, 16, 16), (32, 64, 8, 8)]
    dtypes = [torch.float32] if quick and device.type == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
    rows = []
    for name in NORMS:
        for shape in shapes:
            n, c, h, w = shape
            for dtype in dtypes:
                for fmt in ("nchw", "channels_last"):
                    for mean_scale in ((0.0, 1000.0) if dtype == torch.float32 and not quick else (0.0,)):
                        g = torch.Generator().manual_seed(len(rows))
                        x0 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5 + mean_scale
                        dy = torch.randn(shape, generator=g, dtype=torch.float64)
                        kw = {"num_groups": 8} if name == "gn" else {}
                        ours = make_norm(name, c, **kw).to(device)
                        ref = _native(name, c).double()  # the float64 reference: native math in double, CPU
                        nat = _native(name, c).to(device)
                        with torch.no_grad():  # the same affine parameters everywhere (not the init ones)
                            for m in (ours, ref, nat):
                                for pname, p in m.named_parameters():
                                    gp = torch.Generator().manual_seed(hash(pname) % 1000)
                                    p.copy_((torch.rand(p.shape, generator=gp) * 0.5 + 0.75).to(p.dtype))
                        outs = {}
                        for key, mod, dev, dt in (("ref", ref, torch.device("cpu"), torch.float64),
                                                  ("ours", ours, device, dtype), ("native", nat, device, dtype)):
                            mod.train()
                            x = x0.to(dev, dt, copy=True)
                            if fmt == "channels_last":
                                x = x.contiguous(memory_format=torch.channels_last)
                            x = x.detach().requires_grad_(True)
                            low = dt in (torch.bfloat16, torch.float16)
                            with torch.autocast(dev.type, dtype=dt if low else torch.bfloat16, enabled=low):
                                y = mod(x)
                            y.backward(dy.to(dev, y.dtype))
                            grads = {pn: p.grad.detach().cpu() for pn, p in mod.named_parameters()}
                            stats = {b: getattr(mod, b).detach().cpu() for b in ("running_mean", "running_var")
                                     if isinstance(getattr(mod, b, None), torch.Tensor)}
                            outs[key] = {"y": y.detach().cpu(), "dx": x.grad.detach().cpu(), **grads, **stats}
                        common = set(outs["ref"]) & set(outs["ours"]) & set(outs["native"])
                        err = {k: _rel(outs["ours"][k], outs["ref"][k]) for k in sorted(common)}
                        nerr = {k: _rel(outs["native"][k], outs["ref"][k]) for k in sorted(common)}
                        ok = all(e <= max(tol[dtype], 2 * nerr.get(k, 0.0)) for k, e in err.items())
                        rows.append({"norm": name, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                                     "format": fmt, "mean": mean_scale, "ok": ok,
                                     "err": {k: round(v, 8) for k, v in err.items()},
                                     "native_err": {k: round(v, 8) for k, v in nerr.items()}})
    return rows


# ---------------------------------------------------------------------------------------------- syncs

def _train_step(device, precision: str, norm: str, compile_mode: str, size: int, batch: int):
    from normlab.config import make_config
    from normlab.models import build_model
    from normlab.train.optim import build_optimizer
    from normlab.train.runtime import compile_settings, grad_scaler, maybe_compile
    from normlab.train.step import TrainStep

    cfg = make_config({"dataset": "folder", "n": 3, "norm": norm, "batch_size": batch, "augment": "standard",
                       "precision": precision, "compile": compile_mode, "progress": "off", "image_size": size})
    torch.manual_seed(0)
    model = build_model(cfg, 3, 10).to(device).to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    settings = compile_settings(compile_mode, device)
    run_model = maybe_compile(model, compile_mode, device, log=lambda *_: None, settings=settings)
    step = TrainStep(model, run_model, opt, cfg, device=device, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                     steps_per_epoch=1000, total_steps=1000, scaler=grad_scaler(device, precision),
                     memory_format=torch.channels_last, mark_step=settings.cuda_graphs and run_model is not model)
    x = torch.randint(0, 256, (batch * 4, 3, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch * 4,), device=device)
    order = torch.randperm(batch * 4).to(device)
    gen = torch.Generator().manual_seed(0)
    state = {"i": 0}

    def one():
        i = state["i"] % 4
        idx = order[i * batch:(i + 1) * batch]
        step(x.index_select(0, idx), y.index_select(0, idx), state["i"], gen)
        state["i"] += 1

    return one, step


def host_syncs(device: torch.device, quick: bool) -> list[dict]:
    rows = []
    if device.type != "cuda":
        return [{"skipped": "needs CUDA (set_sync_debug_mode)"}]
    # compiled: one case (each compile costs ~30 s of the budget)
    cases = [(p, "off", n) for p in ("fp32", "bf16", "fp16") for n in ("bn", "bin")] + [("bf16", "on", "bn")]
    for precision, comp, norm in cases:
        try:
            one, step = _train_step(device, precision, norm, comp, 32, 128)
            for _ in range(4):  # warm-up: compilation, cudnn autotuning, allocator growth
                one()
            step.check()
            sync(device)
            steps = 10
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(steps):
                        one()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            msgs = [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message).lower()]
            rows.append({"precision": precision, "compile": comp, "norm": norm,
                         "syncs_per_step": len(msgs) / steps, "examples": sorted(set(msgs))[:5],
                         "check_syncs": 1, "check_every": step.check_every})
        except Exception as exc:  # noqa: BLE001
            rows.append({"precision": precision, "compile": comp, "norm": norm, "error": _err(exc)})
    return rows


# ------------------------------------------------------------------------------------------- step time

def _model(norm: str, side: str, device):
    from normlab.models.resnet import ResNet

    torch.manual_seed(0)
    layer = norm if side == "normlab" else (lambda c, n=norm: _native(n, c))
    return ResNet(3, 10, norm=layer).to(device).to(memory_format=torch.channels_last).train()


def _timer(model, device, size: int, batch: int, compiled: bool):
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    run = torch.compile(model, dynamic=False) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), y).backward()
        opt.step()

    def timed(n: int) -> float:
        sync(device)
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(n):
                step()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3 / n
        t = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - t) / n

    return step, timed


def step_times(device: torch.device, quick: bool, budget: Budget) -> list[dict]:
    """Eager first (cheap), then compiled (a compile per model and size) while the budget lasts."""
    sizes = [(16, 8)] if quick else [(32, 128), (256, 32)]
    modes = ["eager"] if quick and device.type == "cpu" else ["eager", "compiled"]
    rounds, steps = (2, 1) if quick else (5, 20)
    rows = []
    for mode in modes:
        for size, batch in sizes:
            for norm in (("bn", "gn") if quick else NORMS):
                if budget.left() < (5 if quick else 75 if mode == "compiled" else 20):
                    rows.append({"norm": norm, "size": size, "batch": batch, "mode": mode, "skipped": "time budget"})
                    continue
                try:
                    sides = {}
                    for side in ("normlab", "native"):
                        step, timed = _timer(_model(norm, side, device), device, size, batch, mode == "compiled")
                        for _ in range(3):
                            step()
                        sides[side] = timed
                    t = {"normlab": [], "native": []}
                    for r in range(rounds):
                        for side in (("normlab", "native") if r % 2 == 0 else ("native", "normlab")):
                            t[side].append(sides[side](steps))
                    ratio = [a / b for a, b in zip(t["normlab"], t["native"])]
                    rows.append({"norm": norm, "size": size, "batch": batch, "mode": mode,
                                 "normlab_ms": statistics.median(t["normlab"]) * 1e3,
                                 "native_ms": statistics.median(t["native"]) * 1e3,
                                 "ratio": statistics.median(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio),
                                 "images_per_s_normlab": batch / statistics.median(t["normlab"])})
                except Exception as exc:  # noqa: BLE001
                    rows.append({"norm": norm, "size": size, "batch": batch, "mode": mode, "error": _err(exc)})
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------- train, resume, Grad-CAM

def make_folder(root: Path, per_split: dict[str, int], size: int) -> Path:
    """The tests' generated image folder (``tests/conftest.make_image_folder``, imported here so that only
    the sections that train need pytest), with a fourth class."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.append(str(ROOT / "tests"))
    from conftest import make_image_folder

    return make_image_folder(root, classes=("red", "green", "blue", "gray"), per_split=per_split, size=size)


def normlab(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "NORMLAB_PROGRESS": "plain", **(env or {})}
    return subprocess.run([sys.executable, "-m", "normlab", *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def train_resume_gradcam(device: torch.device, quick: bool, work: Path, gradcam: bool) -> dict:
    per = {"train": 64, "val": 16, "test": 16} if quick else {"train": 1024, "val": 128, "test": 128}
    data = make_folder(work / "data", per, 32)
    dev = "cpu" if device.type == "cpu" else "cuda"
    common = ["--dataset", "folder", "--data-root", str(data), "--image-size", "32", "--n", "1" if quick else "3",
              "--batch-size", "32" if quick else "128", "--lr", "0.05", "--augment", "standard", "--device", dev,
              "--eval-batch-size", "256", "--probe-size", "16"]
    if quick:
        common += ["--threads", "1"]
    out: dict = {}
    full = work / "full"
    t = time.perf_counter()
    # the quick (CI) run skips the uninterrupted run: the interrupted + resumed one covers the same code
    res = normlab("train", *common, "--epochs", "2", "--compile", "auto", "--out", str(full)) if not quick else None
    out["full"] = ({"rc": res.returncode, "seconds": time.perf_counter() - t, "log": res.stderr[-1500:]} if res
                   else {"skipped": "quick mode"})
    if res is not None and res.returncode == 0:
        s = _summary(full)
        out["full"].update(status=s["status"], test_acc=(s.get("test") or {}).get("acc"),
                           images_per_s=s.get("images_per_s"), device=s.get("device"))
    cut = work / "cut"
    res = normlab("train", *common, "--epochs", "1", "--compile", "off", "--out", str(cut))
    if res.returncode == 0:  # as if killed after epoch 1: ask for 2 epochs, drop the summary, resume
        import yaml

        cfg = yaml.safe_load((cut / "config.yaml").read_text())
        cfg["epochs"] = 2
        (cut / "config.yaml").write_text(yaml.safe_dump(cfg))
        (cut / "summary.json").unlink()
        res = normlab("train", "--resume", str(cut))
    out["resume"] = {"rc": res.returncode, "resumed": "resuming" in res.stderr, "log": res.stderr[-1500:]}
    if res.returncode == 0:
        b = _summary(cut)
        out["resume"].update(status=b["status"], epochs_run=b["epochs_run"], images_per_s=b.get("images_per_s"),
                             device=b.get("device"))
    if res.returncode == 0 and (full / "summary.json").is_file():
        a, b = _summary(full), _summary(cut)
        out["resume"].update(test_acc_full=(a.get("test") or {}).get("acc"),
                             test_acc_resumed=(b.get("test") or {}).get("acc"))
    if gradcam:
        t = time.perf_counter()
        res = normlab("gradcam", str(full), "--classes", "red,green", "--per-class", "2", "--split", "test",
                      *(["--device", dev] if "--device" in normlab("gradcam", "--help").stdout else []))
        pngs = sorted(p.name for p in (full / "gradcam").glob("*.png")) if (full / "gradcam").is_dir() else []
        out["gradcam"] = {"rc": res.returncode, "seconds": time.perf_counter() - t, "pngs": pngs,
                          "log": res.stderr[-1500:]}
    else:
        out["gradcam"] = {"skipped": "quick mode"}
    return out


def study(device: torch.device, quick: bool, work: Path) -> dict:
    data = work / "data"
    if not data.is_dir():
        make_folder(data, {"train": 512, "val": 64, "test": 64}, 32)
    preset = work / "gpu-check.yaml"  # the norm comparison alone: 4 runs, no batch-size or augmentation cells
    preset.write_text("study:\n  name: gpu-check\n  seeds: 1\n  norms: [bn, gn, ln, in]\n  batch_norms: []\n"
                      "  augment_norm: bn\n  augment_modes: []\ntrain:\n  dataset: folder\n  epochs: 2\n")
    base = ["--preset", str(preset), "--data-root", str(data), "--image-size", "32", "--n", "1", "--batch-size", "64",
            "--device", "cpu" if device.type == "cpu" else "cuda", "--compile", "off"]
    out = {}
    plan = normlab("study", *base, "--out", str(work / "plan"), "--plan-only")
    out["plan"] = {"rc": plan.returncode, "text": (plan.stdout + plan.stderr)[-1500:]}
    for jobs in (4, 1):
        t = time.perf_counter()
        res = normlab("study", *base, "--jobs", str(jobs), "--out", str(work / f"study-j{jobs}"), timeout=600)
        runs = sorted((work / f"study-j{jobs}" / "runs").glob("*/summary.json"))
        out[f"jobs{jobs}"] = {"rc": res.returncode, "seconds": time.perf_counter() - t, "runs_finished": len(runs),
                              "log": res.stderr[-1500:],
                              "test_acc": {p.parent.name: (json.loads(p.read_text()).get("test") or {}).get("acc")
                                           for p in runs}}
    return out


# ------------------------------------------------------------------------------------------------- report

def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def markdown(res: dict) -> str:
    lines = [f"# normlab GPU check ({res['env'].get('gpu', res['env']['device'])}, torch {res['env']['torch']}, "
             f"{res['env']['date']})", ""]
    eq = res.get("equivalence")
    if isinstance(eq, list):
        bad = [r for r in eq if not r["ok"]]
        lines += [f"Equivalence: {len(eq) - len(bad)}/{len(eq)} cases within tolerance."]
        for r in bad[:20]:
            lines.append(f"- FAIL {r['norm']} {r['dtype']} {r['format']} mean {r['mean']}: {r['err']} "
                         f"(native {r['native_err']})")
        lines.append("")
    st = res.get("step_time")
    if isinstance(st, list) and st:
        lines += ["| norm | size | batch | mode | normlab ms | native ms | ratio (min–max) | normlab img/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in st:
            if "ratio" in r:
                lines.append(f"| {r['norm']} | {r['size']} | {r['batch']} | {r['mode']} | {r['normlab_ms']:.2f} | "
                             f"{r['native_ms']:.2f} | {r['ratio']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) "
                             f"| {r['images_per_s_normlab']:,.0f} |")
            else:
                lines.append(f"| {r['norm']} | {r['size']} | {r['batch']} | {r['mode']} | "
                             f"{r.get('error') or r.get('skipped')} | | | |")
        lines.append("")
    sy = res.get("syncs")
    if isinstance(sy, list) and sy:
        lines += ["| precision | compile | norm | host syncs per step |", "|---|---|---|---|"]
        for r in sy:
            if "skipped" in r:
                lines.append(f"| – | – | – | skipped: {r['skipped']} |")
            else:
                lines.append(f"| {r['precision']} | {r['compile']} | {r['norm']} | "
                             f"{r.get('syncs_per_step', r.get('error'))} |")
        lines.append("")
    tr = res.get("train")
    if isinstance(tr, dict):
        full, rs, gc = tr.get("full", {}), tr.get("resume", {}), tr.get("gradcam", {})
        run = full.get("skipped") or f"rc {full.get('rc')}, status {full.get('status')}, images/s " \
            f"{full.get('images_per_s')}, test acc {full.get('test_acc')}"
        cam = gc.get("skipped") or f"rc {gc.get('rc')}, {len(gc.get('pngs', []))} PNGs"
        lines.append(f"normlab train: {run}; resume: rc {rs.get('rc')}, resumed {rs.get('resumed')}, status "
                     f"{rs.get('status')}, images/s {rs.get('images_per_s')}; Grad-CAM: {cam}")
        lines.append("")
    sd = res.get("study")
    if isinstance(sd, dict) and "jobs4" in sd:
        lines.append(f"study (4 runs): --jobs 4 {sd['jobs4']['seconds']:.0f} s ({sd['jobs4']['runs_finished']} finished), "
                     f"--jobs 1 {sd.get('jobs1', {}).get('seconds', float('nan')):.0f} s")
    lines.append(f"\nTotal {res['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: the CI smoke run)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few steps; no study")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the timed sections (default 420)")
    ap.add_argument("--sections", default="equivalence,syncs,train,study,step_time",
                    help="comma-separated subset of: equivalence, syncs, step_time, train, study")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: use --device cpu --quick for the smoke run", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    budget = Budget(a.budget)
    wanted = [s.strip() for s in a.sections.split(",") if s.strip()]
    res: dict = {"env": env_info(device), "args": vars(a)}
    work = Path(tempfile.mkdtemp(prefix="normlab-gpu-"))
    os.environ.setdefault("NORMLAB_CACHE", str(work / "cache"))
    t0 = time.perf_counter()
    jobs = {
        "equivalence": lambda: equivalence(device, a.quick),
        "syncs": lambda: host_syncs(device, a.quick),
        "step_time": lambda: step_times(device, a.quick, budget),
        "train": lambda: train_resume_gradcam(device, a.quick, work, gradcam=not a.quick or device.type == "cuda"),
        "study": lambda: study(device, a.quick, work) if not a.quick else {"skipped": "quick mode"},
    }
    try:
        for name in wanted:
            t = time.perf_counter()
            print(f"[{time.perf_counter() - t0:6.1f}s] {name} ...", flush=True)
            try:
                res[name] = jobs[name]()
            except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
                res[name] = {"error": _err(exc), "traceback": traceback.format_exc()[-3000:]}
            res.setdefault("section_seconds", {})[name] = time.perf_counter() - t
            res["seconds"] = time.perf_counter() - t0
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1, default=str))  # partial results survive a kill
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t0
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    Path(a.out).with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
