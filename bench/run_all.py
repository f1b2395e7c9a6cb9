"""Run every benchmark and rewrite BENCHMARKS.md from their JSON results (bench/results/).

    python bench/run_all.py                # full run (~3 h on the 2-core CI-class machine; robustness ~40 min)
    python bench/run_all.py --quick        # every script with --quick
    python bench/run_all.py --only norms   # some jobs (comma-separated names)
    python bench/run_all.py --report-only  # rewrite BENCHMARKS.md from the JSON already in bench/results/
    python bench/run_all.py --stale        # which tables are older than the code they measure (exit 1 if any)

BENCHMARKS.md is generated only. Each job's run is stamped in bench/results/commands.json with the commit it
measured (and whether the files it depends on had uncommitted changes), the CPU and the date, and every table
carries that stamp. ``DEPS`` lists, per job, the files its figures depend on; ``--stale`` names the jobs whose
stamped commit is older than a commit touching those files.
"""

from __future__ import annotations

import argparse
import ast
import functools
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
    ("robustness", ["bench_robustness.py"]),  # writes robustness.json
    ("agreement", ["agreement.py"]),  # no timing: every norm against its reference (seconds)
    # the catalogue against its references (timm's layers, the paper's equations on native ops), per step and layer
    ("norms_catalogue", ["bench_norms.py", "--norms", "catalogue,aa", "--out", "norms_catalogue.json"]),
    ("norms_catalogue_layer", ["bench_norms.py", "--norms", "catalogue,aa", "--layer", "--out",
                               "norms_catalogue_layer.json"]),
    # the course norms on the spec engine against their hand-fused override (does the override pay?)
    ("norms_engine", ["bench_norms.py", "--engine", "--out", "norms_engine.json"]),
    # the course norms' step, this tree against the commit before they moved onto the engine (must stay within 3 %)
    ("versions", ["bench_versions.py", "--old", "348b542", "--out", "versions.json"]),
]

# What each job's figures depend on (git pathspecs from the repository root): its script, the bench helpers and
# the normlab code it runs. A commit touching any of them after a job's stamped commit makes its table stale.
_NORM_STEP = ["bench/_common.py", "src/normlab/norms", "src/normlab/models/resnet.py", "src/normlab/registry.py",
              "src/normlab/train/runtime.py"]  # a ResNet-20 step on normlab's layers, malloc tuned
_TRAIN_STEP = ["bench/_common.py", "src/normlab/norms", "src/normlab/models", "src/normlab/registry.py",
               "src/normlab/config.py", "src/normlab/device.py", "src/normlab/metrics.py", "src/normlab/evaluation.py",
               "src/normlab/data", "src/normlab/train"]  # normlab's data path and TrainStep
_WHOLE = ["src/normlab"]  # whole `normlab train` / `normlab study` processes
DEPS: dict[str, list[str]] = {
    **{k: ["bench/bench_norms.py", *_NORM_STEP] for k in ("norms", "norms_fused", "norms_compiled", "norms_catalogue",
                                                          "norms_catalogue_layer", "norms_engine")},
    "versions": ["bench/bench_versions.py", "bench/bench_norms.py", *_NORM_STEP],
    **{k: ["bench/bench_pipeline.py", *_TRAIN_STEP] for k, _ in JOBS if k.startswith("pipeline")},
    "fused_blocks": ["bench/exp_fused_blocks.py", *_NORM_STEP],
    "scaling": ["bench/bench_scaling.py", *_NORM_STEP],
    "scaling_untuned": ["bench/bench_scaling.py", *_NORM_STEP],
    "startup": ["bench/bench_startup.py", "bench/_common.py", *_WHOLE],
    "distributed": ["bench/bench_distributed.py", *_WHOLE],
    "executors": ["bench/bench_executors.py", *_WHOLE],
    # the corruptions, the test-time statistics passes and, for the training-epoch context, TrainStep
    "robustness": ["bench/bench_robustness.py", "src/normlab/analysis/robustness.py", *_TRAIN_STEP],
    # the spec table (factories, references), the tests' parameter randomization and the layers
    "agreement": ["bench/agreement.py", "bench/_common.py", "tests/norm_specs.py", "tests/test_catalogue.py",
                  "src/normlab/norms"],
}


