"""The run configuration: one dataclass, a comment per field, validated at the edge.

A config is built from defaults, then a YAML file (``--config``), then command-line flags, and saved as
``config.yaml`` in every run folder and inside every checkpoint, so a run can be rebuilt exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from normlab.errors import NormlabError

NORM_NAMES = ("bn", "in", "bin", "ln", "gn", "nn", "torch_bn")
DATASETS = ("fashion-mnist", "cifar10", "folder")


@dataclass
class TrainConfig:
    # --- data ---
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | folder
    data_root: str | None = None  # folder/tarball with the data; None = find it (Debian's Fashion-MNIST, ...)
    image_size: int | None = None  # resize folder images to this square size (None = data set's own; folder: 256)
    val_fraction: float | None = None  # held-out part of train when the source has no val split (None = 0.1)
    train_subset: int | None = None  # keep a seeded stratified subset of N training images (quick runs)
    eval_subset: int | None = None  # cap val and test at a seeded stratified subset of N images each (quick runs)
    on_bad_image: str = "skip"  # skip | error: what to do with an unreadable image in a folder
    augment: str = "none"  # none | standard (pad 4 + random crop + horizontal flip, per image) | comma list of: crop, hflip, vflip, rotation, jitter, resized_crop, cutout, blur, saltpepper, mask
    augment_params: str | None = None  # augmentation settings NAME.KEY=VALUE, e.g. cutout.size=8,rotation.degrees=15,mask.p=0.3,mask.block=4
    # --- model ---
    model: str = "resnet"  # resnet (the 6n+2 CIFAR ResNet) | resnet18 (torchvision, any norm) | compact (narrow ResNet, see --width)
    n: int = 3  # blocks per stage: 6n+2 layers (n=3 -> ResNet-20)
    norm: str = "bn"  # bn | in | bin | ln | gn | nn | torch_bn
    gn_groups: int | None = None  # GroupNorm groups (None = 8, which divides 16, 32 and 64)
    shortcut: str = "A"  # A: zero-padding identity (paper) | B: 1x1 conv + norm
    activation: str = "relu"  # relu | leaky_relu | elu | gelu | silu | tanh | sigmoid
    dropout: float = 0.0  # dropout before the classifier
    width: int = 16  # compact: base width w, stage widths w/2w/2.5w (w=16, n=1: ~46k params)
    head: str = "linear"  # classifier head: linear | mlp:H1,H2,... (Linear-ReLU-Dropout per hidden width, uses --dropout)
    pretrained: str | None = None  # resnet18: PATH to a torchvision resnet18 state_dict, or imagenet (needs internet)
    freeze: int = 0  # freeze the first K stages: 1 = stem (resnet18: conv1+bn1), 2 = + stage1/layer1, ... (resnet18 up to 5)
    max_params: int | None = None  # refuse to build a model with more parameters than this
    sync_bn: bool = True  # under DDP, synchronise batch statistics across ranks (bn, bin)
    # --- optimisation ---
    epochs: int = 10  # maximum number of epochs
    batch_size: int = 128  # images per optimizer step (global, over all ranks)
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD momentum (0 = plain SGD)
    nesterov: bool = False  # Nesterov momentum for SGD
    weight_decay: float = 5e-4  # applied only to tensors with >= 2 dims (never norm affines or biases)
    schedule: str = "cosine"  # cosine | step | onecycle | constant
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr over this many epochs
    step_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step schedule: fractions of training
    step_gamma: float = 0.1  # step schedule: lr factor at each milestone
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    grad_clip: float | None = None  # clip the gradient norm to this value (None = off)
    patience: int | None = None  # early stopping: stop after this many epochs without a better val accuracy
    # --- runtime ---
    seed: int = 0  # seeds init, data order, augmentation and dropout (splits use fixed seeds); CPU runs are deterministic
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 uses a grad scaler on CUDA)
    compile: str = "auto"  # auto | on | off: torch.compile the model (auto: on CUDA only)
    memory_format: str = "channels_last"  # channels_last | contiguous: activation layout (channels_last: faster convs and norms on CPU and GPU, bench/bench_norms.py)
    threads: int | None = None  # CPU threads for this run (None = torch's default)
    eval_batch_size: int = 512  # batch size for evaluation passes
    probe_size: int = 256  # images in the fixed probe batch for feature quantiles
    out: str | None = None  # run folder (None = runs/<dataset>-<norm>-n<n>-s<seed>)
    progress: str = "auto"  # auto | bar | plain | off

    @property
    def layers(self) -> int:
        return 6 * self.n + 2

    @property
    def model_label(self) -> str:
        """How logs, titles and reports name the model: ``ResNet-20`` for the 6n+2 ResNet, else its name."""
        return f"ResNet-{self.layers}" if self.model == "resnet" else self.model

    def run_name(self) -> str:
        return f"{self.dataset}-{self.norm}-n{self.n}-b{self.batch_size}-{self.augment}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Raise a one-line NormlabError for anything impossible; return self."""

        def bad(name: str, why: str) -> None:
            raise NormlabError(f"config: {name}={getattr(self, name)!r} {why}")

        choices = {
            "dataset": DATASETS, "norm": NORM_NAMES, "optimizer": ("sgd", "adam", "adamw"),
            "schedule": ("cosine", "step", "onecycle", "constant"),
            "device": ("auto", "cpu", "cuda", "mps"), "precision": ("fp32", "bf16", "fp16"),
            "compile": ("auto", "on", "off"), "memory_format": ("channels_last", "contiguous"), "on_bad_image": ("skip", "error"), "shortcut": ("A", "B"),
            "model": ("resnet", "resnet18", "compact"), "progress": ("auto", "bar", "plain", "off"),
            "activation": ("relu", "leaky_relu", "elu", "gelu", "silu", "tanh", "sigmoid"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.4)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                bad(name, f"is not one of {', '.join(map(str, allowed))}{hint}")
        for name in ("n", "epochs", "batch_size", "eval_batch_size", "probe_size"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("image_size", "train_subset", "eval_subset", "gn_groups", "patience", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1 (or left unset)")
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
        if self.batch_size == 1 and self.norm in ("bn", "bin", "torch_bn"):
            bad("batch_size", f"cannot train with norm={self.norm!r}: BatchNorm needs more than one value per "
                "channel to compute batch statistics; use --batch-size 2 or more, or --norm gn/ln/in")
        if self.gn_groups is not None and self.norm == "gn" and self.model == "resnet":
            for width in (16, 32, 64):
                if width % self.gn_groups:
                    bad("gn_groups", f"does not divide the ResNet's {width} channels; choose a divisor of 16 "
                        "(1, 2, 4, 8 or 16)")
        from normlab.models.transfer import validate_workbench  # augment, head, freeze, pretrained, budget

        validate_workbench(self)
        return self


# --------------------------------------------------------------------------------------------- I/O

def _field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


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
        raise NormlabError(f"config: {name}={value!r} has the wrong type; expected {kind.replace('typing.', '')}") from None


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
        raise NormlabError(f"config file {path} not found: check the path (presets live in configs/)")
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
