"""Shared fixtures: an isolated data cache, a small generated image folder that a ResNet can learn, and the
single-node Slurm of the executor tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_TARBALL = SHARED_DATA / "cifar10-jpg.tar.gz"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(path: Path, what: str) -> None:
    """Skip outside CI when real data is absent; under CI=true a missing data set is a failure."""
    if not path.exists():
        if IN_CI:
            pytest.fail(f"{what} not found at {path}; CI must have it (see ../shared/data/README.md)")
        pytest.skip(f"{what} not found at {path}")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def make_image_folder(root: Path, classes=("red", "green", "blue"), per_split=None, size: int = 16,
                      seed: int = 0) -> Path:
    """Colour-coded classes with noise and a class-dependent stripe: learnable in a couple of epochs."""
    per_split = per_split or {"train": 24, "val": 8, "test": 8}
    rng = np.random.default_rng(seed)
    for split, count in per_split.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
                img[..., c % 3] = np.clip(img[..., c % 3].astype(int) + 150, 0, 255)
                img[(c * 4) % size: (c * 4) % size + 3, :, :] = 255
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """'slurm' when a real single-node Slurm runs (installed and started here by scripts/slurm-local.sh, as root),
    else 'local' (submitit's local executor: same jobs, same pickles, same checkpoint/requeue path, no sbatch).
    Session-scoped, so whichever test asks first gets it installed. Under CI=true a failed start is a failure,
    not a quiet fallback; NORMLAB_TEST_SLURM=0 asks for the local executor explicitly."""
    try:
        import submitit  # noqa: F401 - in the `test` extra
    except ImportError:
        if IN_CI:
            pytest.fail("submitit is not installed; CI installs normlab[test] which includes it")
        pytest.skip("submitit is not installed (pip install 'normlab[slurm]')")
    if os.environ.get("NORMLAB_TEST_SLURM", "1") == "0":
        yield "local"
        return
    state = Path(os.environ.get("NORMLAB_SLURM_STATE", "/tmp/normlab-slurm"))
    script = ["bash", str(REPO / "scripts" / "slurm-local.sh")]
    was_up = (state / "slurmctld.pid").is_file() and subprocess.run(
        ["pgrep", "-F", str(state / "slurmctld.pid")], capture_output=True).returncode == 0
    try:
        res = subprocess.run(script + ["start"], capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        res = subprocess.CompletedProcess(script, 1, "", "slurm-local.sh start timed out")
    if res.returncode != 0 or not shutil.which("sbatch"):
        why = (res.stderr.strip() or "sbatch is not on the PATH")[-300:]
        if IN_CI:
            pytest.fail(f"CI needs the single-node Slurm of scripts/slurm-local.sh (run as root): {why}")
        print(f"no real Slurm here, using submitit's local executor: {why}")
        yield "local"
        return
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield "slurm"
    if not was_up:  # leave the machine as we found it
        subprocess.run(script + ["stop"], capture_output=True)


def captured_figure(monkeypatch, draw):
    """The matplotlib figure ``draw(plots)`` saves, kept instead of written (``plots.save_figure`` patched)."""
    from normlab import plots

    got = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=110: got.append(fig) or path)
    draw(plots)
    return got[0]
