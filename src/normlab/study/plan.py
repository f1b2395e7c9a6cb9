"""A study = a base training config + the comparisons to run on it, expanded into a deduplicated run plan.

Presets (``normlab/presets/*.yaml``, package data: ``preset_names()``) and study files have two mappings: ``study:`` (the fields of ``StudyConfig``) and
``train:`` (``TrainConfig`` settings shared by every run). Three comparisons share every setting but the
one compared:

1. norms: every variant in ``norms`` with the base settings;
2. batch size: ``batch_norms`` x ``batch_sizes``, capped at ``batch_max_epochs`` with early stopping on
   val accuracy (``batch_patience``);
3. augmentation: ``augment_norm`` with each of ``augment_modes``.

4. any number of extra comparisons in ``compare`` ({title: [settings, ...]}), e.g. optimizers at their own
   learning rates or activations.

Each cell runs for ``seeds`` seeds (0..K-1). Cells that resolve to the same config (e.g. ``torch_bn``
without augmentation in groups 1 and 3) are one run.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from importlib import resources

from normlab.config import TrainConfig, make_config, read_yaml
from normlab.errors import NormlabError
from normlab.registry import ALL_NORMS, BATCH_STAT_NORMS, NORM_NAMES
# what a study compares when it names no norms: the course's seven (the catalogue has its own preset)
DEFAULT_NORMS = ("bn", "in", "bin", "ln", "gn", "nn", "torch_bn")
ROBUSTNESS_MODES = ("auto", "on", "off")


def _presets():
    # package data, so presets are found in a wheel install as in a source checkout
    return resources.files("normlab") / "presets"


def preset_names() -> list[str]:
    """The study presets shipped with normlab (``normlab study --preset NAME``)."""
    return sorted(p.name.removesuffix(".yaml") for p in _presets().iterdir() if p.name.endswith(".yaml"))


@dataclass
class StudyConfig:
    name: str = "study"  # shown in the report's title
    seeds: int = 1  # every cell runs with seeds 0..K-1; tables show mean ± std when K > 1
    norms: list[str] = field(default_factory=lambda: list(DEFAULT_NORMS))  # group 1: the variants compared
    batch_norms: list[str] = field(default_factory=lambda: ["bn", "gn"])  # group 2: norms in the batch-size study
    batch_sizes: list[int] = field(default_factory=lambda: [8, 128])  # group 2: batch sizes compared
    batch_max_epochs: int = 50  # group 2: epoch cap (early stopping on val accuracy decides before)
    batch_patience: int = 5  # group 2: early-stopping patience in epochs
    augment_norm: str = "torch_bn"  # group 3: the model trained with and without augmentation
    augment_modes: list[str] = field(default_factory=lambda: ["none", "standard"])  # group 3
    compare: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # extra comparisons: {title: [settings, ...]}
    gradcam_classes: list[str] | None = None  # Grad-CAM classes (None = every class, capped at gradcam_max_classes)
    gradcam_per_class: int = 5  # correct and misclassified val images per class
    gradcam_max_classes: int = 10  # cap when gradcam_classes is None
    executor: dict[str, Any] = field(default_factory=dict)  # where runs execute: ExecutorOptions in study/executors
    # robustness step after training (never retrains): auto = on for cifar10 and image folders, off otherwise
    robustness: str = "auto"  # auto | on | off
    robustness_severities: list[int] = field(default_factory=lambda: [3])  # the presets' full protocol: 1..5
    robustness_corruptions: list[str] | None = None  # None: every corruption that fits the data set's images
    robustness_test_time: bool = True  # re-estimated / prior-mixed statistics and the batch-statistics sweep
    robustness_batch_stats_images: int = 2000  # images of the clean batch-statistics sweep (batch 1 = 1 image)

    def validate(self) -> StudyConfig:
        if self.seeds < 1:
            raise NormlabError(f"study: seeds={self.seeds} must be >= 1")
        for key in ("norms", "batch_norms"):
            for name in getattr(self, key):
                if name not in NORM_NAMES:
                    close = difflib.get_close_matches(name, NORM_NAMES, n=1)
                    raise NormlabError(f"study: {key} has unknown norm {name!r}"
                                       + (f" (did you mean {close[0]!r}?)" if close else f"; use {', '.join(NORM_NAMES)}"))
        if self.augment_norm not in NORM_NAMES:
            raise NormlabError(f"study: augment_norm={self.augment_norm!r} is not one of {', '.join(NORM_NAMES)}")
        if not isinstance(self.compare, dict) or not all(
                isinstance(v, list) and all(isinstance(c, dict) and c for c in v) for v in self.compare.values()):
            raise NormlabError("study: compare must map a title to a list of non-empty settings mappings, e.g. "
                               "{optimizers: [{optimizer: sgd, lr: 0.1}, {optimizer: adam, lr: 0.001}]}")
        if any(b < 1 for b in self.batch_sizes) or self.batch_max_epochs < 1 or self.batch_patience < 1:
            raise NormlabError("study: batch_sizes, batch_max_epochs and batch_patience must be >= 1")
        if self.robustness not in ROBUSTNESS_MODES:
            raise NormlabError(f"study: robustness={self.robustness!r} must be auto, on or off")
        for s in self.robustness_severities:
            if not 1 <= s <= 5:
                raise NormlabError(f"study: robustness_severities has severity {s}, outside 1–5: "
                                   "use severities from 1 to 5, e.g. [1, 3, 5]")
        if not self.robustness_severities:
            raise NormlabError("study: robustness_severities is empty: give severities from 1 to 5 or robustness: off")
        if self.robustness_batch_stats_images < 1:
            raise NormlabError("study: robustness_batch_stats_images must be >= 1")
        return self

    def robustness_on(self, dataset: str) -> bool:
        """The robustness step runs: on/off as set; auto = on for CIFAR-10 and image folders (colour
        photographs, where the corruption benchmark is defined), off for Fashion-MNIST."""
        if self.robustness == "auto":
            return dataset in ("cifar10", "folder")
        return self.robustness == "on"


@dataclass
class Run:
    name: str  # folder name under <study>/runs/
    config: dict[str, Any]  # the full TrainConfig (out excluded)
    groups: list[str]  # which comparisons use it: norms | batch | augment
    cell: str  # the cell's label without the seed, e.g. "bn" or "bn · batch 8"
    cells: dict[str, str] = field(default_factory=dict)  # group -> label, for runs shared by several groups


def load_preset(spec: str) -> tuple[dict, dict, Path]:
    """``spec`` is a preset name (``quick``) or a YAML path -> (study mapping, train mapping, path)."""
    path = Path(spec)
    if not path.suffix:
        names = preset_names()
        if spec not in names:
            close = difflib.get_close_matches(spec, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise NormlabError(f"unknown study preset {spec!r}{hint}: choose one of {', '.join(names)} "
                               "or give a YAML study file")
        with resources.as_file(_presets() / f"{spec}.yaml") as real:  # a real path even from a zip
            return _read_study_file(real, where=Path(f"preset {spec}"))
    return _read_study_file(path, where=path)


def _read_study_file(path: Path, where: Path) -> tuple[dict, dict, Path]:
    data = read_yaml(path)
    unknown = set(data) - {"study", "train"}
    if unknown:
        raise NormlabError(f"{where}: unknown top-level keys {sorted(unknown)}; a study file has `study:` and `train:`")
    return dict(data.get("study") or {}), dict(data.get("train") or {}), where


def make_study_config(data: dict[str, Any], where: str = "study") -> StudyConfig:
    names = [f.name for f in fields(StudyConfig)]
    values = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise NormlabError(f"{where}: unknown study setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        default = getattr(StudyConfig(), key)
        if key == "compare":
            pass
        elif key == "robustness":  # YAML reads on/off as booleans
            value = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else str(value).lower()
        elif isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "on", "off", "yes", "no"):
                value = value.lower() in ("true", "on", "yes")
            if not isinstance(value, bool):
                raise NormlabError(f"{where}: {key}={value!r} must be true or false")
        elif isinstance(default, list) or key in ("gradcam_classes", "robustness_corruptions"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if value is not None and not isinstance(value, list):
                raise NormlabError(f"{where}: {key} must be a list")
            if key in ("batch_sizes", "robustness_severities"):
                try:
                    value = [int(v) for v in value]
                except (TypeError, ValueError):
                    raise NormlabError(f"{where}: {key} must be a list of integers") from None
        elif isinstance(default, int):
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise NormlabError(f"{where}: {key}={value!r} must be an integer") from None
        if key in ("norms", "batch_norms") and value:
            value = expand_norms(value)
        values[key] = value
    return StudyConfig(**values).validate()


def expand_norms(names: list) -> list[str]:
    """A study's list of norms with its keywords expanded, in registry order and without repeats: ``all`` is every
    registered norm, ``batch-statistics`` every norm that normalizes with batch statistics (asked of the layers,
    so a preset that names them compares a norm added later without being edited)."""
    out: list[str] = []
    for name in map(str, names):
        if name == ALL_NORMS:
            add = list(NORM_NAMES)
        elif name == BATCH_STAT_NORMS:
            from normlab.config import needs_batch_statistics

            add = [n for n in NORM_NAMES if needs_batch_statistics(n)]
        else:
            add = [name]
        out += [n for n in add if n not in out]
    return out


def explicit_caps(study: StudyConfig, train_overrides: dict[str, Any] | None,
                  study_overrides: dict[str, Any] | None = None) -> StudyConfig:
    """An explicit ``epochs`` / ``patience`` (a command-line flag or an API keyword) wins everywhere: it also
    replaces the batch-size cells' own cap (``batch_max_epochs`` / ``batch_patience``), unless that cap is
    given explicitly as well. The preset's ``train:`` values do not: its batch cells keep their own cap."""
    train_overrides, study_overrides = train_overrides or {}, study_overrides or {}
    over = {cap: int(train_overrides[name]) for name, cap in (("epochs", "batch_max_epochs"),
                                                               ("patience", "batch_patience"))
            if train_overrides.get(name) is not None and cap not in study_overrides}
    return dataclasses.replace(study, **over).validate() if over else study


