"""Corruption robustness, test-time statistics and calibration of finished runs (never retrained), and the
report's Robustness and Calibration sections. (Bad-input robustness of the tools is tests/test_robustness.py.)"""

from __future__ import annotations

import copy
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from normlab.analysis.robustness import (PriorMixed, batch_stat_modules, batch_stats_accuracy, check_severities,
                                         normalize_runs, reestimated, run_robustness, with_batch_stats)
from normlab.errors import NormlabError
from normlab.metrics import calibration_metrics, corruption_errors, ece_from_confidence
from normlab.norms import NORMS, make_norm

from conftest import captured_figure, make_image_folder


# --------------------------------------------------------------------------- pure formulas


def test_mce_against_hand_computation():
    errors = {"fog": {1: 0.2, 3: 0.4}, "snow": {1: 0.3, 3: 0.5}}
    base = {"fog": {1: 0.4, 3: 0.6}, "snow": {1: 0.3, 3: 0.3}}
    out = corruption_errors(errors, base, clean_error=0.1, baseline_clean_error=0.2)
    # CE_fog = (0.2 + 0.4) / (0.4 + 0.6) = 0.6; CE_snow = 0.8 / 0.6
    assert out["ce"]["fog"] == pytest.approx(0.6) and out["ce"]["snow"] == pytest.approx(0.8 / 0.6)
    assert out["mce"] == pytest.approx((0.6 + 0.8 / 0.6) / 2)
    # relative: ((0.2-0.1) + (0.4-0.1)) / ((0.4-0.2) + (0.6-0.2)) = 0.4/0.6; snow: 0.6 / 0.2 = 3
    assert out["relative_ce"]["fog"] == pytest.approx(0.4 / 0.6) and out["relative_ce"]["snow"] == pytest.approx(3.0)
    assert out["relative_mce"] == pytest.approx((0.4 / 0.6 + 3.0) / 2)
    assert out["mean_corruption_error"] == pytest.approx((0.3 + 0.4) / 2)
    # the baseline against itself is 1 everywhere; a zero denominator is NaN, not an exception
    same = corruption_errors(base, base, 0.2, 0.2)
    assert same["mce"] == pytest.approx(1.0) and same["relative_mce"] == pytest.approx(1.0)
    assert math.isnan(corruption_errors({"a": {1: 0.1}}, {"a": {1: 0.0}})["mce"])


def _numpy_calibration(p: np.ndarray, y: np.ndarray, bins: int = 15):
    conf, pred = p.max(1), p.argmax(1)
    right = (pred == y).astype(float)
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(right[m].mean() - conf[m].mean())
    nll = -np.log(p[np.arange(len(y)), y]).mean()
    onehot = np.eye(p.shape[1])[y]
    return ece, nll, ((p - onehot) ** 2).sum(1).mean()


def test_calibration_metrics_against_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 7)) * 2
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = rng.integers(0, 7, 500)
    got = calibration_metrics(torch.tensor(p), torch.tensor(y))
    ece, nll, brier = _numpy_calibration(p, y)
    assert got["ece"] == pytest.approx(ece, abs=1e-6)
    assert got["nll"] == pytest.approx(nll, rel=1e-9) and got["brier"] == pytest.approx(brier, rel=1e-9)
    assert sum(got["bins"]["count"]) == 500 and len(got["bins"]["count"]) == 15
    conf, right = p.max(1), (p.argmax(1) == y).astype(float)
    assert ece_from_confidence(conf, right) == pytest.approx(ece, abs=1e-9)  # the bootstrap's fast ECE
    # a confident wrong model is badly calibrated
    bad = np.full((100, 2), 0.0)
    bad[:, 0] = 0.99
    bad[:, 1] = 0.01
    assert calibration_metrics(torch.tensor(bad), torch.ones(100, dtype=torch.long))["ece"] == pytest.approx(0.99)


# --------------------------------------------------------------------------- test-time statistics


