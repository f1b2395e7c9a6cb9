"""report.html in a real headless browser (Debian's chromium, installed by scripts/get-chromium.sh): every
image decodes and nothing raises. The study is written from saved-looking run folders, so no training runs."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normlab import runfolder
from normlab.report.build import build_report
from normlab import studyfolder as sf

from conftest import IN_CI

CLASSES = ["T-shirt/top", "Trouser", "<b>Bag</b>"]
NORMS = ("torch_bn", "bn", "in", "bin", "ln", "gn", "nn")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]

# Injected into a copy of the report: records every error (script errors and failed resources, via the
# capturing listener) from the first byte on, and after `load` writes what it found into the DOM.
CHECK_HEAD = """<script>window.__errors=[];window.addEventListener('error',function(e){
window.__errors.push(e.message||('failed to load '+((e.target&&e.target.tagName)||'?')));},true);</script>"""
CHECK_TAIL = """<script>window.addEventListener('load',function(){var imgs=Array.from(document.images);
var bad=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0&&i.naturalHeight>0);}).map(function(i){return i.alt;});
var pre=document.createElement('pre');pre.id='__check';pre.textContent=JSON.stringify({images:imgs.length,
broken:bad,errors:window.__errors});document.body.appendChild(pre);});</script>"""


def chromium() -> str | None:
    for name in (os.environ.get("NORMLAB_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium()
    if exe is None:
        if IN_CI:
            pytest.fail("chromium not found; CI must have it (scripts/get-chromium.sh, run by `make data`)")
        pytest.skip("chromium not found (install it with scripts/get-chromium.sh)")
    return exe


def fake_study(study_dir: Path) -> Path:
    """A study folder whose run folders hold what training and the analyses write (figures included)."""
    rng = np.random.default_rng(0)
    plan = [{"name": f"{n}-s0", "config": {"norm": n, "seed": 0, "batch_size": 128, "augment": "none"},
             "groups": ["norms"], "cell": n, "cells": {}} for n in NORMS]
    sf.write_plan(study_dir, plan)
    sf.write_record(study_dir, {"study": {"name": "browser", "seeds": 1, "batch_patience": 2, "batch_max_epochs": 3},
                                "train": {"dataset": "fashion-mnist", "n": 1, "shortcut": "A", "epochs": 3}})
    for i, p in enumerate(plan):
        run = sf.run_dir(study_dir, p["name"])
        rows = [{"epoch": e, "lr": 0.1, **{f"{s}_{m}": float(rng.uniform(0.2, 0.9)) for s in ("train", "val")
                                            for m in ("loss", "error", "acc", "micro_f1", "macro_f1")},
                 "epoch_seconds": 10.0 if e == 1 else 2.0 + i / 10, "images_per_s": 1000.0, "eval_seconds": 0.3}
                for e in (1, 2, 3)]
        runfolder.write_metrics(run, rows)
        runfolder.write_quantiles(run, (0.01, 0.2, 0.8, 0.99),
                                  [{"epoch": e, "last_norm": sorted(rng.normal(size=4).tolist())} for e in range(4)])
        cm = (np.eye(3) * 50 + rng.integers(0, 10, (3, 3))).astype(int).tolist()
        split = {"loss": 0.5, "acc": 0.8 - i / 100, "micro_f1": 0.8 - i / 100, "macro_f1": 0.79 - i / 100,
                 "confusion": cm}
        runfolder.write_summary(run, {"status": "finished", "diverged": None, "run": p["name"], "epochs_run": 3,
                                      "best_epoch": 3, "classes": CLASSES, "params": 75_000, "train": split,
                                      "val": split, "test": split, "wall_seconds": 20.0, "device": "cpu",
                                      "threads": 2, "data": {"counts": {"train": 500, "val": 150, "test": 150}}})
        for name in ("confusion_val.png", "confusion_test.png"):
            Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(run / name)
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(run / runfolder.MISCLASSIFIED[1])
    gc = sf.run_dir(study_dir, "bn-s0") / runfolder.GRADCAM_DIR
    gc.mkdir()
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(gc / "000_T-shirt_top.jpg", quality=85)
    (gc / runfolder.GRADCAM_INDEX).write_text(json.dumps({"per_class": 2, "classes": {
        "T-shirt/top": {"file": "000_T-shirt_top.jpg"}}}))
    cmp = study_dir / sf.GRADCAM_COMPARE_DIR
    cmp.mkdir()
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(cmp / "001_Trouser.jpg", quality=88)
    (cmp / runfolder.GRADCAM_INDEX).write_text(json.dumps({"runs": {"bn": "runs/bn-s0", "gn": "runs/gn-s0"},
                                                            "classes": {"Trouser": {"file": "001_Trouser.jpg"}}}))
    sf.update_state(study_dir, **{sf.GRADCAM_RUN: "bn-s0", sf.GRADCAM_COMPARE: {"runs": {}, "settings": []}})
    return build_report(study_dir)[1]


def render(exe: str, page: Path, tmp: Path) -> tuple[dict, str]:
    checked = tmp / "checked.html"
    html = page.read_text()
    checked.write_text(html.replace("<head>", "<head>" + CHECK_HEAD, 1).replace("</body>", CHECK_TAIL + "</body>", 1))
    res = subprocess.run([exe, *FLAGS, f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=15000",
                          "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="__check">(.*?)</pre>', res.stdout, re.S)
    assert m, f"the check page did not run (exit {res.returncode}): {res.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&")), res.stderr


def test_report_renders_in_a_browser_with_every_image(browser, tmp_path):
    page = fake_study(tmp_path / "study")
    expected = page.read_text().count('<img src="data:')
    assert expected >= 7 + 2 + 6  # misclassified per variant, two galleries, the figures
    result, stderr = render(browser, page, tmp_path)
    assert result["images"] == expected
    assert result["broken"] == [], f"images that did not decode: {result['broken']}"
    assert result["errors"] == [], f"errors in the page: {result['errors']}"
    assert "Uncaught" not in stderr


def test_the_check_page_catches_a_broken_image(browser, tmp_path):
    # the check above could pass vacuously: prove it sees an undecodable image
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head></head><body><img src="data:image/png;base64,AAAA" alt="broken">'
                    f'<img src="data:image/png;base64,{_tiny_png()}" alt="fine"></body></html>')
    result, _ = render(browser, page, tmp_path)
    assert result["images"] == 2 and result["broken"] == ["broken"] and result["errors"]


def _tiny_png() -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (random.randint(0, 255), 0, 0)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