def batch_cap_line(study: StudyConfig) -> str | None:
    """What the plan says about the batch-size cells' length (None without batch-size cells)."""
    if not (study.batch_norms and study.batch_sizes):
        return None
    return (f"batch-size cells ({', '.join(study.batch_norms)} x batch {', '.join(map(str, study.batch_sizes))}): "
            f"up to {study.batch_max_epochs} epochs (batch_max_epochs), early stopping after {study.batch_patience} "
            "epochs without a better val accuracy (batch_patience)")


def cell_label(over: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in over.items())


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text.replace(", ", "_").replace("=", "-"))[:60]


def _key(cfg: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def plan_runs(study: StudyConfig, base: dict[str, Any]) -> list[Run]:
    """Every (cell, seed) as a Run; identical configs merged."""
    cells: list[tuple[str, str, dict[str, Any]]] = []
    for norm in study.norms:
        cells.append(("norms", norm, {"norm": norm}))
    for norm in study.batch_norms:
        for bs in study.batch_sizes:
            cells.append(("batch", f"{norm} · batch {bs}", {"norm": norm, "batch_size": bs,
                                                             "epochs": study.batch_max_epochs,
                                                             "patience": study.batch_patience}))
    for mode in study.augment_modes:
        cells.append(("augment", f"{study.augment_norm} · augment {mode}", {"norm": study.augment_norm, "augment": mode}))
    for title, variants in study.compare.items():
        for over in variants:
            cells.append((f"compare:{title}", cell_label(over), dict(over)))
    runs: dict[str, Run] = {}
    for seed in range(study.seeds):
        for group, label, over in cells:
            cfg = make_config(base, {**over, "seed": seed}, where="study train settings").to_dict()
            cfg["out"] = None
            key = _key(cfg)
            if key in runs:
                if group not in runs[key].groups:
                    runs[key].groups.append(group)
                runs[key].cells.setdefault(group, label)
                continue
            name = f"{cfg['norm']}-b{cfg['batch_size']}-{cfg['augment'].replace(',', '+')}"
            if cfg["patience"] is not None:
                name += f"-e{cfg['epochs']}p{cfg['patience']}"
            if group.startswith("compare:"):
                name = f"{cfg['norm']}-b{cfg['batch_size']}-{_slug(label)}"
            runs[key] = Run(f"{name}-s{seed}", cfg, [group], label, {group: label})
    names = [r.name for r in runs.values()]
    if len(set(names)) != len(names):  # pragma: no cover - names encode every compared setting
        raise NormlabError("study: two different runs got the same folder name; report this as a bug")
    from normlab.models import check_model

    for model in sorted({r.config["model"] for r in runs.values()}):  # e.g. a misspelt timm:<name>: before any run
        check_model(model)
    return list(runs.values())


def study_record(study: StudyConfig, base: dict[str, Any]) -> dict[str, Any]:
    """What is saved as ``study.yaml``: the study settings and the resolved shared train settings."""
    return {"study": dataclasses.asdict(study), "train": make_config(base).to_dict()}


def check_base(train: dict[str, Any]) -> dict[str, Any]:
    """The shared train settings must be a valid TrainConfig (and must not set `out`)."""
    train = {str(k).replace("-", "_"): v for k, v in train.items()}
    train.pop("out", None)
    make_config(train, where="study train settings")
    return train


__all__ = ["Run", "StudyConfig", "TrainConfig", "batch_cap_line", "explicit_caps", "load_preset", "make_study_config", "plan_runs", "preset_names",
           "study_record"]