class Tiny(nn.Module):
    def __init__(self, norm: str, pool_first: bool = False, **kw):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool_first = pool_first
        self.norm = make_norm(norm, 8, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.conv(x)
        if self.pool_first:
            h = h.mean((2, 3), keepdim=True)  # 1x1 maps: batch statistics of one image are undefined
        return self.head(self.norm(h).mean((2, 3)))


def _trained_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(x)
    return model.eval()


def test_batch_stat_layers_are_found_by_property_not_name():
    found = {n: bool(batch_stat_modules(Tiny(n))) for n in ("bn", "torch_bn", "bin", "in", "gn", "ln", "nn")}
    assert found == {"bn": True, "torch_bn": True, "bin": True, "in": False, "gn": False, "ln": False, "nn": False}

    class Future(nn.Module):  # a norm added later that keeps running statistics the same way
        def __init__(self):
            super().__init__()
            self.track_running_stats = True
            self.register_buffer("running_mean", torch.zeros(2))
            self.register_buffer("running_var", torch.ones(2))

    assert len(batch_stat_modules(nn.Sequential(Future(), nn.BatchNorm2d(2, track_running_stats=False)))) == 1


@pytest.mark.parametrize("norm", ["bn", "torch_bn", "bin"])
def test_reestimation_follows_shifted_data_and_leaves_the_model_alone(norm):
    torch.manual_seed(0)
    x = torch.randint(0, 120, (32, 3, 8, 8), dtype=torch.uint8)
    model = _trained_stats(Tiny(norm), x.float() / 255)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shifted = (x + 120).to(torch.uint8)  # brighter images: other feature statistics
    m = reestimated(model, shifted, (0.0,) * 3, (1.0,) * 3, torch.device("cpu"), 8)
    assert not m.training and not m.norm.training
    feats = model.conv(shifted.float() / 255).detach()
    expected_mean = feats.mean((0, 2, 3))
    assert torch.allclose(m.norm.running_mean, expected_mean, rtol=1e-4, atol=1e-4)  # cumulative = whole-set mean
    assert not torch.allclose(model.norm.running_mean, m.norm.running_mean, atol=1e-2)
    for k, v in model.state_dict().items():  # the saved model is never modified
        assert torch.equal(v, before[k]), k
    assert m.norm.momentum == model.norm.momentum


def test_reestimation_feeds_batches_in_the_models_layout():
    # an NCHW batch into a channels_last model is converted layer by layer: the pass costs about twice as much
    torch.manual_seed(0)
    x = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    model = _trained_stats(Tiny("bn"), x.float() / 255).to(memory_format=torch.channels_last)
    seen = []
    model.conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last) and not args[0].is_contiguous()))
    reestimated(model, x, (0.0,) * 3, (1.0,) * 3, torch.device("cpu"), 8)
    assert seen == [True, True]


def test_reestimation_changes_nothing_for_instance_norm():
    torch.manual_seed(0)
    x = torch.randint(0, 120, (16, 3, 8, 8), dtype=torch.uint8)
    model = Tiny("in").eval()
    m = reestimated(model, (x + 120).to(torch.uint8), (0.0,) * 3, (1.0,) * 3, torch.device("cpu"), 8)
    for (k, a), (_, b) in zip(model.state_dict().items(), m.state_dict().items()):
        assert torch.equal(a, b), k
    inp = x.float()
    assert torch.equal(model(inp), m(inp))


def test_prior_mix_is_schneider_formula_and_restores_nothing_in_the_source():
    torch.manual_seed(1)
    model = _trained_stats(Tiny("torch_bn"), torch.rand(32, 3, 8, 8))
    source = (model.norm.running_mean.clone(), model.norm.running_var.clone())
    xb = torch.rand(8, 3, 8, 8) * 3 + 1
    with PriorMixed(model, prior_n=16) as mm:
        got = mm(xb)
        assert len(mm.norm._forward_pre_hooks) == 1
    assert len(mm.norm._forward_pre_hooks) == 0  # hooks removed on exit
    h = model.conv(xb).detach()
    w = 16 / (16 + 8)
    mean = w * source[0] + (1 - w) * h.mean((0, 2, 3))
    var = w * source[1] + (1 - w) * h.var((0, 2, 3), unbiased=True)
    bn = model.norm
    normed = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    expected = model.head((normed * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]).mean((2, 3)))
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(model.norm.running_mean, source[0])  # the source model is untouched


