"""Before/after: a ResNet-20 training step with each norm, this working tree's normlab against an older commit's,
interleaved in one process.

A refactor of the norms must not slow them down, and two processes cannot be compared to a few percent (where a
model's tensors land in memory moves a step by several percent, and the machine drifts between processes). So
the older commit's ``src/normlab`` is exported (``git archive``) into a temporary folder as a package named
``normlab_old`` (every ``normlab.`` import and import path in it renamed), and both versions are imported side
by side. The script checks that every module of the old side's model comes from ``normlab_old`` and every module
of the new side's from ``normlab``, so neither side can silently run the other's code. The timing is
``bench_norms.run``'s: per norm and memory format, fresh pairs of models built in alternating order, steps
timed A B, B A, ...; reported: the median of the per-round ratios new / old with its min-max over rounds.

    python bench/bench_versions.py --old 348b542     # bn, in, ln, gn, bin (+relu rows); sn, rms (+relu: fused blocks)
    python bench/bench_versions.py --old 348b542 --norms bn,gn --quick
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

import bench_norms
from _common import machine, write_json
from normlab.train.runtime import tune_malloc

ROOT = Path(__file__).resolve().parent.parent
_IMPORTS = re.compile(r"\bnormlab(?=[.\s:\"'])")  # normlab.x, "from normlab import", "normlab.norms.batch:Cls"


def export_old(rev: str, dest: Path) -> str:
    """``src/normlab`` at ``rev`` as the package ``normlab_old`` under ``dest``; returns the commit's hash."""
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    tar = dest / "old.tar"
    with tar.open("wb") as f:
        subprocess.run(["git", "archive", sha, "src/normlab"], cwd=ROOT, check=True, stdout=f)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    pkg = dest / "normlab_old"
    (dest / "src" / "normlab").rename(pkg)
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        path.write_text(_IMPORTS.sub("normlab_old", text))
    return sha


def load_old(rev: str, dest: Path):
    """The old commit's ResNet class (its package imported as ``normlab_old``) and the commit's hash."""
    sha = export_old(rev, dest)
    sys.path.insert(0, str(dest))
    resnet = importlib.import_module("normlab_old.models.resnet")
    return resnet.ResNet, sha


def check_sides(model, package: str) -> None:
    """Every module of ``model`` that is normlab's comes from ``package`` (normlab or normlab_old)."""
    for m in model.modules():
        mod = type(m).__module__
        if mod.split(".")[0] in ("normlab", "normlab_old") and mod.split(".")[0] != package:
            raise SystemExit(f"bench_versions: a {package} model holds {type(m).__name__} from {mod}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the commit to compare with (any git revision)")
    ap.add_argument("--norms", default="bn,in,ln,gn,bin,bn+relu,in+relu,ln+relu,gn+relu,sn+relu,rms+relu")
    ap.add_argument("--formats", default="nchw,channels_last")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="4 rounds of 4 steps")
    ap.add_argument("--out", default="versions.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 4, 4
    torch.set_num_threads(args.threads)
    tune_malloc()
    with tempfile.TemporaryDirectory(prefix="normlab-old-") as tmp:
        OldResNet, sha = load_old(args.old, Path(tmp))
        new_build = bench_norms.build

        def build_side(norm: str, side: str, fmt_name: str):
            base, fused = norm.removesuffix("+relu"), norm.endswith("+relu")
            if side == "normlab":
                model = new_build(base, fmt_name, fuse=fused)
                check_sides(model, "normlab")
                return model
            torch.manual_seed(0)
            model = OldResNet(3, 10, norm=base, fuse=fused)
            if fmt_name == "channels_last":
                model = model.to(memory_format=torch.channels_last)
            check_sides(model, "normlab_old")
            return model.train()

        print(f"new = this working tree, old = {args.old} ({sha[:10]}); ratio = new / old", flush=True)
        rows = bench_norms.run(args.norms.split(","), args.formats.split(","), args.rounds, args.steps,
                               args.warmup, args.batch, False, build_side=build_side)
    for row in rows:  # bench_norms calls the sides normlab / native: here they are new / old
        row["new_s"], row["old_s"] = row.pop("normlab_s"), row.pop("native_s")
        row["new_saved_MB"], row["old_saved_MB"] = row.pop("normlab_saved_MB"), row.pop("native_saved_MB")
    write_json(args.out, {"machine": machine(), "old": sha, "args": vars(args), "results": rows})


if __name__ == "__main__":
    main()
