"""One registry per choice: every value of every registry works, an unknown value is an error (never a
silent default), a new norm needs one entry, and the layers import downwards only."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab import cli, registry
from normlab.config import TrainConfig, make_config
from normlab.errors import NormlabError
from normlab.models import build_model, replace_norms
from normlab.models.swap import is_norm
from normlab.norms import NORMS, GroupNorm2d
from normlab.train.optim import build_optimizer, lr_at

SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_optimizer_builds_and_unknown_is_an_error():
    model = nn.Linear(3, 2)
    for name in registry.OPTIMIZERS:
        opt = build_optimizer(model, make_config({"optimizer": name, "lr": 0.01}))
        assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == 0.01
    assert type(build_optimizer(model, make_config({"optimizer": "adam"}))) is torch.optim.Adam
    with pytest.raises(NormlabError, match="optimizer='sdg'.*did you mean 'sgd'"):
        make_config({"optimizer": "sdg"})
    bad = dataclasses.replace(make_config({}), optimizer="lion")  # past validation: still no silent AdamW
    with pytest.raises(NormlabError, match="optimizer='lion' is not one of sgd, adam, adamw"):
        build_optimizer(model, bad)


def test_every_schedule_stays_in_range_and_unknown_is_an_error():
    for name in registry.SCHEDULES:
        cfg = make_config({"schedule": name, "lr": 0.2})
        lrs = [lr_at(s, 100, cfg, 10) for s in range(100)]
        assert all(0 < lr <= 0.2 + 1e-12 for lr in lrs), name
    assert lr_at(99, 100, make_config({"schedule": "constant", "lr": 0.2}), 10) == 0.2
    bad = dataclasses.replace(make_config({}), schedule="linear")  # was silently one-cycle
    with pytest.raises(NormlabError, match="schedule='linear'"):
        lr_at(0, 10, bad, 1)


# the registry's timm:NAME entry stands for any timm architecture: build one
EXAMPLES = {registry.TIMM_PREFIX + "NAME": registry.TIMM_PREFIX + "resnet10t"}


@pytest.mark.parametrize("model", list(registry.MODELS))
def test_every_model_builds(model):
    if model.startswith(registry.TIMM_PREFIX):
        pytest.importorskip("timm")
    model = EXAMPLES.get(model, model)
    cfg = make_config({"model": model, "n": 1, "width": 8, "norm": "gn", "gn_groups": 4})
    net = build_model(cfg, in_channels=3, num_classes=5)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert 0 <= cfg.freeze <= registry.MODELS[model].freeze_units


@pytest.mark.parametrize("name", list(registry.ACTIVATIONS))
def test_every_activation_builds(name):
    net = build_model(make_config({"activation": name, "n": 1}), 1, 3)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("setting, registry_name", [
    ("norm", "NORMS"), ("activation", "ACTIVATIONS"), ("shortcut", "SHORTCUTS"), ("optimizer", "OPTIMIZERS"),
    ("schedule", "SCHEDULES"), ("model", "MODELS"), ("dataset", "DATASETS")])
def test_config_choices_are_the_registries(setting, registry_name):
    """The choices are the registry itself, or (for registries of torch objects) its list of names, which must
    be exactly the registry's keys: config and the command line know them without importing torch."""
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[setting]
    names = getattr(registry, registry_name[:-1] + "_NAMES", None)
    if names is not None:
        assert field.metadata["choices"] is names and names == tuple(getattr(registry, registry_name))
    else:
        assert field.metadata["choices"] is getattr(registry, registry_name)
    with pytest.raises(NormlabError, match=f"{setting}="):
        make_config({setting: "no-such-value"})


def test_augmentation_names_are_the_catalogue():
    from normlab.data.augmentations import CATALOGUE

    assert registry.AUGMENTATION_NAMES == tuple(CATALOGUE)