@pytest.mark.parametrize("norm", ["bn", "torch_bn"])
def test_batch_size_one_on_one_by_one_maps_is_not_applicable(norm):
    torch.manual_seed(0)
    x = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (16,))
    model = _trained_stats(Tiny(norm, pool_first=True), x.float() / 255)
    out = batch_stats_accuracy(model, x, y, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), (1, 8))
    assert out["1"] is None and 0.0 <= out["8"] <= 1.0 and 0.0 <= out["eval"] <= 1.0
    assert not model.norm.training  # the model itself stays in eval mode


# every catalogue norm that keeps running statistics, found by its buffers (not by batch_stat_modules)
RUNNING = [n for n in NORMS if isinstance(getattr(make_norm(n, 8), "running_var", None), torch.Tensor)]
# (name, constructor keywords): GBN also with ghost batches smaller than the test's batches
CASES = [(n, {}) for n in RUNNING] + [("gbn", {"virtual_batch": 4})]
CASE_IDS = [n + ("-ghost4" if kw else "") for n, kw in CASES]
BN_LIKE = ("bn", "torch_bn", "brn", "gbn")  # eval is plain BN with the running statistics


def test_the_catalogue_norms_with_running_statistics_are_all_there():
    from norm_specs import SPECS

    assert set(RUNNING) == {s.name for s in SPECS if s.batch_stats} and {"bn", "bin", "torch_bn", "gbn"} <= set(RUNNING)


@pytest.mark.parametrize("norm", RUNNING)
def test_every_norm_with_running_statistics_is_found(norm):
    layer = make_norm(norm, 8)
    assert batch_stat_modules(layer) == [layer]
    assert len(batch_stat_modules(Tiny(norm))) == 1


def test_evonorm_without_its_activation_has_nothing_to_reestimate():
    assert batch_stat_modules(make_norm("evonorm_b0", 8, apply_act=False)) == []


