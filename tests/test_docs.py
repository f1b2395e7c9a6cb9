"""The documentation site builds strictly and offline: a broken link, a missing page or an unresolved API
reference fails the build, and the built pages fetch no fonts or scripts from the network."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    # any fetch at build time goes to a closed port and fails (under --strict a failed fetch fails the build)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "NO_PROXY": "", "no_proxy": ""}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    res = build(ROOT, out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def text(page: Path) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page.read_text())).split())


def test_site_has_the_guide_the_api_reference_and_the_architecture(site):
    for page in ("index.html", "install/index.html", "compatibility/index.html", "guide/train/index.html",
                 "guide/studies/index.html", "guide/report/index.html", "guide/norms/index.html",
                 "guide/transfer/index.html", "guide/cluster/index.html", "guide/gpu/index.html",
                 "guide/robustness/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "normlab" / "index.html").read_text()
    for name in ("normlab.train", "normlab.study", "normlab.load_study"):  # train/study: the functions, not packages
        assert f'id="{name}"' in api, name
    norms = (site / "api" / "norms" / "index.html").read_text()
    assert 'id="normlab.norms.BatchInstanceNorm2d"' in norms
    assert ":class:" not in norms and ":func:" not in norms  # Sphinx roles rendered as code
    for name in ("FilterResponseNorm2d", "EvoNormB0", "SwitchableNorm2d", "DynamicTanh2d", "spec.SpecNorm"):
        assert f'id="normlab.norms.{name}"' in norms, name  # the catalogue and its spec engine
    for page, name in (("data", "normlab.data.corruptions.corrupt"),
                       ("analysis", "normlab.analysis.robustness.run_robustness"),
                       ("analysis", "normlab.analysis.calibration.run_calibration")):
        assert f'id="{name}"' in (site / "api" / page / "index.html").read_text(), name
    # the architecture page is ARCHITECTURE.md itself, included at build time
    first_rule = next(line for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines() if line.startswith("- **"))
    words = " ".join(re.sub(r"[*`]", "", first_rule)[2:60].split()[:-1])
    assert words in text(site / "architecture" / "index.html")


def test_site_fetches_nothing_from_the_network(site):
    for page in site.rglob("*.html"):
        source = page.read_text()
        assert "fonts.googleapis" not in source and "fonts.gstatic" not in source, page
        assert not re.search(r"<script[^>]+src=\"(https?:)?//", source), page
        assert not re.search(r"<link[^>]+href=\"(https?:)?//[^\"]+\.(css|woff2?)", source), page


def test_a_broken_link_fails_the_strict_build_and_incoming_notes_stay_out(tmp_path):
    copy = tmp_path / "repo"
    for part in ("docs", "src", "scripts"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "incoming"))
    for part in ("mkdocs.yml", "ARCHITECTURE.md"):
        shutil.copy(ROOT / part, copy / part)
    # a helper's note waiting for the integrator: in no nav, with links of its own; the site must ignore it
    (copy / "docs" / "incoming").mkdir()
    (copy / "docs" / "incoming" / "w-note.md").write_text("# Note\n\nSee [a page to come](../guide/later.md).\n")
    page = copy / "docs" / "guide" / "train.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    res = build(copy, tmp_path / "site")
    assert res.returncode != 0
    assert "no-such-page.md" in res.stderr
    assert "incoming" not in res.stderr and "later.md" not in res.stderr