def git(*args: str, root: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def stamp_now(name: str, root: Path = ROOT) -> dict:
    """The stamp of a job run now: HEAD, whether the job's files differ from it, the CPU and today's date."""
    try:
        commit = git("rev-parse", "HEAD", root=root)
        dirty = bool(git("status", "--porcelain", "--", *DEPS.get(name, []), root=root))
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, False
    return {"commit": commit, "dirty": dirty, "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d", time.gmtime())}


def cpu_model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)


def _code(source: str | None) -> str | None:
    """A Python file's code without docstrings and comments (its AST), so that edits to those are no change."""
    if source is None:
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


@functools.lru_cache(maxsize=None)
def _show(commit: str, path: str, root: Path) -> str | None:
    res = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else None


def changed_code(commit: str, paths: list[str], root: Path = ROOT, until: str = "HEAD") -> list[str]:
    """The files under ``paths`` whose code differs between ``commit`` and ``until`` (edits that only touch
    Python docstrings or comments do not count)."""
    commit, until = git("rev-parse", commit, until, root=root).split()  # hashes: _show caches by them
    names = git("diff", "--name-only", commit, until, "--", *paths, root=root).split()
    out = []
    for name in names:
        old, new = _show(commit, name, root), _show(until, name, root)
        if name.endswith(".py") and _code(old) == _code(new):
            continue
        out.append(name)
    return out


def newest_code_change(commit: str, files: list[str], root: Path = ROOT) -> str:
    """The newest commit after ``commit`` that changed the code of ``files`` (hash, date, subject)."""
    for c in git("rev-list", "--first-parent", f"{commit}..HEAD", "--", *files, root=root).split():
        if changed_code(f"{c}^", files, root, until=c):
            return git("log", "-1", "--format=%h %ad %s", "--date=short", c, root=root)
    return "(not found on the first-parent line)"


def stale(cmds: dict, root: Path = ROOT) -> list[str]:
    """One line per job: up to date, stale (with the files whose code changed since and the newest commit that
    changed them), or never stamped."""
    lines = []
    for name, _ in JOBS:
        st = cmds.get(name, {})
        if not st.get("commit"):
            lines.append(f"{name}: no stamp (never run by run_all, or before stamps): rerun with --only {name}")
            continue
        files, short = changed_code(st["commit"], DEPS[name], root), st["commit"][:9]
        if files:
            last = newest_code_change(st["commit"], files, root)
            more = f" and {len(files) - 3} more" if len(files) > 3 else ""
            lines.append(f"{name}: STALE, measured at {short}; changed since: {', '.join(files[:3])}{more}; "
                         f"newest change: {last[:100]}")
        elif st.get("dirty"):
            lines.append(f"{name}: STALE, measured at {short} with uncommitted changes to its files")
        else:
            lines.append(f"{name}: up to date (measured at {short})")
    return lines


def cmd_of(args, quick):
    return ["python", f"bench/{args[0]}", *args[1:], *(["--quick"] if quick else [])]


def run(quick: bool, only: list[str] | None) -> dict:
    done = {}
    for name, args in JOBS:
        if only and name not in only:
            continue
        cmd = cmd_of(args, quick)
        print("$", " ".join(cmd), flush=True)
        stamp, t = stamp_now(name), time.perf_counter()  # the code as it is when the job starts
        with open(RES / f"{name}.log", "w") as log:
            rc = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        done[name] = {"cmd": " ".join(cmd), "rc": rc, "seconds": time.perf_counter() - t, **stamp}
        print(f"  -> rc {rc}, {done[name]['seconds']:.0f} s", flush=True)
        meta = RES / "commands.json"  # after every job: an interrupted run_all keeps what it finished
        old = json.loads(meta.read_text()) if meta.is_file() else {}
        # a failed job wrote no new results: its table keeps the stamp of the run that made them
        old[name] = done[name] if rc == 0 else {**old.get(name, {}), "failed": done[name]}
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


def cpu_label(m: dict) -> str:
    """A machine's CPU as a table names it: the model and its vector/matrix extensions, where recorded."""
    name = " ".join(m["cpu"].replace("(R)", "").split())
    return name + (f" ({', '.join(m['cpu_features'])})" if m.get("cpu_features") else "")


def stamp(st: dict, data: dict | None = None) -> tuple[str, str, str]:
    """(commit, CPU, date) of a job's results: the commit from its stamp in commands.json; the CPU and date from
    the result's own machine record where it has one, else from the stamp."""
    commit = f"`{st['commit'][:7]}`" if st.get("commit") else "commit not recorded"
    if st.get("dirty"):
        commit += " with uncommitted changes to its files"
    m = (data or {}).get("machine") or {}
    cpu = cpu_label(m) if m.get("cpu") else cpu_label({"cpu": st["cpu"]}) if st.get("cpu") else "a CPU not recorded"
    return commit, cpu, m.get("date") or st.get("date") or "date not recorded"