def _batches_of(h: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [h[i:i + size] for i in range(0, len(h), size)]


def _stats(h: torch.Tensor, ghost: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of one batch as a training step estimates them."""
    parts = _batches_of(h, ghost) if ghost else [h]
    return (torch.stack([p.mean((0, 2, 3)) for p in parts]).mean(0),
            torch.stack([p.var((0, 2, 3), unbiased=True) for p in parts]).mean(0))


@pytest.mark.parametrize("norm,kw", CASES, ids=CASE_IDS)
def test_every_batch_norm_is_reestimated_on_shifted_data(norm, kw):
    torch.manual_seed(0)
    x = torch.randint(0, 120, (32, 3, 8, 8), dtype=torch.uint8)
    model = _trained_stats(Tiny(norm, **kw), x.float() / 255)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shifted = (x + 120).to(torch.uint8)
    m = reestimated(model, shifted, (0.0,) * 3, (1.0,) * 3, torch.device("cpu"), 8)
    assert not m.training and not m.norm.training
    feats = model.conv(shifted.float() / 255).detach()
    ghost = kw.get("virtual_batch")
    per_batch = [_stats(b, ghost) for b in _batches_of(feats, 8)]
    # cumulative average over the batches: the data's mean, the mean of the batches' (unbiased) variances
    torch.testing.assert_close(m.norm.running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.norm.running_var, torch.stack([v for _, v in per_batch]).mean(0), rtol=1e-4,
                               atol=1e-4)
    assert not torch.allclose(model.norm.running_mean, m.norm.running_mean, atol=1e-2)
    for k, v in model.state_dict().items():  # the saved model is never modified
        assert torch.equal(v, before[k]), k
    assert m.norm.momentum == model.norm.momentum
    assert getattr(m.norm, "renorm", None) == getattr(model.norm, "renorm", None)  # brn's corrections back on
    inp = shifted.float() / 255
    assert not torch.allclose(m(inp), model(inp), atol=1e-4)  # eval now normalizes with the new statistics


@pytest.mark.parametrize("norm,kw", CASES, ids=CASE_IDS)
def test_prior_mix_of_every_batch_norm_is_schneider_formula(norm, kw):
    torch.manual_seed(1)
    model = _trained_stats(Tiny(norm, **kw), torch.rand(32, 3, 8, 8))
    source = (model.norm.running_mean.clone(), model.norm.running_var.clone())
    xb = torch.rand(8, 3, 8, 8) * 3 + 1
    with PriorMixed(model, prior_n=16) as mm:
        got = mm(xb)
    h = model.conv(xb).detach()
    w = 16 / (16 + 8)
    bmean, bvar = _stats(h, kw.get("virtual_batch"))
    mean, var = w * source[0] + (1 - w) * bmean, w * source[1] + (1 - w) * bvar
    hand = copy.deepcopy(model)  # the norm's own eval with the mixed statistics in its buffers
    hand.norm.running_mean.copy_(mean)
    hand.norm.running_var.copy_(var)
    with torch.no_grad():
        torch.testing.assert_close(got, hand(xb), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, model(xb), atol=1e-3)  # not the plain evaluation
    if norm in BN_LIKE:  # and written out: BN with the mixed statistics
        bn = model.norm
        normed = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
        expected = model.head((normed * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]).mean((2, 3)))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.norm.running_mean, source[0]) and torch.equal(model.norm.running_var, source[1])


@pytest.mark.parametrize("norm", RUNNING)
def test_batch_size_sweep_of_every_batch_norm(norm):
    torch.manual_seed(0)
    x = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (16,))
    model = _trained_stats(Tiny(norm, pool_first=True), x.float() / 255)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = batch_stats_accuracy(model, x, y, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), (1, 8))
    assert out["1"] is None and 0.0 <= out["8"] <= 1.0 and 0.0 <= out["eval"] <= 1.0  # 1x1 maps of one image
    assert not model.norm.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    m = with_batch_stats(model)  # what the sweep evaluates: batch statistics, not the running ones
    assert m.norm.training and not m.training and not m.conv.training
    inp = torch.rand(8, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(m(inp), model(inp), atol=1e-4)


class TwoNorms(nn.Module):
    def __init__(self, norm: str, **kw):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norm1, self.norm2 = make_norm(norm, 8, **kw), make_norm(norm, 8, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.norm1(self.conv1(x)))
        return self.head(self.norm2(self.conv2(h)).mean((2, 3)))


def test_batch_renorm_test_time_statistics_are_batchnorms():
    """Batch Renorm's r and d correct towards the running statistics the test-time evaluations replace: with
    them off, re-estimation and the batch-statistics sweep are BN's, even with the corrections at full bounds
    (warmup 0) and running statistics far from the data."""
    torch.manual_seed(0)
    brn = TwoNorms("brn", warmup=0)
    with torch.no_grad():
        for layer in (brn.norm1, brn.norm2):
            layer.running_mean.fill_(3.0)
            layer.running_var.fill_(20.0)
            layer.num_batches_tracked.fill_(5000)
            layer.weight.uniform_(0.5, 1.5)
    bn = TwoNorms("bn")
    bn.load_state_dict(brn.state_dict())
    brn.eval(), bn.eval()
    x = torch.randint(0, 255, (32, 3, 8, 8), dtype=torch.uint8)
    got, ref = (reestimated(m, x, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), 8) for m in (brn, bn))
    for a, b in ((got.norm1, ref.norm1), (got.norm2, ref.norm2)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-4)
    assert got.norm1.renorm and got.norm2.renorm  # switched back on the copy it returns
    inp = torch.rand(8, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(with_batch_stats(brn)(inp), with_batch_stats(bn)(inp), rtol=1e-4, atol=1e-4)
    assert brn.norm1.renorm and not brn.norm1.training


def test_severities_are_checked():
    assert check_severities(["5", 1, 3, 3]) == [1, 3, 5]
    for bad in ([0], [6], ["1.5"], []):
        with pytest.raises(NormlabError, match="1 to 5"):
            check_severities(bad)


# --------------------------------------------------------------------------- a trained run end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from normlab.config import make_config
    from normlab.train.loop import train

    root = tmp_path_factory.mktemp("robust")
    folder = make_image_folder(root / "imgs", classes=("a", "b", "c"), per_split={"train": 16, "val": 6, "test": 6})
    out = {}
    for norm in ("torch_bn", "in"):
        cfg = make_config(dict(dataset="folder", data_root=str(folder), image_size=16, n=1, epochs=1, batch_size=16,
                               lr=0.05, eval_batch_size=64, probe_size=16, progress="off", device="cpu", norm=norm,
                               out=str(root / norm)))
        out[norm] = train(cfg)
    return root, out


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_robustness_writes_results_and_never_touches_the_weights(runs):
    from normlab import runfolder

    root, folders = runs
    bn = folders["torch_bn"]
    before = _digest(bn / "best.pt")
    res = run_robustness(bn, corruptions=["gaussian_noise", "contrast"], severities=[1, 5], batch_sizes=(1, 8),
                         progress=False)
    assert _digest(bn / "best.pt") == before
    saved = runfolder.read_robustness(bn)
    assert saved["split"] == "test" and saved["images"] == 18 and saved["severities"] == [1, 5]
    assert set(saved["accuracy"]) == {"gaussian_noise", "contrast"} and set(saved["accuracy"]["contrast"]) == {"1", "5"}
    for key in ("accuracy", "adapted", "mixed"):
        assert all(0.0 <= a <= 1.0 for sev in saved[key].values() for a in sev.values()), key
    assert set(saved["batch_stats_clean"]) == {"eval", "1", "8"}
    assert res["clean"]["acc"] == saved["clean"]["acc"]
    inn = run_robustness(folders["in"], corruptions=["gaussian_noise", "contrast"], severities=[1, 5],
                         progress=False)
    assert inn["adapted"] is None and inn["batch_stats_clean"] is None  # nothing to re-estimate
    # normalized by the torch_bn run: CE = the run's summed errors over the baseline's
    both = normalize_runs({"bn": saved, "in": inn}, ["bn"])
    for c in ("gaussian_noise", "contrast"):
        e_in = sum(1 - a for a in inn["accuracy"][c].values())
        e_bn = sum(1 - a for a in saved["accuracy"][c].values())
        got = both["in"]["normalized"]["ce"][c]
        assert (math.isnan(got) and e_bn == 0) or got == pytest.approx(e_in / e_bn), c
        assert e_bn == 0 or both["bn"]["normalized"]["ce"][c] == pytest.approx(1.0)
    assert both["in"]["normalized"]["baseline"] == "torch_bn" and "mce_adapted" not in both["in"]["normalized"]
    assert "mce_adapted" in both["bn"]["normalized"]


def test_calibration_of_a_run_from_its_saved_logits(runs):
    from normlab import runfolder
    from normlab.analysis.calibration import calibration_from_logits, run_calibration

    _, folders = runs
    out = run_calibration(folders["in"])
    assert set(out) == {"val", "test"} and (folders["in"] / "reliability_test.png").stat().st_size > 1000
    logits = runfolder.read_logits(folders["in"])
    assert logits["test"].shape == (18, 3) and logits["test_true"].shape == (18,)
    from normlab.analysis.galleries import load_run

    assert np.array_equal(logits["test_true"], load_run(folders["in"]).data.test_y.numpy())
    again = calibration_from_logits(logits["test"], logits["test_true"])  # the file alone gives the metrics
    assert again["ece"] == pytest.approx(runfolder.read_calibration(folders["in"])["test"]["ece"])


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    from normlab.cli import main

    _, folders = runs
    with pytest.raises(NormlabError, match="unknown corruption 'fgo'.*did you mean 'fog'"):
        run_robustness(folders["in"], corruptions=["fgo"], progress=False)
    with pytest.raises(NormlabError, match="must be >= 1"):
        run_robustness(folders["in"], batch_stats_images=0, progress=False)
    assert main(["robustness", str(folders["in"]), "--severities", "0,3"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["robustness", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "has no best.pt or last.pt" in err and err.strip().count("\n") == 0


def test_cli_normalizes_by_the_torch_bn_run(runs, capsys):
    from normlab import runfolder
    from normlab.cli import main

    _, folders = runs
    assert main(["robustness", str(folders["torch_bn"]), str(folders["in"]), "--corruptions", "brightness",
                 "--severities", "2", "--batch-stats-images", "4"]) == 0
    out = capsys.readouterr().out
    assert "mCE 1.000" in out and "robustness.json" in out
    norm = runfolder.read_robustness(folders["in"])["normalized"]
    assert norm["baseline"].startswith("torch_bn") and set(norm["ce"]) == {"brightness"}


def test_study_step_and_report_sections(runs, tmp_path):
    """A study folder around the two runs: the robustness step (one failing run kept and marked), results.csv
    columns and the report's Robustness and Calibration sections."""
    import shutil

    from normlab.config import make_config
    from normlab.report.build import build_report
    from normlab import studyfolder as sf
    from normlab.study.plan import StudyConfig, study_record
    from normlab.study.robustness import robustness_step

    _, folders = runs
    study_dir = tmp_path / "study"
    plan = []
    for norm, src in folders.items():
        shutil.copytree(src, sf.run_dir(study_dir, f"{norm}-s0"))
        cfg = json.loads(json.dumps(make_config(runfolder_config(src)).to_dict()))
        plan.append({"name": f"{norm}-s0", "config": cfg, "groups": ["norms"], "cell": norm, "cells": {"norms": norm}})
    broken = sf.run_dir(study_dir, "in-s0") / "best.pt"
    study = StudyConfig(name="rob", norms=["torch_bn", "in"], robustness_severities=[2, 5],
                        robustness_corruptions=["brightness", "gaussian_noise"], robustness_batch_stats_images=4)
    record = study_record(study, {k: v for k, v in plan[0]["config"].items() if k not in ("norm", "out")})
    sf.write_record(study_dir, record)
    sf.write_plan(study_dir, plan)
    from normlab.analysis.calibration import run_calibration

    run_calibration(broken.parent)  # calibrated before its weights broke: the report compares both runs' ECE
    broken.write_bytes(b"not a checkpoint")  # robustness fails for this run: it is kept, and marked
    (sf.run_dir(study_dir, "in-s0") / "last.pt").unlink(missing_ok=True)
    lines: list[str] = []
    robustness_step(study_dir, plan, record["study"], "folder", log=lines.append)
    assert any("robustness of in-s0 failed" in line for line in lines)
    from normlab import runfolder

    assert "cannot be read" in runfolder.read_robustness(sf.run_dir(study_dir, "in-s0"))["failed"]
    sf.update_results(study_dir)
    import normlab

    df = normlab.load_study(study_dir).set_index("run")
    assert df.loc["torch_bn-s0", "mce"] == pytest.approx(1.0) and df.loc["torch_bn-s0", "robustness_status"] == "ok"
    assert df.loc["in-s0", "robustness_status"].startswith("failed: ") and not math.isnan(df.loc["torch_bn-s0", "test_ece"])
    md, _ = build_report(study_dir)
    text = md.read_text()
    rob = text.split("## Robustness", 1)[1].split("## Calibration", 1)[0]
    assert "figures/robustness_severity.png" in rob and "figures/robustness_heatmap.png" in rob
    assert "| variant | seeds | clean acc | corrupted acc | mCE |" in rob and "1.000" in rob
    assert "Most robust to corruptions" in rob and "The robustness step failed for in-s0" in rob
    assert "Re-estimating the batch statistics" in rob and "batch 1" in rob
    cal = text.split("## Calibration", 1)[1].split("## Appendix", 1)[0]
    assert "figures/reliability_test.png" in cal and "test ECE" in cal
    assert "paired bootstrap over 18 images" in cal  # one seed: ECE gap from the saved logits
    # a second step with the same settings evaluates nothing again
    lines.clear()
    robustness_step(study_dir, plan, record["study"], "folder", log=lines.append)
    assert not any(line.startswith("robustness: torch_bn") for line in lines)


def runfolder_config(folder):
    from normlab import runfolder

    return runfolder.read_config(folder)


def test_study_settings_of_the_robustness_step():
    from normlab.study.plan import load_preset, make_study_config

    assert make_study_config({}).robustness_on("cifar10") and make_study_config({}).robustness_on("folder")
    assert not make_study_config({}).robustness_on("fashion-mnist")
    off = make_study_config({"robustness": False})  # YAML's `off` is a boolean
    assert off.robustness == "off" and not off.robustness_on("cifar10")
    assert make_study_config({"robustness": "on"}).robustness_on("fashion-mnist")
    study, _, _ = load_preset("cifar10-paper")
    assert make_study_config(study).robustness_severities == [1, 2, 3, 4, 5]  # the full protocol
    for bad, msg in (({"robustness": "maybe"}, "auto, on or off"), ({"robustness_severities": [0, 3]}, "outside 1–5"),
                     ({"robustness_test_time": "perhaps"}, "true or false")):
        with pytest.raises(NormlabError, match=msg):
            make_study_config(bad)


def test_bootstrap_ece_gap_says_when_it_is_noise():
    from normlab.report.stats import bootstrap_gap

    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 2000)
    right = (rng.uniform(size=2000) < conf).astype(float)  # calibrated: accuracy = confidence
    same = bootstrap_gap(ece_from_confidence, (conf, right), (conf.copy(), right.copy()))
    assert same.diff == 0 and not same.separated and "within noise" in same.verdict()
    over = np.minimum(conf + 0.3, 1.0)  # the same answers, 0.3 more confident: badly calibrated
    gap = bootstrap_gap(ece_from_confidence, (over, right), (conf, right))
    assert gap.diff > 0.15 and gap.separated and "paired bootstrap over 2000 images" in gap.verdict()
    assert "seed-to-seed variation cannot be ruled out" in gap.verdict()


def test_batches_mix_classes_even_when_the_split_is_sorted_by_class(runs, monkeypatch):
    """Image folders load class by class: batch statistics of a one-class batch are not the data's, so every
    pass (re-estimation, prior mix, the batch-statistics sweep) sees one fixed shuffle of the split."""
    import normlab.analysis.robustness as rb

    _, folders = runs
    seen: dict[str, torch.Tensor] = {}
    real_sweep, real_reest = rb.batch_stats_accuracy, rb.reestimated

    def sweep(model, x, y, *a, **k):
        seen["sweep"] = y.clone()
        return real_sweep(model, x, y, *a, **k)

    def reest(model, x, *a, **k):
        seen["reest_x"] = x.clone()
        return real_reest(model, x, *a, **k)

    monkeypatch.setattr(rb, "batch_stats_accuracy", sweep)
    monkeypatch.setattr(rb, "reestimated", reest)
    from normlab.analysis.galleries import load_run

    run = load_run(folders["torch_bn"])
    assert torch.equal(run.data.test_y, run.data.test_y.sort().values)  # stored sorted by class
    res = run_robustness(folders["torch_bn"], corruptions=["brightness"], severities=[1], batch_sizes=(8,),
                         batch_stats_images=8, progress=False)
    assert len(set(seen["sweep"].tolist())) > 1  # the first 8 images are not one class
    from normlab.data.corruptions import corrupted_set

    stored = corrupted_set(run.data.test_x, "brightness", 1)
    assert not torch.equal(seen["reest_x"], stored)  # shuffled ...
    assert sorted(i.tobytes() for i in seen["reest_x"].numpy()) == sorted(i.tobytes() for i in stored.numpy())
    assert res["images"] == len(run.data.test_y)


def test_reliability_panels_label_the_outer_axes_also_above_an_empty_slot(monkeypatch, tmp_path):
    bins = {"confidence": [0.25, 0.75], "accuracy": [0.2, 0.8], "count": [10, 30]}
    names = ["torch_bn", "bn", "in", "bin", "ln", "gn", "nn"]  # 4 + 3 panels: the 8th slot is empty
    fig = captured_figure(monkeypatch, lambda p: p.plot_reliability({n: bins for n in names}, tmp_path / "r.png"))
    axes = [ax for ax in fig.axes if ax.get_visible()]

    def numbers(ax):
        return ax.xaxis.get_major_ticks()[0].label1.get_visible()

    assert [numbers(ax) for ax in axes] == [False, False, False, True, True, True, True]  # bin: above the gap
    assert [ax.get_xlabel() for ax in axes] == ["", "", "", "confidence", "confidence", "confidence", "confidence"]
    assert [ax.get_ylabel() for ax in axes] == ["accuracy", "", "", "", "accuracy", "", ""]


def test_severity_panels_share_one_y_scale_with_ticks_at_the_severities(monkeypatch, tmp_path):
    panels = [("as trained", "accuracy", {"bn": ([0, 1, 3, 5], [0.55, 0.5, 0.45, 0.4])}),
              ("re-estimated", "accuracy", {"bn": ([0, 1, 3, 5], [0.55, 0.52, 0.5, 0.48])})]
    fig = captured_figure(monkeypatch, lambda p: p.plot_panels(panels, tmp_path / "s.png", sharey=True,
                                                                xticks=[0, 1, 3, 5]))
    left, right = fig.axes[:2]
    assert left.get_ylim() == right.get_ylim() and left.get_ylim()[0] <= 0.4
    assert right.yaxis.get_major_ticks()[0].label1.get_visible()  # both panels readable on their own
    assert list(left.get_xticks()) == [0, 1, 3, 5]
