"""The run configuration: one dataclass, a help text and the allowed values per field, validated at the edge.

A config is built from defaults, then a YAML file (``--config``), then command-line flags, and saved as
``config.yaml`` in every run folder and inside every checkpoint, so a run can be rebuilt exactly. Importing
this module imports no torch (the choices are the registries' names), so the command line is built without it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from normlab.errors import NormlabError
from normlab.registry import (ACTIVATION_NAMES, AUGMENTATION_NAMES, CONVS, DATASETS, MODELS, NORM_NAMES,
                              OPTIMIZER_NAMES, SCHEDULES, SHORTCUTS, choose, is_timm)

IMAGENET = "imagenet"  # --pretrained imagenet: torchvision's ResNet18_Weights.IMAGENET1K_V1
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE = ("auto", "on", "off")
MEMORY_FORMATS = ("channels_last", "contiguous")
ON_BAD_IMAGE = ("skip", "error")
PROGRESS = ("auto", "bar", "plain", "off")
# settings that a resumed run may change: none of them alters what the finished epochs computed
RESUME_SAFE = {
    "epochs": "more epochs continue the run (the schedule is stretched to the new length from the resumed step on)",
    "patience": "early stopping decides from the next epoch on",
    "progress": "console output only", "threads": "speed only", "eval_batch_size": "speed only",
    "compile": "speed only",
}


def setting(default: Any = MISSING, help: str = "", *, choices: Any = None, factory: Any = None) -> Any:
    """A ``TrainConfig`` field with its help text and allowed values: the single source of the CLI's flags,
    their help, their choices and the validation (``choices`` is a registry dict or a tuple)."""
    meta = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_AUG = ", ".join(n for n in AUGMENTATION_NAMES if n != "standard")


@dataclass
class TrainConfig:
    # --- data ---
    dataset: str = setting("fashion-mnist", "data set", choices=DATASETS)
    data_root: str | None = setting(None, "folder/tarball with the data (unset: find it, e.g. Debian's Fashion-MNIST)")
    image_size: int | None = setting(None, "resize images to this square size (unset: the data set's own; folder: 256)")
    val_fraction: float | None = setting(None, "held-out part of train when the source has no val split (unset: 0.1)")
    train_subset: int | None = setting(None, "keep a seeded stratified subset of N training images (quick runs)")
    eval_subset: int | None = setting(None, "cap val and test at a seeded stratified subset of N images each (quick runs)")
    on_bad_image: str = setting("skip", "what to do with an unreadable image in a folder", choices=ON_BAD_IMAGE)
    augment: str = setting("none", "none | standard (pad 4 + random crop + horizontal flip, per image) | a comma "
                           f"list of: {_AUG}")
    augment_params: str | None = setting(None, "augmentation settings NAME.KEY=VALUE, e.g. "
                                         "cutout.size=8,rotation.degrees=15,mask.p=0.3,mask.block=4")
    # --- model ---
    model: str = setting("resnet", "model family, or timm:<architecture> for any timm model", choices=MODELS)
    n: int = setting(3, "blocks per stage: 6n+2 layers (n=3: ResNet-20)")
    norm: str = setting("bn", "normalization layer", choices=NORM_NAMES)
    gn_groups: int | None = setting(None, "GroupNorm groups (unset: 8, which divides 16, 32 and 64); also evonorm_s0's")
    ghost_batch: int | None = setting(None, "gbn: samples per ghost batch (unset: 32); the batch size must be a multiple "
                                      "of it, or at most it")
    shortcut: str = setting("A", "residual shortcut when the shape changes", choices=SHORTCUTS)
    conv: str = setting("plain", "conv layers: plain, or ws = weight standardization (Qiao et al. 2019), with any norm",
                        choices=CONVS)
    activation: str = setting("relu", "activation after each norm", choices=ACTIVATION_NAMES)
    dropout: float = setting(0.0, "dropout before the classifier")
    width: int = setting(16, "compact: base width w, stage widths w/2w/2.5w (w=16, n=1: ~46k params)")
    head: str = setting("linear", "classifier head: linear | mlp:H1,H2,... (Linear-ReLU-Dropout per hidden width, "
                        "uses --dropout)")
    pretrained: str | None = setting(None, "resnet18: PATH to a torchvision resnet18 state_dict, or imagenet "
                                     "(needs internet); timm:<name>: PATH to that timm model's state_dict")
    freeze: int = setting(0, "freeze the first K stages: 1 = stem (resnet18: conv1+bn1), 2 = + stage1/layer1, ... "
                          "(resnet18 up to 5)")
    max_params: int | None = setting(None, "refuse to build a model with more parameters than this")
    sync_bn: bool = setting(True, "under DDP, synchronise batch statistics across ranks (bn, bin)")
    # --- optimisation ---
    epochs: int = setting(10, "maximum number of epochs")
    batch_size: int = setting(128, "images per optimizer step (global, over all ranks)")
    optimizer: str = setting("sgd", "optimizer", choices=OPTIMIZER_NAMES)
    lr: float = setting(0.1, "peak learning rate")
    momentum: float = setting(0.9, "SGD momentum (0 = plain SGD)")
    nesterov: bool = setting(False, "Nesterov momentum for SGD")
    weight_decay: float = setting(5e-4, "applied only to tensors with >= 2 dims (never norm affines or biases)")
    schedule: str = setting("cosine", "learning-rate schedule after the warm-up", choices=SCHEDULES)
    warmup_epochs: float = setting(0.0, "linear warm-up from 0 to lr over this many epochs")
    step_milestones: list[float] = setting(help="step schedule: fractions of training (comma-separated)",
                                           factory=lambda: [0.5, 0.75])
    step_gamma: float = setting(0.1, "step schedule: lr factor at each milestone")
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing")
    grad_clip: float | None = setting(None, "clip the gradient norm to this value (unset: off)")
    agc: float | None = setting(None, "adaptive gradient clipping factor (Brock et al. 2021; e.g. 0.01 for --model nf; "
                                "unset: off): each unit's gradient is clipped to this times its weight norm")
    patience: int | None = setting(None, "early stopping: stop after this many epochs without a better val accuracy")
    # --- runtime ---
    seed: int = setting(0, "seeds init, data order, augmentation and dropout (splits use fixed seeds); CPU runs "
                        "are deterministic")
    device: str = setting("auto", "training device", choices=DEVICES)
    precision: str = setting("fp32", "autocast precision (fp16 uses a grad scaler on CUDA)", choices=PRECISIONS)
    compile: str = setting("auto", "torch.compile the model (auto: on CUDA only)", choices=COMPILE)
    memory_format: str = setting("channels_last", "activation layout (channels_last: faster convs and norms on CPU "
                                 "and GPU, bench/bench_norms.py)", choices=MEMORY_FORMATS)
    threads: int | None = setting(None, "CPU threads for this run (unset: torch's default)")
    eval_batch_size: int = setting(512, "batch size for evaluation passes")
    probe_size: int = setting(256, "images in the fixed probe batch for feature quantiles")
    out: str | None = setting(None, "run folder (unset: runs/<dataset>-<norm>-n<n>-b<batch_size>-<augment>-s<seed>)")
    progress: str = setting("auto", "console progress", choices=PROGRESS)

    @property
    def layers(self) -> int:
        return 6 * self.n + 2

    @property
    def model_label(self) -> str:
        """How logs, titles and reports name the model: ``ResNet-20`` for the 6n+2 ResNet, else its name."""
        return f"ResNet-{self.layers}" if self.model == "resnet" else self.model

    @property
    def input_size(self) -> int:
        """The input size the data will have (``image_size``, else the data set's own)."""
        return self.image_size or DATASETS.get(self.dataset, 256)

    def run_name(self) -> str:
        if is_timm(self.model):  # n is normlab's ResNet depth: the architecture names a timm run instead
            arch = self.model.split(":", 1)[1].replace("/", "_")
            return f"{self.dataset}-{arch}-{self.norm}-b{self.batch_size}-{self.augment}-s{self.seed}"
        return f"{self.dataset}-{self.norm}-n{self.n}-b{self.batch_size}-{self.augment}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Raise a one-line NormlabError for anything impossible; return self."""

        def bad(name: str, why: str) -> None:
            raise NormlabError(f"config: {name}={getattr(self, name)!r} {why}")

        for f in fields(self):
            if f.metadata.get("choices") is not None:
                choose(f.metadata["choices"], getattr(self, f.name), f.name)
            value = getattr(self, f.name)
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                bad(f.name, "is not a finite number: give a real value (nan and inf are refused)")
        for name in ("n", "epochs", "batch_size", "eval_batch_size", "probe_size"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("image_size", "train_subset", "eval_subset", "gn_groups", "ghost_batch", "patience", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1 (or left unset)")
        if self.image_size is not None and self.image_size < min_image_size(self.model, self.norm):
            smallest = min_image_size(self.model, self.norm)
            down = MODELS[self.model].downsampling
            why = (f"{self.model} down-samples by {down}, and norm={self.norm!r} normalizes each sample over space, "
                   f"which needs at least 2x2 pixels in the last stage" if smallest > down else
                   f"{self.model} down-samples by {down} (stride-2 stages): smaller images leave its last "
                   "stage's stride-2 convolutions a single pixel")
            bad("image_size", f"is too small: {why}; use --image-size {smallest} or more")
        if self.lr <= 0:
            bad("lr", "must be > 0")
        if self.weight_decay < 0 or self.momentum < 0 or self.label_smoothing < 0 or self.dropout < 0:
            raise NormlabError("config: weight_decay, momentum, label_smoothing and dropout must be >= 0")
        if self.dropout >= 1 or self.label_smoothing >= 1:
            raise NormlabError("config: dropout and label_smoothing must be < 1")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            bad("val_fraction", "must be between 0 and 1 (exclusive)")
        if self.grad_clip is not None and self.grad_clip <= 0:
            bad("grad_clip", "must be > 0 (or left unset)")
        if self.agc is not None and self.agc <= 0:
            bad("agc", "must be > 0 (or left unset), e.g. --agc 0.01")
        if self.batch_size == 1 and needs_batch_statistics(self.norm):
            bad("batch_size", f"cannot train with norm={self.norm!r}: BatchNorm needs more than one value per "
                "channel to compute batch statistics; use --batch-size 2 or more, or --norm gn/ln/in")
        if self.gn_groups is not None and self.norm == "gn" and self.model == "resnet":
            for width in (16, 32, 64):
                if width % self.gn_groups:
                    bad("gn_groups", f"does not divide the ResNet's {width} channels; choose a divisor of 16 "
                        "(1, 2, 4, 8 or 16)")
        ghost = self.ghost_batch or 32
        if self.norm == "gbn" and self.batch_size > ghost and self.batch_size % ghost:
            bad("batch_size", f"is not a multiple of the ghost batch of {ghost} samples (norm gbn): use a batch size "
                f"that is a multiple of {ghost}, or --ghost-batch with a divisor of {self.batch_size}")
        from normlab.data.augmentations import check_augment  # torch: only when a config is validated

        check_augment(self.augment, self.augment_params)
        parse_head(self.head)
        spec = MODELS[self.model]
        if is_timm(self.model):
            if self.activation != "relu":
                bad("activation", "applies to normlab's resnet/compact only: a timm model keeps its own "
                    "activations; drop --activation")
            if self.pretrained == IMAGENET:
                bad("pretrained", "for a timm model must be a local state_dict file: normlab never downloads "
                    "timm weights (save them with torch.save(model.state_dict(), path) where timm can download)")
            if self.freeze < 0:
                bad("freeze", "must be >= 0")
        elif not 0 <= self.freeze <= spec.freeze_units:
            bad("freeze", f"is out of range for model {self.model}: use 0..{spec.freeze_units} "
                f"(stages: {spec.freeze_stages})")
        if self.pretrained is not None and not spec.pretrained:
            bad("pretrained", f"needs --model resnet18 or timm:<name>, not {self.model!r}")
        if self.max_params is not None and self.max_params < 1:
            bad("max_params", "must be >= 1 (or left unset)")
        if self.width < 1:
            bad("width", "must be >= 1")
        return self


@functools.cache
def min_image_size(model: str, norm: str) -> int:
    """The smallest input side the model uses meaningfully: its total stride (below it a stride-2 stage sees a
    single pixel), one more for norms that normalize each sample over space (instance norm, group norm with
    a channel per group): on a 1x1 last stage their output no longer depends on the input."""
    down = MODELS[model].downsampling
    return down + 1 if needs_spatial_extent(norm) else down


@functools.cache
def needs_spatial_extent(norm: str) -> bool:
    """Whether the norm's training output on 1x1 maps is the same for every input (statistics over one value),
    asked of the layer itself."""
    import torch

    from normlab.norms import make_norm

    layer = make_norm(norm, 16).train()
    with torch.no_grad():
        x = torch.randn(4, 16, 1, 1, generator=torch.Generator().manual_seed(0))
        try:
            y = layer(x)
        except NormlabError:  # the layer refuses statistics over a single value (in, ln, gn): it needs more
            return True
    return bool(torch.allclose(y, y[:1].expand_as(y), atol=1e-3))  # rounding: the inputs differ by ~1


def needs_batch_statistics(norm: str) -> bool:
    """Whether the norm normalizes with statistics over the batch (it then keeps running statistics for eval),
    asked of the layer itself (``norms.traits``), so that a new norm needs no entry here; imports torch, so it is
    asked only where the answer matters (a batch of one)."""
    from normlab.norms.traits import norm_uses_batch_statistics

    return norm_uses_batch_statistics(norm)


def parse_head(spec: str) -> list[int]:
    """``linear`` -> [], ``mlp:512,128`` -> [512, 128]."""
    spec = str(spec).strip()
    if spec == "linear":
        return []
    kind, _, widths = spec.partition(":")
    try:
        hidden = [int(w) for w in widths.split(",")] if kind == "mlp" and widths else None
    except ValueError:
        hidden = None
    if not hidden or any(h < 1 for h in hidden):
        raise NormlabError(f"config: head={spec!r} is not linear or mlp:H1,H2,... with positive hidden widths "
                           "(e.g. mlp:512,128)")
    return hidden


def check_pretrained_file(cfg: TrainConfig) -> None:
    """Fail early (one line) when ``--pretrained`` names a file that does not exist. Not part of ``validate()``:
    a finished run's saved config must stay readable after the weight file has moved."""
    if cfg.pretrained not in (None, IMAGENET) and not Path(cfg.pretrained).expanduser().is_file():
        raise NormlabError(f"config: pretrained={cfg.pretrained!r}: no such file; pass a "
                           + ("timm state_dict file" if is_timm(cfg.model) else
                              "torchvision resnet18 state_dict file or 'imagenet'"))


def resume_config(saved: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    """The saved config of a run with the changes a resume may make (``RESUME_SAFE``); anything else is refused
    with a one-line error naming the setting."""
    changes = {k: v for k, v in changes.items() if getattr(saved, k) != _coerce(k, v)}
    for name in changes:
        if name not in RESUME_SAFE:
            raise NormlabError(f"--resume: {name} cannot change in a started run (it would not be the same run); "
                               f"on resume only {', '.join(RESUME_SAFE)} can change; start a new run with --out")
    cfg = make_config(saved.to_dict(), changes, where="saved run config")
    if cfg.epochs < saved.epochs:
        raise NormlabError(f"--resume: epochs={cfg.epochs} is less than the run's {saved.epochs}: epochs can only grow")
    return cfg


# --------------------------------------------------------------------------------------------- I/O

def _field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def type_words(name: str) -> str:
    """How a message names what the setting ``name`` takes: ``a number (float)``, ``true or false``, ..."""
    kind = str(_field_types()[name])
    words = ("comma-separated numbers" if kind.startswith("list") else "true or false" if "bool" in kind
             else "a whole number (int)" if "int" in kind else "a number (float)" if "float" in kind else "text")
    return words + (" or none" if "None" in kind else "")


def _coerce(name: str, value: Any) -> Any:
    """Check a YAML/CLI value against the field's type, converting strings where unambiguous."""
    kind = str(_field_types()[name])
    if value is None:
        if "None" in kind:
            return None
        raise NormlabError(f"config: {name} cannot be empty")
    try:
        if kind.startswith("list"):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            return [float(v) for v in value]
        if "bool" in kind:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if "int" in kind:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str) and value.lower() in ("none", "null", ""):
                if "None" in kind:
                    return None
                raise ValueError
            return int(value)
        if "float" in kind:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str) and value.lower() in ("none", "null", ""):
                if "None" in kind:
                    return None
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise NormlabError(f"config: {name}={value!r} has the wrong type: expected {type_words(name)}") from None


def check_keys(data: dict[str, Any], where: str) -> None:
    names = [f.name for f in fields(TrainConfig)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key).replace("-", "_"), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `normlab train --help`"
            raise NormlabError(f"{where}: unknown setting {key!r}{hint}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise NormlabError(f"config file {path} not found: check the path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise NormlabError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise NormlabError(f"config file {path} must hold a mapping of setting: value")
    return data


def make_config(base: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                where: str = "config") -> TrainConfig:
    """Defaults <- base (e.g. YAML) <- overrides (e.g. CLI), type-checked and validated."""
    values: dict[str, Any] = {}
    for source, data in ((where, base or {}), ("command line", overrides or {})):
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        check_keys(data, source)
        values.update({k: _coerce(k, v) for k, v in data.items()})
    return TrainConfig(**values).validate()


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    base = read_yaml(path) if path else {}
    return make_config(base, {k: v for k, v in overrides.items()}, where=str(path or "config"))


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)
