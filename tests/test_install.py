"""normlab installs like a library: the sdist and the wheel build from a clean copy of the checkout, the wheel
(built from the sdist, so the sdist is complete) carries the presets and the C++ kernel source, installs into a
fresh virtual environment next to an already installed PyTorch, and runs a preset from another directory.

No download: the build calls setuptools' PEP 517 hooks in this interpreter (no isolated build environment),
and the fresh venv sees this interpreter's packages (torch included) through a .pth file pointing at a folder
of links to them — without the normlab under test — so ``pip install --no-index`` must find every dependency
already installed. Python 3.12 and 3.13 (pyenv, where present) have no local torch wheels: there the wheel is
installed without dependencies and what needs no torch is checked (import, --version, presets, a clear error).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import make_image_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# what the normlab under test must not see of this interpreter's packages
HIDDEN = ("normlab", "__editable__", "pip", "__pycache__")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**env, **kw.pop("env", {})},
                         timeout=kw.pop("timeout", 600), **kw)
    return res


def _checkout_copy(dest: Path) -> Path:
    """Tracked and unignored files only (what a fresh clone has), without build leftovers."""
    try:
        listed = _run(["git", "-C", REPO, "ls-files", "-co", "--exclude-standard"])
    except FileNotFoundError:  # no git here
        listed = None
    if listed is None or listed.returncode != 0:  # not a git checkout (e.g. an unpacked sdist): copy the sources
        shutil.copytree(REPO, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "studies", "runs", ".pytest_cache"))
        return dest
    for rel in listed.stdout.splitlines():
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def _pep517(where: Path, hook: str, out: Path) -> Path:
    res = _run([sys.executable, "-c", f"from setuptools import build_meta as b; print(b.{hook}({str(out)!r}))"],
               cwd=where)
    assert res.returncode == 0, res.stderr[-2000:]
    return out / res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dist")
    src = _checkout_copy(base / "checkout")
    sdist = _pep517(src, "build_sdist", base / "dist")
    with tarfile.open(sdist) as tar:
        tar.extractall(base / "unpacked", filter="data")
    wheel = _pep517(next((base / "unpacked").iterdir()), "build_wheel", base / "dist")
    return {"sdist": sdist, "wheel": wheel}


def test_sdist_and_wheel_carry_presets_kernels_and_honest_bounds(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = tar.getnames()
    assert any(n.endswith("src/normlab/presets/quick.yaml") for n in names)
    assert any(n.endswith("src/normlab/norms/_kernels.cpp") for n in names)
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = whl.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {"normlab/presets/quick.yaml", "normlab/presets/cifar10-paper.yaml", "normlab/norms/_kernels.cpp",
            "normlab/py.typed"} <= names
    assert "Requires-Python: >=3.11\n" in meta
    assert "Requires-Dist: torch>=2.4\n" in meta and "Requires-Dist: torchvision>=0.19\n" in meta
    pins = [line for line in meta.splitlines() if line.startswith("Requires-Dist") and "==" in line.split(";")[0]]
    assert not pins, pins  # exact pins would replace or refuse the PyTorch a machine already has
    assert "normlab = normlab.cli:entry" in entry


def _venv(python: str, where: Path) -> Path:
    res = _run([python, "-m", "venv", where])
    assert res.returncode == 0, res.stderr
    return where / "bin" / "python"


def _share_packages(vpy: Path, view: Path) -> None:
    """Make this interpreter's installed packages (torch, ...) visible to the venv ``vpy``, normlab excepted."""
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(HIDDEN) and entry.suffix != ".pth":
            (view / entry.name).symlink_to(entry)
    purelib = _run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "shared-packages.pth").write_text(f"{view}\n")
    # the venv's bundled setuptools is older than torch asks for; this interpreter's own one is in the view
    _run([vpy, "-m", "pip", "uninstall", "-y", "-q", "setuptools"])


def test_wheel_installs_next_to_installed_torch_and_runs_a_preset_elsewhere(dists, tmp_path):
    vpy = _venv(sys.executable, tmp_path / "venv")
    _share_packages(vpy, tmp_path / "shared")
    res = _run([vpy, "-m", "pip", "install", "--no-index", "--no-cache-dir", dists["wheel"]])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]  # every dependency was already there
    work = tmp_path / "elsewhere"
    data = make_image_folder(work / "data", per_split={"train": 16, "val": 6, "test": 6}, size=12)
    where = _run([vpy, "-c", "import normlab, torch; print(normlab.__file__); print(torch.__version__)"], cwd=work)
    assert str(tmp_path / "venv") in where.stdout and str(REPO) not in where.stdout, where.stdout + where.stderr
    normlab = tmp_path / "venv" / "bin" / "normlab"
    env = {"NORMLAB_CACHE": str(tmp_path / "cache")}  # the C++ kernels build here from the wheel's source
    res = _run([normlab, "study", "--preset", "quick", "--out", "study", "--norms", "bn", "--epochs", "1",
                "--dataset", "folder", "--data-root", data, "--image-size", "12", "--train-subset", "30",
                "--eval-subset", "12", "--threads", "1", "--eval-batch-size", "64", "--probe-size", "8",
                "--progress", "off"], cwd=work, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (work / "study" / "report.html").is_file()
    assert list((tmp_path / "cache" / "kernels").iterdir())


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_wheel_installs_on_newer_python_without_torch(version, dists, tmp_path):
    candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")))
    candidates += [p for p in [shutil.which(f"python{version}")] if p]  # a pyenv shim may exist and not run
    python = next((p for p in candidates if _run([p, "-c", "pass"]).returncode == 0), None)
    if python is None:
        pytest.skip(f"no working Python {version} here")
    vpy = _venv(python, tmp_path / "venv")
    res = _run([vpy, "-m", "pip", "install", "-q", "--no-index", "--no-deps", dists["wheel"]])
    assert res.returncode == 0, res.stderr  # requires-python admits it
    normlab = tmp_path / "venv" / "bin" / "normlab"
    res = _run([normlab, "--version"], cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip().startswith("normlab "), res.stderr
    res = _run([vpy, "-c", "import importlib.resources as r, normlab; "
                "print(sorted(p.name for p in (r.files('normlab') / 'presets').iterdir()))"], cwd=tmp_path)
    assert "quick.yaml" in res.stdout, res.stderr
    res = _run([normlab, "study", "--help"], cwd=tmp_path)  # no dependencies installed: one line, no traceback
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "normlab needs" in res.stderr, res.stderr