def setting(args: dict) -> str:
    """A pipeline run's normlab-side precision, torch.compile and block setting, e.g. "fp32, compile off"."""
    return (f"{args.get('precision', 'fp32')}, compile {args.get('compile', 'off')}"
            + (", blocks unfused" if args.get("no_fuse") else ""))


def report() -> str:
    cmds = load("commands.json") or {}
    norms, normc, pipe, scal, start = (load("norms.json"), load("norms_compiled.json"), load("pipeline.json"),
                                       load("scaling.json"), load("startup.json"))
    found = [load(p.name) for p in sorted(RES.glob("*.json")) if p.name != "commands.json"]
    machines = list(dict.fromkeys(cpu_label(x["machine"]) for x in found
                                  if isinstance(x, dict) and x.get("machine", {}).get("cpu")))
    m = next(x["machine"] for x in (pipe, norms, scal, start, normc) if x)
    L = ["# Benchmarks", "",
         "Generated by `python bench/run_all.py`; do not edit by hand (rewrite this file from the saved JSON with "
         "`python bench/run_all.py --report-only`). Every number below comes from the script and command named "
         "above its table, which is stamped with the commit of the code it measured, the CPU and the date; "
         "`python bench/run_all.py --stale` lists the tables older than the code they measure. Raw results are in "
         "`bench/results/*.json`, logs in `bench/results/*.log`; what was tried on the way, with the figures of "
         "the time, is in the lab notes, `bench/archive/NOTES.md`.", "",
         f"Machines: {m['logical_cpus']} logical CPUs, no GPU, shared with other jobs (timings are noisy, so every "
         "comparison is measured side by side, interleaved, in one process). This project's machines are not "
         "always the same CPU model, and each table says which one it was measured on: "
         + "; ".join(f"**{x}**" for x in machines) + ". Ratios are comparable across them only roughly; "
         "absolute times not at all. "
         f"Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}.", "",
         "Numbers are medians with (min–max) over repeats. **Threads:** the norm and scaling benches use 1 torch "
         "thread: on this shared 2-core machine 2 threads made a ResNet-20 step several times slower and far "
         "noisier whenever another process was busy (`bench/archive/results/exp_threads.log`, and the lab notes). "
         "The pipeline bench uses torch's default (2) as each pipeline runs out of the box, and 1 as a check.", ""]

    def cmd(name, data=None):
        commit, cpu, date = stamp(cmds.get(name, {}), data)
        line = f"Command: `{cmds[name]['cmd']}`" if name in cmds else "Command: (not recorded)"
        return f"Measured at commit {commit} on {cpu}, {date} · {line}"

    if norms:
        ar = norms["args"]
        L += ["## 1. Norm layers vs PyTorch's native layers (ResNet-20, batch 128, 32×32, one training step)", "",
              cmd("norms", norms), "",
              f"Eager mode, {ar.get('threads', 1)} thread, glibc malloc tuned for both sides "
              f"({'on' if ar.get('malloc_tuned') else 'off'}; see the lab notes). {ar.get('rounds', '?')} rounds, each "
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
    L += catalogue_sections(load("norms_catalogue.json"), load("norms_catalogue_layer.json"), cmd)
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
              "Each row is its own run, stamped with the commit it measured, the CPU and the date.", "",
              "| command | measured at | normlab precision, compile (blocks fused unless said) | torch threads normlab / "
              "conventional (+ workers) | normlab images/s | conventional images/s | **ratio** | ceiling images/s | "
              "ceiling ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
        for k, p in pipes:
            if "throughput" not in p:
                continue
            t, ar = p["throughput"], p["args"]
            L.append(f"| `{cmds[k]['cmd'] if k in cmds else k}` | {', '.join(stamp(cmds.get(k, {}), p))} | {setting(ar)} | "
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
                  "| command | measured at | normlab precision, compile | images × epochs × seeds | normlab test acc (mean ± sd) | "
                  "conventional test acc (mean ± sd) | paired difference median (min…max), normlab higher | "
                  "paired difference mean [95% t-interval] | per seed normlab / conventional |",
                  "|---|---|---|---|---|---|---|---|---|"]
            for k, p in acc:
                a = p["accuracy"]
                per = ", ".join(f"{r['normlab']:.4f} / {r['conventional']:.4f}" for r in a["runs"])
                d = sorted(r["normlab"] - r["conventional"] for r in a["runs"])
                med = d[len(d) // 2] if len(d) % 2 else (d[len(d) // 2 - 1] + d[len(d) // 2]) / 2
                L.append(f"| `{cmds[k]['cmd'] if k in cmds else k}` | {', '.join(stamp(cmds.get(k, {}), p))} | "
                         f"{setting(p['args'])} | {a['subset']:,} × {a['epochs']} × {len(a['runs'])} | "
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
            L += ["Same sweep with NCHW and glibc's default malloc, µs per pixel per image in the size sweep, this run "
                  "vs the default run above:", "", cmd("scaling_untuned", untuned), "",
                  "| size | NCHW, untuned malloc | defaults (above) |", "|---|---|---|"]
            tuned = {r["value"]: r for r in scal["results"] if r["sweep"] == "size"}
            for r in untuned["results"]:
                if r["sweep"] == "size" and r["value"] in tuned:
                    px = r["value"] ** 2 / 1e3
                    L.append(f"| {r['value']}² | {r['s_per_image']['median'] * 1e3 / px:.3f} | "
                             f"{tuned[r['value']]['s_per_image']['median'] * 1e3 / px:.3f} |")
            L.append("")
    fused = load("exp_fused_blocks.json")
    if fused:
        ar = fused["args"]
        L += ["## 4. Fused blocks: normlab's ResNet-20 with and without the fused norm + ReLU (+ residual add)", "",
              cmd("fused_blocks", fused), "",
              f"The same model with `fuse=True` (normlab's default: the stem and every block compute "
              f"relu(norm(x) + shortcut) in the norm's own passes) and `fuse=False`, {ar.get('threads')} threads, "
              f"{ar.get('memory_format')}, batch {ar.get('batch')}, {ar.get('rounds')} interleaved rounds of "
              f"{ar.get('steps')} steps per side; ratio = fused / unfused step time per round, median (min–max).", "",
              "| norm | fused s/step | unfused s/step | **ratio fused/unfused** |", "|---|---|---|---|"]
        L += [f"| {r['norm']} | {f3(r['fused_s'])} | {f3(r['unfused_s'])} | **{f3(r['ratio'], 3)}** |"
              for r in fused["results"]]
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
    rob = load("robustness.json")
    if rob:
        L += robustness_section(rob, cmd("robustness", rob))
    agree = load("agreement.json")
    if agree:
        L += agreement_section(agree, cmd("agreement", agree))
    L += engine_section(load("norms_engine.json"), load("versions.json"), cmd)
    return "\n".join(L)


def _time_rows(results: list[dict], a: str, b: str) -> list[str]:
    """Rows of two sides' step (or layer) times and their ratio a / b, from bench_norms / bench_versions results."""
    return [f"| {r['norm']} | {r['format']} | {f3(r[a])} | {f3(r[b])} | **{f3(r['ratio'], 2)}** |" for r in results]


def catalogue_sections(step: dict | None, layer: dict | None, cmd) -> list[str]:
    """Section 1's catalogue tables: every catalogue norm against its reference, per ResNet-20 step and per layer."""
    L: list[str] = []
    if step:
        L += ["### The catalogue against its references (ResNet-20 step)", "", cmd("norms_catalogue", step), "",
              "Same method as the table above (ResNet-20 with `fuse=False`, batch 128, 32×32, 1 thread, interleaved "
              "rounds). References: timm's layer where timm has one (frn `FilterResponseNormTlu2d`, evonorm_b0/s0 "
              "`EvoNorm2dB0`/`S0`, ln2d `LayerNorm2d`, rms2d `RmsNorm2d`), otherwise the paper's equations on native "
              "ops (sn, brn: `torch.var_mean`; gbn: `F.batch_norm` per ghost batch; rms: `F.rms_norm`; dyt: "
              "`torch.tanh`; mobn: `torch.mean`). The spec norms (frn, evonorm, sn, brn, gbn, rms, mobn) run their "
              "sweeps on the C++ kernels and their (N, C) math on torch ops; ln2d, rms2d and dyt are tensor-op "
              "modules. **aa** is the control (native BN both sides).", "",
              "| norm | format | normlab s/step | reference s/step | ratio normlab/reference |", "|---|---|---|---|---|",
              *_time_rows(step["results"], "normlab_s", "native_s"), ""]
    if layer:
        L += ["### The catalogue against its references (one layer)", "", cmd("norms_catalogue_layer", layer), "",
              "One layer's forward + backward on a (128, 32, 16, 16) tensor, interleaved with its reference; the "
              "ResNet step above includes the convolutions, which dominate it.", "",
              "| norm | format | normlab s/layer | reference s/layer | ratio normlab/reference |",
              "|---|---|---|---|---|", *_time_rows(layer["results"], "normlab_s", "native_s"), ""]
    return L


def engine_section(engine: dict | None, versions: dict | None, cmd) -> list[str]:
    """Section 10: the course norms on the spec engine against their hand-fused override, and their step before
    and after they became specs."""
    if not (engine or versions):
        return []
    L = ["## 10. The course norms on the spec engine", "",
         "bn, in, ln, gn and bin are specs on the engine of `normlab.norms.spec` (per-(n, c) sums on the C++ "
         "kernels, their (N, C) math in torch ops, the affine on the C++ kernels) and keep their hand-fused "
         "Functions as the default override (`NORMLAB_FUSED=0` or `layer.override = False` takes the engine "
         "path). These two tables say whether the override pays, and whether becoming specs cost the default "
         "path anything.", ""]
    if engine:
        L += ["### Engine path vs hand-fused override (ResNet-20 step)", "", cmd("norms_engine", engine), "",
              "Side A: the model with every course norm on the engine path; side B: the same model on the override "
              "(the default). Ratio engine / override: above 1 is what the override saves. Rows **X+relu@engine**: "
              "the fused blocks (on the engine, the residual add and ReLU inside its affine sweep). **aa** is the "
              "control (native BN both sides).", "",
              "| norm | format | engine s/step | override s/step | ratio engine/override |", "|---|---|---|---|---|",
              *_time_rows(engine["results"], "normlab_s", "native_s"), ""]
    if versions:
        old = versions.get("old", "")[:7]
        L += [f"### Before and after: this code against `{old}`, the commit before the move (ResNet-20 step)", "",
              cmd("versions", versions), "",
              f"`bench/bench_versions.py` exports `src/normlab` at `{old}` as the package `normlab_old` and times "
              "both versions' models in one process, interleaved as above (it checks every module of each side "
              "comes from its own package). Ratio new / old: the course norms (the override path, the default) "
              "must stay within 1.03; **sn+relu**, **rms+relu**: catalogue norms, which moved from tensor ops to "
              "the C++ sweeps and now fuse in the blocks.", "",
              "| norm | format | new s/step | old s/step | ratio new/old |", "|---|---|---|---|---|",
              *_time_rows(versions["results"], "new_s", "old_s"), ""]
    return L


def robustness_section(r: dict, command: str) -> list[str]:
    """Section 8: the robustness step's phases per run (bench_robustness.py), with one clean evaluation and one
    training epoch as the scale they are read against."""
    s, c = r["seconds"], r["context"]
    n_sets = len(r["corruptions"]) * len(r["severities"])
    cores = r.get("machine", {}).get("logical_cpus")
    k, m = len(r["corruptions"]), len(r["severities"])
    title = (f"{r['images']:,} test images × {k} corruption{'s' * (k != 1)} × {m} severit{'ies' if m != 1 else 'y'}"
             + (f", {cores} cores" if cores else ""))
    later, epoch, clean = r["later_run_seconds"], c["train_epoch_seconds"], c["clean_eval_seconds"]
    plain_only = s["load"] + s["plain"]

    def row(what: str, when: str, sec: float, bold: bool = False) -> str:
        b = "**" if bold else ""
        return (f"| {b}{what}{b} | {when} | {b}{sec:,.1f}{b} | {sec / clean:,.1f} | {sec / epoch:.2f} |")

    sev = ", ".join(str(x) for x in r["severities"])
    L = [f"## 8. Cost of the robustness step per run at CIFAR-10 size ({title})", "", command, ""]
    if r.get("quick"):
        L += ["**Smoke test (`--quick`): a few images and sets, not a measurement; rerun without `--quick`.**", ""]
    L += [f"What `normlab robustness` and a study's robustness step do per run, phase by phase, for "
          f"{r['model']} with {r['norm']} (random weights: an evaluation's cost does not depend on them), "
          f"torch threads {r['threads']}, evaluation batch {r['eval_batch_size']}, on {r['source'].split(' (')[0]}: "
          f"{n_sets} corrupted sets (severities {sev}). Seconds are sums over every set. The last two columns put "
          "each phase against one plain evaluation of the clean test set and one training epoch (below the "
          "table).", "",
          "| phase | paid | seconds | × clean evaluation | × training epoch |", "|---|---|---|---|---|",
          row(f"generate the {n_sets} sets (written to the cache)", "once per study (data set and seed)",
              s["generate"] + r.get("fingerprint_seconds", 0.0)),
          row("load the cached sets", "every run", s["load"]),
          row("plain evaluation (eval mode)", "every run", s["plain"])]
    if r.get("batch_statistics", True):
        L += [row("re-estimated statistics (train-mode pass + evaluation)", "runs of norms with batch statistics",
                  s["adapted"]),
              row("prior-mixed statistics (Schneider et al.)", "runs of norms with batch statistics", s["mixed"]),
              row("clean batch-statistics sweep (batch 1, 8, 32, 128, "
                  f"{min(r['images'], r['args'].get('batch_stats_images', r['images'])):,} images)",
                  "runs of norms with batch statistics", s["batch_stats"])]
    L += [row(f"total per run, {r['norm']}", "every run", later, bold=True),
          row("total per run, a norm without batch statistics (load + plain)", "every run", plain_only),
          row(f"first run of a study, {r['norm']} (adds the generation)", "once per study",
              r["first_run_seconds"]), "",
          f"Context, in the same process: one plain evaluation of the clean test set ({r['images']:,} images) took "
          f"**{clean:,.1f} s**; one training epoch of the cifar10-paper protocol ({c['train_epoch_images']:,} "
          f"images, batch {c['train_batch']}, standard augmentation) **{epoch:,.1f} s**, estimated from "
          f"{c['train_steps_timed']} timed `TrainStep` steps scaled to {c['train_epoch_steps']} (training steps "
          f"only: no validation pass or checkpoint). So the robustness step of one {r['norm']} run costs as much "
          f"as {later / epoch:.1f} training epochs ({plain_only / epoch:.1f} for a norm without batch statistics): "
          f"{100 * later / (later + 100 * epoch):.0f}% of a 100-epoch run's training steps plus this step.", ""]
    gen = sorted(r.get("generate_seconds_per_corruption", {}).items(), key=lambda kv: -kv[1])
    if gen:
        L += [f"Generation per corruption, seconds over severities {sev}: "
              + ", ".join(f"{k} {v:,.1f}" for k, v in gen) + ".", ""]
    return L


AGREEMENT_KINDS = {"y": ("y",), "grads": ("dx", "grad."), "buffers": ("buffer.",)}
# Why a float64 comparison can stop near float32 rounding, where the cause is known (checked in the sources):
FP64_CAUSES = {
    "frn": "timm's FilterResponseNormTlu2d takes the mean square in float32 (`x.square().float()`)",
    "evonorm_b0": "timm's EvoNorm2dB0 takes the batch variance in float32 (`x.float().var(...)`)",
    "evonorm_s0": "timm's EvoNorm2dS0 takes the group variance in float32 (`x.float().var(...)`)",
    "brn": "normlab's warm-up bounds r_max, d_max are float32 tensors (`BatchRenorm2d.bounds`), so the clamp of "
           "d is rounded to float32 while the warm-up runs",
}


def agreement_worst(q: dict, kind: str) -> tuple[float, float, str] | None:
    """(largest |Δ|, largest relative |Δ|, the quantity with the largest |Δ|) over one kind of quantity, or None
    when the layer has none of that kind (e.g. no running buffers)."""
    items = [(k, v) for k, v in q.items() if k.startswith(AGREEMENT_KINDS[kind])]
    if not items:
        return None
    key, top = max(items, key=lambda kv: kv[1]["abs"])
    return top["abs"], max(v["rel"] for _, v in items), key


def agreement_cell(w: tuple[float, float, str] | None, name: bool = False) -> str:
    """``1.4e-06 (5e-07)``: the largest |Δ| and, in brackets, the largest |Δ| / max |reference|; ``0`` when
    equal; ``–`` when there is nothing to compare. ``name`` adds the quantity with the largest |Δ|."""
    if w is None:
        return "–"
    a, r, key = w
    if a == 0:
        return "0"
    text = f"{a:.1e} ({r:.0e})"
    return text + (f", {key.removeprefix('grad.')}" if name else "")


def agreement_backends(res: list[dict], norm: str) -> list[tuple[str, str]]:
    """(back-end, label) of a norm's rows: the C++ row only where the kernels ran or changed a number (a norm
    without kernels computes the same on both settings and gets one row)."""
    by = {(r["backend"], r["dtype"], r["input"]): r for r in res if r["norm"] == norm}
    cpp = [r for k, r in by.items() if k[0] == "cpp"]
    if not cpp:
        return [("ops", "tensor ops")]
    if not any(k[0] == "ops" for k in by):
        return [("cpp", "C++ kernels")]
    if any(r["cpp_calls"] for r in cpp):
        return [("ops", "tensor ops"), ("cpp", "C++ kernels")]
    if any(by.get(("ops", r["dtype"], r["input"]), {}).get("vs_same") != r["vs_same"] for r in cpp):
        return [("ops", "tensor ops"), ("cpp", "NORMLAB_KERNELS=1 (no kernel call)")]
    return [("ops", "either (no C++ kernels)")]


def agreement_section(data: dict, command: str) -> list[str]:
    """Section 9: every norm of tests/norm_specs.py against its reference (bench/agreement.py): largest output,
    gradient and running-buffer differences on each back-end, float32 and float64, mean 0.5 and mean 1e3."""
    res = data["results"]
    by = {(r["norm"], r["backend"], r["dtype"], r["input"]): r for r in res}
    norms = list(dict.fromkeys(r["norm"] for r in res))
    shape = "×".join(map(str, data["shape"]))
    big = data["inputs"]["mean1e3"]

    L = ["## 9. Every norm against its reference: largest output and gradient differences", "", command, ""]
    if data.get("quick"):
        L += ["**Smoke test (`--quick`): a few norms only; rerun without `--quick`.**", ""]
    L += [f"Each row of `tests/norm_specs.py` (the table `tests/test_catalogue.py` asserts on): our layer and its "
          "reference (PyTorch's layer, timm's, or the paper's equations written in the test file) start from the "
          f"same randomized state and run side by side on {shape} (N×C×H×W) inputs for {data['steps']} training "
          "steps, a fresh batch each, then one eval step. Each cell is the largest |ours − reference| over the "
          "steps, with the largest |Δ| / max |reference| in brackets (norm-wise relative: element-wise ratios "
          "explode near 0). **grads** covers dx and every parameter's gradient (named: the largest one); "
          "**buffers** the running statistics the reference updates too, after each step; – none. Back-end: the "
          "tensor ops (`NORMLAB_KERNELS=0`) and the C++ kernels (`=1`) where the norm has them; a norm without "
          "kernels gets one row. Raw numbers, per parameter, in `bench/results/agreement.json`.", "",
          "### Mean 0.5, std 1: against the reference in the same dtype (what the tests compare)", "",
          "| norm | reference | back-end | test tolerance atol / rtol | fp32 output | fp32 grads | fp32 buffers "
          "| fp64 output | fp64 grads | fp64 buffers |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows_big = []
    for norm in norms:
        for be, label in agreement_backends(res, norm):
            r32, r64 = by.get((norm, be, "float32", "mean0.5")), by.get((norm, be, "float64", "mean0.5"))
            b32, b64 = by.get((norm, be, "float32", "mean1e3")), by.get((norm, be, "float64", "mean1e3"))
            ref = next(r for r in (r32, r64, b32, b64) if r)

            def cells(r, which, kinds=("y", "grads", "buffers")):
                return [agreement_cell(agreement_worst(r[which], k), name=k == "grads") if r else "–" for k in kinds]

            L.append(f"| {norm} | {ref['source']} | {label} | {ref['atol']:g} / {ref['rtol']:g} | "
                     + " | ".join(cells(r32, "vs_same") + cells(r64, "vs_same")) + " |")
            own = ("–" if not b32 or "ref_own" not in b32 else
                   f"{agreement_cell(agreement_worst(b32['ref_own'], 'y'))} / "
                   f"{agreement_cell(agreement_worst(b32['ref_own'], 'grads'))}")
            rows_big.append(f"| {norm} | {label} | " + " | ".join(cells(b32, "vs_f64")) + f" | {own} | "
                            + " | ".join(cells(b64, "vs_f64")) + " |")
    L += ["", f"### Large mean (mean {big['mean']:g}, std {big['std']:g}): against the reference run in float64", "",
          "float32 layers against the same reference run in float64 on the same (float32-rounded) inputs, as "
          "`test_exact_for_large_mean_inputs` does; next to them the float32 reference's own difference from "
          "its float64 run, the rounding a float32 layer of that kind shows here anyway. The float64 runs of "
          "timm's references keep their statistics in float64 (timm takes them through `x.float()`, float32 "
          "even for float64 inputs), so this table's float64 columns compare with the equations' float64 "
          "answer.", "",
          "| norm | back-end | fp32 output | fp32 grads | fp32 buffers | fp32 reference's own output / grads "
          "| fp64 output | fp64 grads | fp64 buffers |", "|---|---|---|---|---|---|---|---|---|", *rows_big, ""]
    L += agreement_findings(res)
    return L


def agreement_findings(res: list[dict]) -> list[str]:
    """What the agreement tables say, computed: the largest float32 differences, large-mean rows that round
    more than their reference does, float64 rows that stop short of float64 rounding (with known causes)."""
    def top(rows, which, kind):
        best = None
        for r in rows:
            w = agreement_worst(r[which], kind)
            if w and (best is None or w[0] > best[0][0]):
                best = (w, r)
        return best

    shown = {(n, be) for n in dict.fromkeys(r["norm"] for r in res) for be, _ in agreement_backends(res, n)}
    res = [r for r in res if (r["norm"], r["backend"]) in shown]
    small32 = [r for r in res if r["dtype"] == "float32" and r["input"] == "mean0.5"]
    out = []
    y, g = top(small32, "vs_same", "y"), top(small32, "vs_same", "grads")
    if y and g:
        out.append(f"* Largest float32 difference at mean 0.5: output {y[0][0]:.1e} ({y[1]['norm']}, "
                   f"{y[1]['backend']}), gradients {g[0][0]:.1e} ({g[1]['norm']}, {g[1]['backend']}, "
                   f"{g[0][2].removeprefix('grad.')}); the tests assert each element within atol + rtol·|reference|.")
    worse, better = [], []
    for r in res:
        if r["dtype"] != "float32" or r["input"] != "mean1e3" or "ref_own" not in r:
            continue
        for kind in ("y", "grads"):
            ours, own = agreement_worst(r["vs_f64"], kind), agreement_worst(r["ref_own"], kind)
            if not (ours and own):
                continue
            what = (f"{r['norm']} ({r['backend']}, {'output' if kind == 'y' else 'grads'}: {ours[1]:.0e} vs the "
                    f"reference's {own[1]:.0e})")
            if ours[1] > 2 * own[1] and ours[1] > 1e-6:
                worse.append(what)
            elif own[1] > 2 * ours[1] and own[1] > 1e-6:
                better.append(what)
    out.append("* Large mean, float32: " + ("every layer's relative difference from the float64 reference is "
                                             "within 2× its float32 reference's own (or below 1e-6)" if not worse
                                             else "relative difference above 2× the float32 reference's own and "
                                             "above 1e-6: " + "; ".join(worse))
               + (". Rounding less than the float32 reference by more than 2×: " + "; ".join(better) if better
                  else "") + ".")
    fp64 = [r for r in res if r["dtype"] == "float64"]
    loose = sorted({r["norm"] for r in fp64
                    if any((w := agreement_worst(r["vs_same"], k)) and w[1] > 1e-10 for k in AGREEMENT_KINDS)})

    def exact(norm: str) -> str:
        worst = max((w[1] for r in fp64 if r["norm"] == norm for k in AGREEMENT_KINDS
                     if (w := agreement_worst(r["vs_f64"], k))), default=0.0)
        return (f"against the reference with float64 kept throughout, {worst:.0e} at most" + (": normlab's layer is "
                "exact" if worst <= 1e-10 else ": the difference is normlab's"))

    if loose:
        out.append("* float64 differences above 1e-10 relative against the reference as the tests run it "
                   "(float32-sized, where float64 rounding is ~1e-16): "
                   + "; ".join(f"**{n}**: {FP64_CAUSES.get(n, 'cause not identified')}; {exact(n)}" for n in loose)
                   + ".")
    else:
        out.append("* float64: every difference is below 1e-10 relative.")
    return out + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--stale", action="store_true", help="list the tables older than the code they measure; "
                    "exit 1 if any")
    ap.add_argument("--only", default=None, help="comma-separated job names: " + ",".join(j[0] for j in JOBS))
    a = ap.parse_args()
    if a.stale:
        lines = stale(load("commands.json") or {})
        print("\n".join(lines))
        sys.exit(1 if any(": up to date" not in line for line in lines) else 0)
    RES.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        run(a.quick, a.only.split(",") if a.only else None)
    (ROOT / "BENCHMARKS.md").write_text(report())
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
