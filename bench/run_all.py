"""Run every benchmark and rewrite BENCHMARKS.md from their JSON results (bench/results/).

    python bench/run_all.py                # full run (~2.5 h on the 2-core CI-class machine)
    python bench/run_all.py --quick        # every script with --quick
    python bench/run_all.py --report-only  # rewrite BENCHMARKS.md from the JSON already in bench/results/
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RES = HERE / "results"

JOBS = [  # (name, script args)
    ("norms", ["bench_norms.py"]),
    ("norms_fused", ["bench_norms.py", "--norms", "bn+relu,in+relu,ln+relu,gn+relu,aa", "--out", "norms_fused.json"]),
    ("norms_compiled", ["bench_norms.py", "--compile", "--norms", "bn,gn", "--formats", "nchw", "--rounds", "2",
                        "--out", "norms_compiled.json"]),
    ("pipeline", ["bench_pipeline.py", "--seeds", "8"]),
    ("pipeline_bf16", ["bench_pipeline.py", "--precision", "bf16", "--seeds", "8", "--out", "pipeline_bf16.json"]),
    ("pipeline_compiled", ["bench_pipeline.py", "--compile", "on", "--seeds", "4", "--out", "pipeline_compiled.json"]),
    ("pipeline_long", ["bench_pipeline.py", "--no-throughput", "--epochs", "8", "--seeds", "4", "--out",
                       "pipeline_long.json"]),  # ~30 min; 8 seeds (~1 h) would roughly halve the interval
    ("pipeline_long_bf16", ["bench_pipeline.py", "--no-throughput", "--precision", "bf16", "--epochs", "8", "--seeds",
                            "4", "--out", "pipeline_long_bf16.json"]),
    ("pipeline_t1", ["bench_pipeline.py", "--threads", "1", "--no-accuracy", "--out", "pipeline_t1.json"]),
    ("pipeline_unfused", ["bench_pipeline.py", "--no-fuse", "--no-accuracy", "--out", "pipeline_unfused.json"]),
    # throughput of TrainStep, the step `normlab train` runs (the rows above before 2026-11-28 timed a hand copy)
    ("pipeline_trainstep", ["bench_pipeline.py", "--no-accuracy", "--out", "pipeline_trainstep.json"]),
    ("pipeline_trainstep_bf16", ["bench_pipeline.py", "--no-accuracy", "--precision", "bf16", "--out",
                                 "pipeline_trainstep_bf16.json"]),
    ("fused_blocks", ["exp_fused_blocks.py"]),
    ("scaling", ["bench_scaling.py"]),
    ("scaling_untuned", ["bench_scaling.py", "--memory-format", "contiguous", "--no-tune-malloc", "--out",
                         "scaling_untuned.json"]),
    ("startup", ["bench_startup.py"]),
    ("distributed", ["bench_distributed.py"]),
    ("executors", ["bench_executors.py"]),
]


def cmd_of(args, quick):
    return ["python", f"bench/{args[0]}", *args[1:], *(["--quick"] if quick else [])]


def run(quick: bool, only: list[str] | None) -> dict:
    done = {}
    for name, args in JOBS:
        if only and name not in only:
            continue
        cmd = cmd_of(args, quick)
        print("$", " ".join(cmd), flush=True)
        t = time.perf_counter()
        with open(RES / f"{name}.log", "w") as log:
            rc = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        done[name] = {"cmd": " ".join(cmd), "rc": rc, "seconds": time.perf_counter() - t}
        print(f"  -> rc {rc}, {done[name]['seconds']:.0f} s", flush=True)
        meta = RES / "commands.json"  # after every job: an interrupted run_all keeps what it finished
        old = json.loads(meta.read_text()) if meta.is_file() else {}
        old[name] = done[name]
        meta.write_text(json.dumps(old, indent=1))
    return done


def load(name):
    p = RES / name
    return json.loads(p.read_text()) if p.is_file() else None


def f3(s, d=3, scale=1.0):
    return f"{s['median'] * scale:.{d}f} ({s['min'] * scale:.{d}f}–{s['max'] * scale:.{d}f})"


def paired_interval(d: list[float]) -> str:
    """Mean of the paired differences with its two-sided 95% Student-t interval, e.g. "+0.0030 [-0.0120, +0.0180]"."""
    import statistics

    from scipy.stats import t

    if len(d) < 2:
        return "–"
    mean, half = statistics.fmean(d), t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"


def norm_rows(results: list[dict]) -> list[str]:
    """Table rows of a bench_norms result list: step times, the normlab/native ratio and saved memory."""
    def name(norm: str) -> str:
        if norm == "aa":
            return "aa (control: native BN both sides)"
        return f"{norm} (normlab's default fused blocks)" if norm.endswith("+relu") else norm

    return [f"| {name(r['norm'])} | {r['format']} | {f3(r['normlab_s'])} | {f3(r['native_s'])} | "
            f"**{f3(r['ratio'], 2)}** | {r['normlab_saved_MB']:.1f} / {r['native_saved_MB']:.1f} "
            f"({r['mem_ratio']:.3f}) |" for r in results]


def machine_label(m: dict) -> str:
    """A machine as a table names it: CPU model, its vector/matrix extensions and the date, where recorded."""
    name = " ".join(m["cpu"].replace("(R)", "").split())
    extra = [", ".join(m["cpu_features"])] if m.get("cpu_features") else []
    extra += [m["date"]] if m.get("date") else []
    return name + (f" ({'; '.join(extra)})" if extra else "")


def setting(args: dict) -> str:
    """A pipeline run's normlab-side precision, torch.compile and block setting, e.g. "fp32, compile off"."""
    return (f"{args.get('precision', 'fp32')}, compile {args.get('compile', 'off')}"
            + (", blocks unfused" if args.get("no_fuse") else ""))


