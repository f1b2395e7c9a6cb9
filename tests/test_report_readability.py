"""Readability of a report with many variants (the catalogue: 17 norms, 24 runs): legends that do not cover the
curves, heat maps that stay narrow, captions and findings that name what the figures hold."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import captured_figure
from normlab.report import build, findings, robustness, stats

NORMS = ["torch_bn", "bn", "in", "bin", "ln", "gn", "nn", "frn", "evonorm_b0", "evonorm_s0", "sn", "brn", "gbn",
         "rms", "ln2d", "rms2d", "dyt"]


def test_many_curves_share_one_legend_below_the_panels_and_few_keep_theirs(monkeypatch, tmp_path):
    series = {n: ([1, 2, 3], [0.1 * i, 0.2, 0.3]) for i, n in enumerate(NORMS)}
    partial = {n: series[n] for n in NORMS[:5]} | {"zz · batch 8": ([1, 2], [0.5, 0.6])}
    fig = captured_figure(monkeypatch, lambda p: p.plot_panels([("a", "y", series), ("b", "y", partial)],
                                                                tmp_path / "f.png"))
    assert all(ax.get_legend() is None for ax in fig.axes)  # none inside a panel, where it hid curves
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == NORMS + ["zz · batch 8"]  # every label once, in order of appearance
    fig.canvas.draw()  # the constrained layout places the legend when the figure is drawn
    renderer = fig.canvas.get_renderer()
    top = legend.get_window_extent(renderer).y1
    assert all(top <= ax.get_tightbbox(renderer).y0 + 1 for ax in fig.axes)  # below the panels and their labels
    few = captured_figure(monkeypatch, lambda p: p.plot_panels([("a", "y", {n: series[n] for n in NORMS[:3]})],
                                                                tmp_path / "g.png"))
    assert not few.legends and [t.get_text() for t in few.axes[0].get_legend().get_texts()] == NORMS[:3]


def test_a_heatmap_runs_its_longer_list_down_the_side(monkeypatch, tmp_path):
    rows, cols = ["gaussian_noise", "contrast"], NORMS[:6]
    values = [[i + j / 10 for j in range(len(cols))] for i in range(len(rows))]
    fig = captured_figure(monkeypatch, lambda p: p.plot_heatmap(values, rows, cols, tmp_path / "h.png"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == cols  # 6 variants down the side, 2 corruptions across
    assert [t.get_text() for t in ax.get_xticklabels()] == rows
    assert fig.get_size_inches()[0] < fig.get_size_inches()[1] + 2  # no longer a strip
    cells = {t.get_text() for t in ax.texts}
    assert "1.50" in cells and "0.00" in cells  # the values moved with their labels: contrast × in = 1 + 5/10


def _run(label, acc, n=1000, k=10, norm=None, ece=None, folder=None):
    right = round(acc * n)
    cm = [[0] * k for _ in range(k)]
    for i in range(k):  # `right` correct spread over the diagonal, the rest in the next column
        cm[i][i] = right // k + (i < right % k)
        cm[i][(i + 1) % k] = n // k - cm[i][i]
    summary = {"test": {"acc": acc, "confusion": cm}}
    return SimpleNamespace(usable=True, summary=summary, config={"seed": 0, "norm": norm or label}, predictions=None,
                           calibration={"test": {"ece": ece, "nll": 2.3}} if ece is not None else None,
                           name=label, status="finished", groups=["norms"], rows=[], folder=folder)


def test_chance_p_is_an_exact_binomial_tail():
    assert abs(stats.chance_p(0, 10, 2) - 1.0) < 1e-12
    assert abs(stats.chance_p(10, 10, 2) - 2 ** -10) < 1e-15
    assert abs(stats.chance_p(9, 10, 2) - 11 * 2 ** -10) < 1e-15
    assert stats.chance_p(100, 1000, 10) > 0.4 and stats.chance_p(130, 1000, 10) < 0.01
    assert stats.chance_p(5100, 50_000, 10) > 0.05  # large test sets: no overflow


def test_findings_name_the_variants_at_chance_and_calibration_leaves_them_out(tmp_path):
    norms = {label: [_run(label, acc, ece=ece, folder=tmp_path / label)]  # run folders without saved logits
             for label, acc, ece in (("bn", 0.375, 0.05), ("ln2d", 0.100, 0.005), ("rms", 0.112, 0.004),
                                     ("gn", 0.137, 0.03))}
    assert list(findings.at_chance(norms, "test")) == ["ln2d", "rms"]  # gn: 137/1000 beats 1/10 (p < 0.001)
    line = findings.chance_line(norms, "test")
    assert line.startswith("At chance level (test accuracy not above 1/10 by a one-sided exact binomial test on "
                           "1000 images, p ≥ 0.05): ln2d 0.1000, rms 0.1120.")
    (cal,) = robustness.calibration_findings(norms, "test")
    assert cal.startswith("Best calibrated on test (lowest ECE, 15 bins) (ln2d, rms at chance accuracy: left out, "
                          "a model that predicts the class prior is calibrated trivially): gn 0.0300")
    only = {"ln2d": norms["ln2d"]}
    assert robustness.calibration_findings(only, "test") == [
        "Calibration on test: every variant is at chance accuracy; ECE says nothing here."]


def test_the_batch_size_caption_names_its_norms_and_line_styles():
    batch = {f"{n} · batch {b}": [] for n in ("bn", "evonorm_b0", "gbn") for b in (128, 8)}
    assert build.batch_caption(batch) == ("bn, evonorm_b0, gbn at each batch size (colour and marker: norm; "
                                          "batch 128: solid; batch 8: dashed)")
    assert "Batch size" in build.SECTIONS and not any("GN" in s for s in build.SECTIONS)


def test_a_quantile_panel_without_data_says_why(monkeypatch, tmp_path):
    variants = {"bn": ([0.0, 1.0], [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0]]), "nn": ([], [])}
    fig = captured_figure(monkeypatch, lambda p: p.plot_quantile_panels(variants, [0.01, 0.5, 0.99],
                                                                        tmp_path / "q.png", "last_norm"))
    bn, nn = fig.axes[:2]
    assert not bn.texts and [t.get_text() for t in nn.texts] == ["no quantiles recorded\n(the run diverged or failed)"]
