"""`normlab study` end to end on a miniature study, re-runs, interruption, and the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from normlab.errors import NormlabError
from normlab.report.build import SECTIONS
from normlab.report.collect import fmt, mean_std, rank
from normlab.report.render import Doc, to_html, to_markdown
from normlab.study import run_study
from normlab.study.plan import make_study_config, plan_runs

from conftest import make_image_folder

EVIL = "<img src=x onerror=alert(1)>"  # a class folder name that is live HTML if not escaped


def write_spec(path: Path, data_root: Path, **study) -> Path:
    spec = {
        "study": {"name": "mini", "batch_sizes": [4, 16], "batch_max_epochs": 1, "batch_patience": 1,
                  "gradcam_per_class": 2, **study},
        "train": {"dataset": "folder", "data_root": str(data_root), "image_size": 16, "n": 1, "epochs": 1,
                  "batch_size": 16, "lr": 0.05, "eval_batch_size": 64, "probe_size": 16, "progress": "plain"},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    os.environ["NORMLAB_CACHE"] = str(root / "cache")  # module scope: the autouse fixture is per test
    data = make_image_folder(root / "data", classes=("cat", "dog", EVIL),
                             per_split={"train": 16, "val": 6, "test": 6})
    spec = write_spec(root / "mini.yaml", data,
                      compare={"optimizers": [{"optimizer": "sgd"}, {"optimizer": "adam", "lr": 0.001}]})
    lines: list[str] = []
    import random

    import torch

    import normlab

    threads = torch.get_num_threads()
    torch.manual_seed(11)
    random.seed(11)
    expected = (torch.get_rng_state(), random.getstate())
    folder = normlab.study(str(spec), root / "study", log=lines.append)  # the Python API runs the study
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), expected[0])
    assert random.getstate() == expected[1]  # the analyses (model builds, Grad-CAM) drew from these
    return root / "study", folder / "report.html", spec, lines


def test_miniature_study_writes_every_section_and_figure(mini):
    study_dir, report, _, lines = mini
    assert report == study_dir / "report.html"
    plan = json.loads((study_dir / "plan.json").read_text())
    # 7 norms + bn/gn x 2 batch sizes (+ early stopping) + torch_bn with augmentation; torch_bn without
    # augmentation is shared by the norm and augmentation comparisons; {optimizer: sgd} is the bn run
    assert len(plan) == 7 + 4 + 1 + 1
    bn = next(p for p in plan if p["name"] == "bn-b16-none-s0")
    assert bn["groups"] == ["norms", "compare:optimizers"] and bn["cells"]["compare:optimizers"] == "optimizer=sgd"
    for p in plan:
        assert (study_dir / "runs" / p["name"] / "summary.json").is_file(), p["name"]
    md = (study_dir / "report.md").read_text()
    for section in SECTIONS + ("Comparison: optimizers",):
        assert f"## {section}" in md, section
    assert "optimizer=adam, lr=0.001 | 1 |" in md and "figures/compare_0.png" in md
    figures = ["sanity_bn_vs_torch_bn.png", "loss_curves.png", "error_accuracy_f1_curves.png", "batch_size_curves.png",
               "augmentation_curves.png", "quantiles.png", "time_per_epoch.png"]
    for fig in figures:
        assert (study_dir / "figures" / fig).stat().st_size > 3000, fig
        assert f"figures/{fig}" in md
    for norm, glyph in (("torch_bn", "■"), ("bn", "●"), ("in", "▲"), ("bin", "◆"), ("ln", "▼"), ("gn", "✚"), ("nn", "✖")):
        assert f"| {glyph} {norm} | 1 |" in md, norm  # a table row per variant, with its figure marker
    assert "figures/confusion_matrices.png" in md and md.count("misclassified_val.webp)") == 7  # colour images: WebP
    assert "Grad-CAM: cat" in md and "Ranking by mean test accuracy" in md
    assert "Grad-CAM across norms: " in md and "gradcam_compare/" in md
    # findings first: computed sentences before any table, the settings folded into the appendix
    findings = md.split("## Findings", 1)[1].split("## ", 1)[0]
    assert "Best variant by mean test accuracy" in findings and "within noise" in findings
    assert "McNemar" in findings  # one seed, per-image predictions saved by the analyses: a paired test
    assert "Sanity check: normlab's BN" in findings and "Batch size 4 → 16" in findings
    assert "Augmentation (torch_bn)" in findings and "runs finished" in findings
    assert md.index("## Findings") < md.index("| setting | value |")
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= len(figures) + 1
    assert html.count("data:image/webp;base64,") >= 7 + 2  # galleries of colour images as WebP
    assert "<details><summary>" in html and 'class="findings"' in html
    assert 'src="figures/' not in html  # self-contained
    # results as data: one row per planned run
    import normlab

    df = normlab.load_study(study_dir)
    assert len(df) == len(plan) and set(df["status"]) <= {"finished", "stopped_early"}
    assert {"norm", "batch_size", "augment", "seed", "test_acc", "val_macro_f1", "steady_seconds_per_epoch"} <= set(df.columns)
    assert (study_dir / "results.csv").read_text().count("\n") == len(plan) + 1


def test_report_escapes_names_from_the_data(mini):
    study_dir, report, _, _ = mini
    html = report.read_text()
    assert EVIL not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    md = (study_dir / "report.md").read_text()
    assert EVIL not in md


def test_rerun_skips_finished_runs(mini):
    study_dir, _, spec, _ = mini
    stamps = {p: p.stat().st_mtime_ns for p in (study_dir / "runs").glob("*/summary.json")}
    lines: list[str] = []
    run_study(str(spec), study_dir, log=lines.append)
    assert any("13 already finished, 0 to run" in line for line in lines), lines
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_study_folder_with_other_settings_is_refused(mini, tmp_path):
    study_dir, _, spec, _ = mini
    data = yaml.safe_load(spec.read_text())
    data["train"]["lr"] = 0.2
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    with pytest.raises(NormlabError, match="other settings.*train.lr"):
        run_study(str(other), study_dir, log=lambda _: None)


def test_killed_study_does_not_redo_finished_runs(tmp_path):
    data = make_image_folder(tmp_path / "data", per_split={"train": 16, "val": 6, "test": 6})
    spec = write_spec(tmp_path / "s.yaml", data, norms=["bn", "gn", "ln"], batch_norms=[], augment_modes=[])
    study_dir = tmp_path / "study"
    cmd = [sys.executable, "-m", "normlab", "study", "--preset", str(spec), "--out", str(study_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = study_dir / "runs" / "bn-b16-none-s0" / "summary.json"
    deadline = time.time() + 240
    while not first.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert first.is_file(), "the first run never finished"
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its current training child
    proc.wait()
    stamp = first.stat().st_mtime_ns
    before = first.read_bytes()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "1 already finished, 2 to run" in res.stdout + res.stderr
    assert first.stat().st_mtime_ns == stamp and first.read_bytes() == before
    for name in ("gn-b16-none-s0", "ln-b16-none-s0"):
        assert (study_dir / "runs" / name / "summary.json").is_file()
    assert (study_dir / "report.html").is_file()


def test_plan_merges_identical_cells_and_names_runs():
    study = make_study_config({"seeds": 2})
    base = {"dataset": "fashion-mnist", "epochs": 3, "batch_size": 128}
    runs = plan_runs(study, base)
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 2 * (7 + 4 + 1)
    shared = next(r for r in runs if r.name == "torch_bn-b128-none-s0")
    assert sorted(shared.groups) == ["augment", "norms"]
    assert {r.config["seed"] for r in runs} == {0, 1}


def test_study_settings_are_validated():
    with pytest.raises(NormlabError, match="did you mean 'seeds'"):
        make_study_config({"seedz": 2})
    with pytest.raises(NormlabError, match="unknown norm 'bm'"):
        make_study_config({"norms": ["bn", "bm"]})
    with pytest.raises(NormlabError, match="unknown study preset 'quik'"):
        run_study("quik", log=lambda _: None)


def test_noise_verdicts():
    from normlab.report.stats import compare, mean_interval, paired_gap, proportion_gap

    # one seed on 2,000 images: a 0.0005 gap (one image) is within noise; 0.10 is beyond test-set noise only
    g = proportion_gap(0.8155, 0.8150, 2000)
    assert not g.separated and g.verdict().startswith("within noise (one seed")
    g = proportion_gap(0.85, 0.75, 2000)
    assert g.separated and "one seed" in g.verdict() and "beyond test-set noise" in g.verdict()
    assert not proportion_gap(1.0, 1.0, 50).separated  # two perfect scores: no zero-width "separation"
    # paired over seeds: a steady +0.01 is separated, an alternating one is not
    assert paired_gap({0: 0.81, 1: 0.82, 2: 0.83}, {0: 0.80, 1: 0.81, 2: 0.82}).separated
    assert not paired_gap({0: 0.82, 1: 0.80, 2: 0.83}, {0: 0.80, 1: 0.82, 2: 0.81}).separated
    assert paired_gap({0: 0.8}, {0: 0.7}) is None  # one shared seed: no pairing
    assert compare({0: 0.8}, {0: 0.7}, 1000).basis == "test-set sampling only"
    assert compare({0: 0.8, 1: 0.9}, {0: 0.7, 1: 0.8}, 1000).basis == "paired over seeds"
    # one seed each but per-image predictions: McNemar on the images only one model gets right
    from normlab.report.stats import mcnemar_gap, mcnemar_p

    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    g = mcnemar_gap([0] * 100, [0] * 100, [0] * 90 + [1] * 10)
    assert g.separated and g.diff == pytest.approx(0.1) and "McNemar on 100 shared images" in g.verdict()
    g = mcnemar_gap([0] * 100, [0] * 98 + [1, 0], [0] * 99 + [1])  # one image each way: no evidence
    assert not g.separated and g.diff == 0 and g.verdict().startswith("within noise")
    mean, half = mean_interval([1.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(12.706 * 2 ** 0.5 / 2 ** 0.5)


def test_findings_name_failures_and_batch_effects(tmp_path):
    from normlab.report.collect import RunRecord
    from normlab.report.findings import batch_size, failures, summarise

    def rec(name, norm, bs, acc, status="finished"):
        groups = ("batch",) if bs == 8 else ("norms", "batch")
        summary = None if status in ("failed", "missing") else {
            "status": status, "test": {"acc": acc, "confusion": [[1000, 0], [0, 1000]]},
            "train": {"acc": acc}, "diverged": {"epoch": 2, "step": 7} if status == "diverged" else None}
        return RunRecord(name, tmp_path, {"norm": norm, "batch_size": bs, "seed": 0}, list(groups), norm, status,
                         summary)

    runs = [rec("bn8", "bn", 8, 0.60), rec("bn128", "bn", 128, 0.80), rec("gn8", "gn", 8, 0.78),
            rec("gn128", "gn", 128, 0.79), rec("ln", "ln", 128, 0.1, "diverged"), rec("in", "in", 128, 0, "failed")]
    text = batch_size(runs, "test")
    assert "BN 0.6000 → 0.8000 (+0.2000" in text and "BN moves more" in text and "within noise" in text
    f = failures(runs)
    assert f.startswith("2 of 6 runs did not finish") and "ln diverged (epoch 2, step 7)" in f and "in failed" in f
    items = summarise(runs)
    assert items[0].startswith("Best variant by mean test accuracy: bn 0.8000")


def test_each_renderer_escapes_for_its_own_format(tmp_path):
    """report.md reads as written (p<0.001, |Δ|: no HTML entities, no stray backslashes) and still renders no
    user-given HTML, link or broken table (checked with a CommonMark parser); report.html escapes as HTML."""
    from markdown_it import MarkdownIt

    (tmp_path / "figures").mkdir()
    fig = tmp_path / "figures" / "a (1).png"
    fig.write_bytes(b"\x89PNG\r\n\x1a\n")
    doc = Doc("Study <b>x</b>")
    doc.h("Norms <u>compared</u>")
    doc.p("bn vs gn: 0.0123 (p<0.001), |Δ| 0.0500 & more")
    doc.p("<script>alert(1)</script> \\<img src=x onerror=alert(1)> &amp; [click](http://evil.example) <!-- c -->")
    doc.findings(["gn moves more (|Δ| 0.0500 vs 0.0100), p<0.001", "<http://evil.example> & 3 < 4"])
    doc.table(["class | name", "acc"], [["cat|dog <i>x</i>", "0.5"], ["two\nlines", "1 < 2"]])
    doc.img(fig, "a [figure](http://evil.example)")
    md = to_markdown(doc, tmp_path)
    assert "(p<0.001), |Δ| 0.0500 & more" in md and "- gn moves more (|Δ| 0.0500 vs 0.0100), p<0.001" in md
    assert "p&lt;" not in md and "&amp; more" not in md and "\\|Δ" not in md and "3 < 4" in md
    rendered = MarkdownIt("commonmark").enable("table").render(md)
    for raw in ("<script", "<img src=x", "<b>", "<u>", "<i>", "<!--", 'href="http://evil', "<http"):
        assert raw not in rendered, (raw, rendered)
    assert "<h1>Study &lt;b&gt;x&lt;/b&gt;</h1>" in rendered and "(p&lt;0.001), |Δ| 0.0500 &amp; more" in rendered
    assert "\\&lt;img" in rendered and "&amp;amp; [click](http://evil.example)" in rendered  # the user's own text
    assert [row.count("<td>") for row in rendered.split("<tr>")[2:]] == [2, 2]  # the pipes stayed in their cells
    assert "<td>cat|dog &lt;i&gt;x&lt;/i&gt;</td>" in rendered and "<td>two lines</td>" in rendered
    assert '<img src="figures/a%20%281%29.png" alt="a [figure](http://evil.example)"' in rendered
    page = to_html(doc)
    assert "(p&lt;0.001), |Δ| 0.0500 &amp; more" in page and "&lt;script&gt;" in page and "<script" not in page
    assert "&amp;amp; [click]" in page and "<td>cat|dog &lt;i&gt;x&lt;/i&gt;</td>" in page


def test_report_helpers_are_pure_and_honest():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert fmt(0.5, 0.1, 2) == "0.5000 ± 0.1000" and fmt(0.5, 0.0, 1) == "0.5000"
    assert [k for _, k, _ in rank({"a": 0.2, "b": 0.9, "c": float("nan")})] == ["b", "a"]
    doc = Doc("t <x>")
    doc.table(["h"], [["<script>alert(1)</script> | pipe"]])
    assert "<script>" not in to_html(doc) and "<script>" not in to_markdown(doc, Path("."))


def test_an_explicit_epochs_flag_caps_the_batch_cells_too(tmp_path):
    """`normlab study --preset quick --epochs 1` trained the batch-size cells for the preset's 5 epochs (12 runs
    instead of 10, no word about it): an explicit epochs/patience wins everywhere, and the plan says the cap."""
    import json

    said = []
    run_study("quick", tmp_path / "s", train_overrides={"epochs": 1}, plan_only=True, log=said.append)
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert {r["config"]["epochs"] for r in plan} == {1}
    assert len(plan) == 10  # the batch-128 cells are the norm comparison's runs again
    assert any("batch-size cells (bn, gn x batch 8, 128): up to 1 epochs" in line for line in said)
    said.clear()  # the preset's own train: epochs does not override its batch cells' cap
    run_study("quick", tmp_path / "t", plan_only=True, log=said.append)
    assert any("up to 5 epochs (batch_max_epochs)" in line for line in said)
    # an explicit cap of its own wins over --epochs for the batch cells
    run_study("quick", tmp_path / "u", train_overrides={"epochs": 1}, study_overrides={"batch_max_epochs": 3},
              plan_only=True, log=lambda _: None)
    plan = json.loads((tmp_path / "u" / "plan.json").read_text())
    assert {r["config"]["epochs"] for r in plan} == {1, 3}


def test_study_norm_keywords_expand_to_every_norm_and_to_those_with_batch_statistics():
    from normlab.config import needs_batch_statistics
    from normlab.registry import NORM_NAMES
    from normlab.study.plan import make_study_config

    cfg = make_study_config({"norms": ["gn", "all"], "batch_norms": "batch-statistics,bn"})
    assert cfg.norms == ["gn"] + [n for n in NORM_NAMES if n != "gn"]  # named first, then the rest, no repeats
    assert cfg.batch_norms == [n for n in NORM_NAMES if needs_batch_statistics(n)]
    assert {"bn", "torch_bn", "bin", "mobn"} <= set(cfg.batch_norms) and not {"gn", "in", "dyt"} & set(cfg.batch_norms)
    with pytest.raises(NormlabError, match="unknown norm 'alll'"):
        make_study_config({"norms": ["alll"]})
    from normlab import cli

    assert cli._comma_list("NORM_NAMES")("all,batch-statistics") == ["all", "batch-statistics"]  # study --norms all
