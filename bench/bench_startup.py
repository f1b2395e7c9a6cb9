"""Target 5: time-to-first-step of a fresh process, warm data cache, with --compile off / on.

Each measurement is a new Python process (imports included) that does what ``normlab train`` does
before its first optimizer step -- load_data (CIFAR-10 tarball, warm uint8 cache), build_model
(ResNet-20, normlab BN), build_optimizer, runtime.maybe_compile, one augmented training step of batch
128 on CPU -- and reports when each phase ended, relative to the launch of the process. compile=on is
measured with a cold inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR) and then warm (same dir again).

    python bench/bench_startup.py           # off, on (cold), on (warm): ~3 min here
    python bench/bench_startup.py --quick   # off only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(compile_mode: str, threads: int) -> None:
    marks = {}
    import torch
    import torch.nn.functional as F

    from bench_pipeline import normlab_cfg
    from normlab.data import augment_batch, load_data, normalize
    from normlab.models import build_model
    from normlab.train.optim import build_optimizer
    from normlab.train.runtime import maybe_compile

    marks["imports"] = time.time()
    torch.set_num_threads(threads)
    cfg = normlab_cfg(compile=compile_mode, threads=threads)
    data = load_data(cfg)
    marks["data"] = time.time()
    torch.manual_seed(0)
    model = build_model(cfg, data.in_channels, data.num_classes).train()
    opt = build_optimizer(model, cfg)
    run_model = maybe_compile(model, compile_mode, torch.device("cpu"), log=lambda *_: None)
    marks["model"] = time.time()
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(128)
    xb = normalize(augment_batch(data.train_x[idx], gen), data.mean, data.std)
    F.cross_entropy(run_model(xb), data.train_y[idx]).backward()
    opt.step()
    marks["first_step"] = time.time()
    t = time.perf_counter()
    F.cross_entropy(run_model(xb), data.train_y[idx]).backward()
    opt.step()
    marks["second_step_s"] = time.perf_counter() - t
    print("MARKS " + json.dumps(marks))


def launch(compile_mode: str, threads: int, env: dict) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, str(HERE / "bench_startup.py"), "--child", compile_mode,
                          "--threads", str(threads)], capture_output=True, text=True, env=env, cwd=HERE)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("MARKS ")]
    if out.returncode or not line:
        raise SystemExit(f"child failed:\n{out.stderr[-2000:]}")
    m = json.loads(line[0][6:])
    return {"imports_s": m["imports"] - t0, "data_s": m["data"] - m["imports"], "model_compile_s": m["model"] - m["data"],
            "first_step_s": m["first_step"] - m["model"], "time_to_first_step_s": m["first_step"] - t0,
            "second_step_s": m["second_step_s"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the compile=off launch")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, a.threads)
    sys.path.insert(0, str(HERE))
    from _common import machine, summary, write_json
    from bench_pipeline import normlab_cfg

    from normlab.data import load_data

    load_data(normlab_cfg())  # make sure the data cache is warm
    env = dict(os.environ)
    res = {"off": [launch("off", a.threads, env) for _ in range(a.repeats)]}
    if not a.quick:
        with tempfile.TemporaryDirectory() as cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
            res["on_cold_cache"] = [launch("on", a.threads, env)]
            res["on_warm_cache"] = [launch("on", a.threads, env)]
    table = {k: {f: summary([r[f] for r in v]) for f in v[0]} for k, v in res.items()}
    for k, v in table.items():
        print(f"compile {k:>14}: " + "  ".join(f"{f} {s['median']:.2f}" for f, s in v.items()), flush=True)
    write_json("startup.json", {"machine": machine(), "args": vars(a), "runs": res, "summary": table})


if __name__ == "__main__":
    main()