def test_a_new_norm_is_its_layer_and_its_name(monkeypatch, capsys):
    """A norm registered in NORMS whose name the choices list (what its line in norm_table.NORM_PATHS gives):
    config, CLI choices, models and replace_norms all take it."""

    class MyNorm(GroupNorm2d):
        pass

    monkeypatch.setitem(NORMS, "my", lambda c, **kw: MyNorm(c, num_groups=2))
    names = registry.NORM_NAMES + ("my",)  # what adding its line to norm_table.NORM_PATHS does
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}["norm"]
    monkeypatch.setattr(field, "metadata", {**field.metadata, "choices": names})
    cfg = make_config({"norm": "my", "batch_size": 1})  # and it needs no batch statistics
    net = build_model(cfg, 3, 4)
    assert any(type(m) is MyNorm for m in net.modules())
    assert net(torch.randn(1, 3, 8, 8)).shape == (1, 4)
    capsys.readouterr()
    assert cli.main(["train", "--help"]) == 0
    assert f"{list(NORMS)[-2]},my}}" in capsys.readouterr().out  # the last choice, after every registered norm
    monkeypatch.setitem(NORMS, "my", MyNorm)
    assert is_norm(MyNorm(4, num_groups=2))  # swappable without a second list
    swapped = replace_norms(nn.Sequential(MyNorm(4, num_groups=2)), lambda c: nn.BatchNorm2d(c))
    assert type(swapped[0]) is nn.BatchNorm2d


def test_config_does_not_import_models_or_training():
    code = ("import sys, normlab.config; bad = [m for m in sys.modules if m.startswith(('normlab.models', "
            "'normlab.train', 'normlab.study', 'normlab.analysis', 'normlab.report'))]; print(bad); assert not bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)},
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr



def test_the_norms_are_one_table():
    """NORMS, the config's choices and the CLI's are all read from norm_table.NORM_PATHS, in its order."""
    from normlab.norm_table import NORM_PATHS

    assert tuple(NORMS) == registry.NORM_NAMES == tuple(NORM_PATHS)
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}["norm"]
    assert field.metadata["choices"] == tuple(NORM_PATHS)


def test_batch_statistics_by_name_and_by_layer_agree_for_every_norm():
    """One answer to "does this norm normalize with batch statistics": config's by name, the layer's own
    (norms.traits.uses_batch_statistics, which the robustness analysis uses to find such layers in any model) and
    the catalogue's specification table agree for every registered norm."""
    from norm_specs import BY_NAME

    from normlab.analysis.robustness import batch_stat_modules
    from normlab.config import needs_batch_statistics
    from normlab.norms import make_norm
    from normlab.norms.traits import norm_uses_batch_statistics, uses_batch_statistics

    for name in NORMS:
        layer = make_norm(name, 16)
        by_layer = uses_batch_statistics(layer)
        assert needs_batch_statistics(name) == norm_uses_batch_statistics(name) == by_layer, name
        assert by_layer == BY_NAME[name].batch_stats, name
        assert batch_stat_modules(layer) == ([layer] if by_layer else []), name
    assert not uses_batch_statistics(nn.BatchNorm2d(4, track_running_stats=False))  # batch statistics, no estimates


@pytest.mark.parametrize("norm", ["sn", "mobn", "gbn"])
def test_a_batch_of_one_is_refused_for_a_norm_with_batch_statistics(norm):
    """config asks the layer (no list of names to keep up to date): a norm with batch statistics refuses a batch
    of one, one without takes it."""
    from normlab.config import make_config

    with pytest.raises(NormlabError) as err:
        make_config({"norm": norm, "batch_size": 1})
    assert str(err.value) == (
        f"config: batch_size=1 cannot train with norm={norm!r}: BatchNorm needs more than one value per channel to "
        "compute batch statistics; use --batch-size 2 or more, or --norm gn/ln/in")
    assert make_config({"norm": "rms", "batch_size": 1}).batch_size == 1


def test_every_norm_takes_the_keywords_its_constructor_names_and_drops_the_others():
    """make_norm hands sync / num_groups / virtual_batch to the norms whose constructor names them (read from the
    signature: a new norm needs no list entry; mobn's sync was once dropped by such a list) and drops them for
    the others."""
    import inspect

    from normlab.norms import NORMS, make_norm

    for name, factory in NORMS.items():
        named = inspect.signature(factory).parameters
        layer = make_norm(name, 8, sync=True, num_groups=2, virtual_batch=2)
        if "sync" in named:
            assert layer.sync is True, name
        if "num_groups" in named:
            assert layer.num_groups == 2, name
        if "virtual_batch" in named:
            assert layer.virtual_batch == 2, name
    assert make_norm("mobn", 8, sync=True).sync and not make_norm("rms", 8, sync=True).sync