def report() -> str:
    cmds = load("commands.json") or {}
    norms, normc, pipe, scal, start = (load("norms.json"), load("norms_compiled.json"), load("pipeline.json"),
                                       load("scaling.json"), load("startup.json"))
    found = [load(p.name) for p in sorted(RES.glob("*.json")) if p.name != "commands.json"]
    machines = list(dict.fromkeys(machine_label(x["machine"]) for x in found if isinstance(x, dict) and "machine" in x))
    m = next(x["machine"] for x in (pipe, norms, scal, start, normc) if x)
    L = ["# Benchmarks", "",
         "Generated by `python bench/run_all.py` (rewrite this file from the saved JSON with "
         "`python bench/run_all.py --report-only`). Every number below comes from the script and command named "
         "above its table; raw results are in `bench/results/*.json`, logs in `bench/results/*.log`.", "",
         f"Machines: {m['logical_cpus']} logical CPUs, no GPU, shared with other jobs (timings are noisy, so every "
         "comparison is measured side by side, interleaved, in one process). This project's machines are not "
         "always the same CPU model, and each table says which one it was measured on: "
         + "; ".join(f"**{x}**" for x in machines) + ". Ratios are comparable across them only roughly; "
         "absolute times not at all. "
         f"Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}.", "",
         "Numbers are medians with (min–max) over repeats. **Threads:** the norm and scaling benches use 1 torch "
         "thread: on this shared 2-core machine 2 threads made a ResNet-20 step several times slower and far "
         "noisier whenever another process was busy (`bench/results/exp_threads.log`, see the notes at the end). "
         "The pipeline bench uses torch's default (2) as each pipeline runs out of the box, and 1 as a check.", ""]

    def cmd(name, data=None):
        line = f"Command: `{cmds[name]['cmd']}`" if name in cmds else "Command: (not recorded)"
        return line + (f" · measured on {machine_label(data['machine'])}" if data and "machine" in data else "")

    if norms:
        ar = norms["args"]
        L += ["## 1. Norm layers vs PyTorch's native layers (ResNet-20, batch 128, 32×32, one training step)", "",
              cmd("norms", norms), "",
              f"Eager mode, {ar.get('threads', 1)} thread, glibc malloc tuned for both sides "
              f"({'on' if ar.get('malloc_tuned') else 'off'}; see the notes). {ar.get('rounds', '?')} rounds, each "
              f"with a fresh pair of models built in alternating order and {ar.get('steps', '?')} interleaved steps "
              "per side; ratio = normlab / native step time per round (≤ 1.00 is the target), median (min–max) "
              "over rounds. The **aa** row is the control: native BN on both sides, i.e. the measurement's own "
              "spread. normlab's layers run on their C++ kernels (`src/normlab/norms/_kernels.cpp`). Memory = "
              "bytes autograd saves for backward during the step (saved_tensors_hooks, distinct storages): the "
              "activation memory held at a step's peak; weights, grads and optimizer state are identical on both "
              "sides.", "",
              "| norm | format | normlab s/step | native s/step | ratio normlab/native | saved MB normlab / native (ratio) |",
              "|---|---|---|---|---|---|"]
        L += norm_rows(norms["results"])
        L += ["", "Native references: bn `nn.BatchNorm2d`, in `nn.InstanceNorm2d(affine=True)`, ln "
              "`nn.GroupNorm(1, C)`, gn `nn.GroupNorm(8, C)`; bin is compared with *BN + IN together*: the same "
              "gated mix built from the native `F.batch_norm` and `F.instance_norm` kernels. These rows compare "
              "the layers alone (normlab's ResNet built with `fuse=False`); **bn+relu** is normlab's default "
              "ResNet, whose blocks fuse BN + ReLU (+ the residual add) into the norm's passes, against the same "
              "native-BN model.", ""]
    normf = load("norms_fused.json")
    if normf:
        L += ["### What a user gets: normlab's default ResNet-20 (fused blocks) vs the native-layer model", "",
              cmd("norms_fused", normf), "",
              "Same method and settings as the table above, measured in one later run. Row **X+relu**: normlab's "
              "default ResNet-20 with norm X -- the stem and every block fuse X + ReLU (+ the residual add) into "
              "the norm's own passes, as `normlab train` runs it -- against the same model with X's native layer "
              "(and native ReLU and add). The control row **aa** shows this run's own spread.", "",
              "| norm | format | normlab s/step | native s/step | ratio normlab/native | saved MB normlab / native (ratio) |",
              "|---|---|---|---|---|---|", *norm_rows(normf["results"]), ""]
    if normc:
        L += ["### With torch.compile (whole model, both sides)", "", cmd("norms_compiled", normc), "",
              "Under torch.compile normlab's layers trace their tensor-op path (inductor fuses it); the C++ kernels "
              "are for eager mode.", "",
              "| norm | format | normlab s/step | native s/step | ratio | first step (compile) normlab / native s |",
              "|---|---|---|---|---|---|"]
        for r in normc["results"]:
            L.append(f"| {r['norm']} | {r['format']} | {f3(r['normlab_s'])} | {f3(r['native_s'])} | "
                     f"**{f3(r['ratio'], 2)}** | {r['first_step_s']['normlab']:.1f} / {r['first_step_s']['native']:.1f} |")
        L.append("")
    pipes = [(k, load(f"{k}.json")) for k in ("pipeline", "pipeline_bf16", "pipeline_compiled", "pipeline_long", "pipeline_long_bf16", "pipeline_t1",
                                            "pipeline_unfused", "pipeline_trainstep", "pipeline_trainstep_bf16")]
    pipes = [(k, p) for k, p in pipes if p]
    if pipes:
        L += ["## 2. End to end: normlab vs a conventional pipeline (ResNet-20 BN, batch 128, standard augmentation)",
              "", "normlab: its uint8 tensor cache, vectorised pad+crop+flip, normlab BN (C++ kernels), "
              "channels_last, tuned malloc -- what `normlab train` does by default -- with the precision shown. "
              "Conventional: torchvision ImageFolder over the JPEG folder + DataLoader worker processes + PIL "
              "transforms, `nn.BatchNorm2d`, NCHW, fp32. Both sides in one process, alternating rounds. "
              "**Ceiling** (measured in the same rounds): the same ResNet-20 with norms and ReLUs replaced by "
              "identities, stepping on one resident batch in normlab's layout and precision -- convolutions, "
              "residual adds, pooling, classifier and SGD only, no data path. Its ratio to the conventional side "
              "is the most any implementation of the norms and the data pipeline could reach on this machine.", "",
              "| command | machine | normlab precision, compile (blocks fused unless said) | torch threads normlab / "
              "conventional (+ workers) | normlab images/s | conventional images/s | **ratio** | ceiling images/s | "
              "ceiling ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
        for k, p in pipes:
            if "throughput" not in p:
                continue
            t, ar = p["throughput"], p["args"]
            L.append(f"| `{cmds[k]['cmd'] if k in cmds else k}` | {machine_label(p['machine'])} | {setting(ar)} | "
                     f"{t['threads']['normlab']} / {t['threads']['conventional']} (+{ar['workers']}) | "
                     f"{f3(t['normlab_img_s'], 0)} | {f3(t['conventional_img_s'], 0)} | **{f3(t['ratio'], 2)}** | "
                     + (f"{f3(t['bound_img_s'], 0)} | {f3(t['bound_ratio'], 2)} |" if "bound_ratio" in t else "– | – |"))
        L.append("")
        acc = [(k, p) for k, p in pipes if "accuracy" in p and "runs" in p["accuracy"]]
        if acc:
            L += ["Accuracy at a fixed budget: the epochs shown on the same training images (normlab's stratified "
                  "subset, checked label by label and pixel by pixel), same per-epoch order, normalization "
                  "statistics, initial weights and per-step cosine lr from 0.1; test accuracy on the full "
                  "10,000-image test folder; one run per seed and side. Only the augmentation's random draws "
                  "differ. Paired difference = normlab − conventional per seed.", "",
                  "| machine | normlab precision, compile | images × epochs × seeds | normlab test acc (mean ± sd) | "
                  "conventional test acc (mean ± sd) | paired difference median (min…max), normlab higher | "
                  "paired difference mean [95% t-interval] | per seed normlab / conventional |",
                  "|---|---|---|---|---|---|---|---|"]
            for k, p in acc:
                a = p["accuracy"]
                per = ", ".join(f"{r['normlab']:.4f} / {r['conventional']:.4f}" for r in a["runs"])
                d = sorted(r["normlab"] - r["conventional"] for r in a["runs"])
                med = d[len(d) // 2] if len(d) % 2 else (d[len(d) // 2 - 1] + d[len(d) // 2]) / 2
                L.append(f"| {machine_label(p['machine'])} | {setting(p['args'])} | {a['subset']:,} × {a['epochs']} × {len(a['runs'])} | "
                         f"{a['normlab']['mean']:.4f} ± {a['normlab']['std']:.4f} | {a['conventional']['mean']:.4f} ± "
                         f"{a['conventional']['std']:.4f} | {med:+.4f} ({d[0]:+.4f}…{d[-1]:+.4f}), "
                         f"{sum(x > 0 for x in d)}/{len(d)} | {paired_interval(d)} | {per} |")
            L.append("")
    if scal:
        L += ["## 3. Cost vs depth and input size", "", cmd("scaling", scal), "", "![scaling](bench/results/scaling.png)", "",
              "| sweep | value | ms per image (train step) | per unit (ms per n, or µs per pixel) |", "|---|---|---|---|"]
        for r in scal["results"]:
            unit = r["value"] if r["sweep"] == "n" else r["value"] ** 2 / 1e3
            L.append(f"| {r['sweep']} | {r['value']} | {f3(r['s_per_image'], 3, 1e3)} | "
                     f"{r['s_per_image']['median'] * 1e3 / unit:.3f} |")
        fn, fs = scal["fits"]["n"], scal["fits"]["size"]
        L += ["", f"Linear fits: t = {fn['intercept_s'] * 1e3:.3f} + {fn['slope_s'] * 1e3:.4f}·n ms/image "
              f"(R² {fn['r2']:.4f}); t = {fs['intercept_s'] * 1e3:.3f} + {fs['slope_s'] * 1e6:.4f}e-3·pixels ms/image "
              f"(R² {fs['r2']:.4f}). Depth sweep batch {scal['args']['batch']}, size sweep n=3 batch "
              f"{scal['args']['size_batch']}; memory format {scal['args'].get('memory_format', 'contiguous')}, "
              f"glibc malloc {'tuned' if scal['args'].get('malloc_tuned') else 'untuned'}.", ""]
        untuned = load("scaling_untuned.json")
        if untuned:
            L += [f"Same sweep with NCHW and glibc's default malloc (`{cmds.get('scaling_untuned', {}).get('cmd', 'not recorded')}`), µs per pixel per "
                  "image in the size sweep, this run vs the default run above:", "",
                  "| size | NCHW, untuned malloc | defaults (above) |", "|---|---|---|"]
            tuned = {r["value"]: r for r in scal["results"] if r["sweep"] == "size"}
            for r in untuned["results"]:
                if r["sweep"] == "size" and r["value"] in tuned:
                    px = r["value"] ** 2 / 1e3
                    L.append(f"| {r['value']}² | {r['s_per_image']['median'] * 1e3 / px:.3f} | "
                             f"{tuned[r['value']]['s_per_image']['median'] * 1e3 / px:.3f} |")
            L.append("")
    if start:
        L += ["## 5. Start-up: time to first step (fresh process, warm data cache)", "", cmd("startup", start), "",
              "| compile | imports s | load_data s | build + compile wrapper s | first step s | **time to first step s** | second step s |",
              "|---|---|---|---|---|---|---|"]
        for k, v in start["summary"].items():
            L.append(f"| {k} | {v['imports_s']['median']:.2f} | {v['data_s']['median']:.2f} | "
                     f"{v['model_compile_s']['median']:.2f} | {v['first_step_s']['median']:.2f} | "
                     f"**{f3(v['time_to_first_step_s'], 2)}** | {v['second_step_s']['median']:.2f} |")
        L.append("")
    if normc:
        L += ["Compile times (\"first step\" in the torch.compile table of section 1) depend on inductor's on-disk cache: that table ran with a partly "
              "warm cache; section 5 measures cold vs warm.", ""]
    dist_md = RES / "distributed.md"
    if dist_md.is_file():
        L += ["## 6. DDP (2 processes, gloo) vs 1 process, and a study with --jobs 2 vs --jobs 1", "",
              cmd("distributed"), "", dist_md.read_text().strip(), ""]
    exec_md = RES / "executors.md"
    if exec_md.is_file():
        L += ["## 7. A study on local processes, Ray and Slurm; a worker killed and a job preempted", "",
              cmd("executors"), "", exec_md.read_text().strip(), ""]
    notes = ROOT / "bench" / "NOTES.md"
    if notes.is_file():
        L += [notes.read_text().strip(), ""]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated job names: " + ",".join(j[0] for j in JOBS))
    a = ap.parse_args()
    RES.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        run(a.quick, a.only.split(",") if a.only else None)
    (ROOT / "BENCHMARKS.md").write_text(report())
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
