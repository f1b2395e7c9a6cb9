"""The ``normlab`` command: train, study, report, evaluate, gradcam, activations, robustness, augment-preview, completion.

Every ``TrainConfig`` field is a flag (``gn_groups`` -> ``--gn-groups``) whose type, choices and help come
from the field (``normlab.config.setting``) and the registries (``normlab.registry``); flags override
``--config FILE``, which overrides the defaults. Every bad input ends in one line on stderr, exit code 2.

Nothing here imports torch at module level, so ``normlab --version`` works (and says what is missing)
where PyTorch is not installed yet.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path

from normlab.version import __version__
from normlab.errors import NormlabError

SHELLS = ("bash", "zsh")
PATH_SETTINGS = {"data_root": "PATH", "pretrained": "PATH|imagenet", "out": "DIR"}
METAVARS = {**PATH_SETTINGS, "augment": "NAME,...", "augment_params": "NAME.KEY=V,...", "head": "linear|mlp:H,..."}
SHTAB_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}  # = shtab.FILE (shtab is imported only
# by `normlab completion`)


# ---------------------------------------------------------------------------------- settings as flags

class BoolFlag(argparse.Action):
    """``--flag`` / ``--no-flag``, and ``--flag true|false`` as in YAML (the README's ``--sync-bn false``)."""

    def __init__(self, option_strings, dest, default=None, type=None, help=None, **_):
        negatives = [f"--no-{o[2:]}" for o in option_strings if o.startswith("--")]
        super().__init__(option_strings + negatives, dest, nargs="?", default=default, type=type,
                         metavar="true|false", help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string and option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        else:
            setattr(namespace, self.dest, True if values is None else values)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class HelpFormatter(argparse.HelpFormatter):
    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):  # "--flag [true|false], --no-flag" instead of a value on both
            positive, negative = action.option_strings[0], action.option_strings[-1]
            return f"{positive} [{action.metavar}], {negative}"
        return super()._format_action_invocation(action)


def _typed(name: str):
    """An argparse ``type`` that checks a value like the config file's loader does, with a one-line message."""
    from normlab.config import _coerce, type_words

    def convert(text: str):
        try:
            return _coerce(name, text)
        except NormlabError:
            raise argparse.ArgumentTypeError(f"wrong type: expected {type_words(name)}, got {text!r}") from None

    convert.__name__ = name
    return convert


def _describe(choices) -> str:
    """``name: what it is`` for registries that describe their entries (models, shortcuts)."""
    if not isinstance(choices, Mapping):
        return ""
    described = [(k, v if isinstance(v, str) else getattr(v, "help", None)) for k, v in choices.items()]
    if not all(d for _, d in described):
        return ""
    return " (" + "; ".join(f"{k}: {d}" for k, d in described) + ")"


def _metavar(f) -> str | None:
    kind = str(f.type)
    if f.name in METAVARS:
        return METAVARS[f.name]
    return ("X,Y,..." if kind.startswith("list") else "N" if "int" in kind else "X" if "float" in kind
            else "TEXT")


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def add_setting_flags(parser: argparse.ArgumentParser, title: str, skip: tuple[str, ...] = (),
                      preset: tuple[str, dict] | None = None) -> None:
    """One ``--flag`` per ``TrainConfig`` field. Defaults stay None here, so that only what the command line
    sets overrides the config file or preset; the help shows the value that will be used: the preset's
    (``preset`` = (its name, its ``train:`` mapping)) where it sets one, else TrainConfig's."""
    from normlab.config import TrainConfig

    group = parser.add_argument_group(title)
    cfg = TrainConfig()
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        shown = _shown(default)
        if f.name == "out":
            shown = f"runs/{cfg.run_name()} for these defaults"
        if preset is not None and f.name in preset[1]:
            shown = f"{_shown(preset[1][f.name])} (preset {preset[0]})"
        choices = f.metadata.get("choices")
        help_text = f"{f.metadata.get('help', '')}{_describe(choices)} [default: {shown}]"
        # --depth: the same as --n, for torchrun, whose own parser rejects `--n` as an ambiguous abbreviation
        names = [f"--{f.name.replace('_', '-')}"] + (["--depth"] if f.name == "n" else [])
        if str(f.type) == "bool":
            group.add_argument(*names, dest=f.name, action=BoolFlag, type=_typed(f.name), help=help_text)
            continue
        action = group.add_argument(*names, dest=f.name, default=None, type=_typed(f.name), help=help_text,
                                    # a dict stays a dict: MODELS answers `in` for every timm:<name>
                                    choices=choices if isinstance(choices, dict) or choices is None else list(choices),
                                    metavar=None if choices is not None else _metavar(f))
        if f.name in PATH_SETTINGS:
            action.complete = SHTAB_FILE


def config_overrides(args: argparse.Namespace) -> dict:
    from normlab.config import TrainConfig

    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def _comma_list(registry_name: str):
    """An argparse ``type`` for a comma-separated list of registry names (``--norms bn,gn``)."""

    def convert(text: str) -> list[str]:
        from normlab import registry

        names = [t.strip() for t in text.split(",") if t.strip()]
        allowed = getattr(registry, registry_name)
        keywords = (registry.ALL_NORMS, registry.BATCH_STAT_NORMS) if registry_name == "NORM_NAMES" else ()
        for name in names:
            if name not in allowed and name not in keywords:
                close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.4)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(allowed)}{hint}")
        return names

    convert.__name__ = registry_name.lower()
    return convert


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ------------------------------------------------------------------------------------------- parser

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``normlab: error: ...``) and did-you-mean hints drawn from the
    command actually given (not from every command's flags)."""

    def error(self, message: str):  # type: ignore[override]
        message = " ".join(message.split())
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            flags = [o for a in self._command_parser()._actions for o in a.option_strings]
            hints = []
            for token in m.group(1).split():
                if token.startswith("-"):
                    close = difflib.get_close_matches(token.split("=")[0], flags, n=1)
                    if close and close[0] != token.split("=")[0]:
                        hints.append(f"{token}: did you mean {close[0]}?")
            if hints:
                message += f" ({'; '.join(hints)})"
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            options = re.findall(r"'([^']*)'", m.group(2)) or [o.strip() for o in m.group(2).split(",")]
            close = difflib.get_close_matches(m.group(1), options, n=1, cutoff=0.4)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        self.exit(2, f"normlab: error: {message}; see `{self._command_parser().prog} --help`\n")

    def _command_parser(self) -> argparse.ArgumentParser:
        """The parser of the subcommand on the command line (the top-level one sees every error first)."""
        argv = getattr(self, "argv", None) or []
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is not None:
            for token in argv:
                if token in sub.choices:
                    return sub.choices[token]
        return self

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line. ``argv`` (optional) lets ``study --help`` show the values of the preset that
    the command line names."""
    parser = Parser(prog="normlab", description="normalization layers (BN, IN, BIN, LN, GN) in CIFAR-style ResNets: "
                    "train one model, run a whole study and its report, look inside runs",
                    formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)  # type: ignore[method-assign]
    p = sub.add_parser("train", help="train one model; writes a run folder")
    from normlab.config import RESUME_SAFE

    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last.pt, with its saved settings; only "
                        f"{', '.join('--' + k.replace('_', '-') for k in RESUME_SAFE)} may change (epochs can only "
                        "grow) [default: none: a new run]")
    p.add_argument("--force", action="store_true", help="overwrite an output folder that already holds a run; with "
                   "--resume: start that run over from epoch 1 with its saved settings [default: off]")
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (flags override it) [default: none]")
    add_setting_flags(p, "settings (override the config file)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("study", help="run a whole comparison (norms, batch sizes, augmentation) and write its report")
    add_study_flags(p, _named_preset(argv or []))
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="(re)write the report of a study folder from its saved runs")
    p.add_argument("study_dir", metavar="STUDY_DIR", help="a folder made by `normlab study`")
    p.add_argument("--device", default="cpu", help="device for the missing galleries and Grad-CAM (cpu, cuda, mps, auto)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("gradcam", help="Grad-CAM galleries for one run folder; with several, the same images "
                                       "explained by every run side by side")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="+", help="folders made by `normlab train`")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--classes", help="comma-separated class names (default: every class, capped at --max-classes)")
    p.add_argument("--per-class", type=int, default=5, metavar="N",
                   help="correct and misclassified images per class [default: 5]")
    p.add_argument("--max-classes", type=int, default=10, metavar="N",
                   help="classes shown when --classes is not given [default: 10]")
    p.add_argument("--split", default="val", choices=("val", "test", "train"), help="images from this split [default: val]")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/gradcam; with several runs: "
                                                "gradcam_compare next to the first)")
    p.set_defaults(func=cmd_gradcam)

    add_evaluate_parser(sub)

    p = sub.add_parser("augment-preview", help="a grid of one image under each augmentation of the catalogue")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="FILE", help="the image to augment")
    src.add_argument("--dataset", type=_typed("dataset"), help="take the first training image of this data set "
                     "(with --data-root)")
    p.add_argument("--data-root", metavar="PATH", help="data folder/tarball for --dataset")
    p.add_argument("--image-size", type=int, metavar="N", help="resize the image to this square size first")
    p.add_argument("--augment", type=_comma_list("AUGMENTATIONS"), metavar="NAME,...",
                   help="comma-separated augmentations (default: the whole catalogue)")
    p.add_argument("--augment-params", metavar="NAME.KEY=V,...", help="settings, e.g. cutout.size=8,rotation.degrees=15")
    p.add_argument("--samples", type=int, default=6, metavar="N", help="random draws per augmentation (columns) [default: 6]")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random draws [default: 0]")
    p.add_argument("--out", metavar="FILE", default="augment-preview.png", help="output PNG [default: augment-preview.png]")
    p.set_defaults(func=cmd_augment_preview)

    p = sub.add_parser("activations", help="feature maps after the stem and each stage of a run for one image")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder made by `normlab train`")
    p.add_argument("--image", metavar="FILE", required=True, help="image file (resized/normalised like the run's data)")
    p.add_argument("--channels", type=int, default=16, metavar="N", help="feature maps per figure (first N channels) "
                   "[default: 16]")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/activations)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.set_defaults(func=cmd_activations)

    add_robustness_parser(sub)

    p = sub.add_parser("completion", help="print a shell completion script: eval \"$(normlab completion bash)\"")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    p.set_defaults(func=cmd_completion)
    return parser


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a run's weights on its own data or another data set of the same "
                                        "classes (scores + confusion matrix); never retrains")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder made by `normlab train`")
    p.add_argument("--data-root", metavar="PATH", help="folder/tarball of the data to evaluate on [default: the run's]"
                   ).complete = SHTAB_FILE  # type: ignore[attr-defined]
    p.add_argument("--dataset", help="kind of that data (fashion-mnist, cifar10, folder) [default: the run's]")
    p.add_argument("--split", default="test", choices=("test", "val", "train"), help="split to score [default: test]")
    p.add_argument("--weights", default="best", choices=("best", "last"),
                   help="best.pt (best val accuracy) or last.pt [default: best]")
    p.add_argument("--eval-subset", type=int, metavar="N",
                   help="score a stratified subset of N images, 0 = every image [default: the run's --eval-subset]")
    p.add_argument("--out", metavar="DIR", help="output folder [default: RUN_DIR/eval]")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto [default: cpu]")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from normlab.analysis.evaluate import evaluate_run

    r = evaluate_run(_existing(args.run_dir, "run folder"), data_root=args.data_root, dataset=args.dataset,
                     split=args.split, which=args.weights, eval_subset=args.eval_subset, out=args.out,
                     device=args.device)
    print(f"{r['split']} of {r['source']}: acc {r['acc']:.4f}, macro-F1 {r['macro_f1']:.4f} "
          f"({r['images']} images, {r['weights']})")
    print(r["json"])
    print(r["figure"])
    return 0


DEFAULT_PRESET = "quick"


def _named_preset(argv: list[str]) -> str:
    """The preset or study file named on a ``normlab study`` command line (``quick`` when none is)."""
    for i, token in enumerate(argv):
        for flag in ("--preset", "--config"):
            if token == flag and i + 1 < len(argv):
                return argv[i + 1]
            if token.startswith(flag + "="):
                return token.split("=", 1)[1]
    return DEFAULT_PRESET


def add_study_flags(p: argparse.ArgumentParser, preset: str = DEFAULT_PRESET) -> None:
    """The study command's flags, in groups: the study file, the study's own settings, how runs are executed,
    and the train settings shared by every run. A new executor option goes into the ``execution`` group.
    Every option states the value that will be used: the preset's (``preset``) where it sets one."""
    from normlab.study.plan import StudyConfig, load_preset, preset_names

    try:
        study_values, train_values, _ = load_preset(preset)
        label = Path(preset).name if Path(preset).suffix else preset
    except NormlabError:  # a bad name is reported when the command runs; the help still works
        study_values, train_values, label = {}, {}, None
    defaults = StudyConfig()

    def study_default(key: str, fallback=None) -> str:
        if key in study_values:
            return f"{_shown(study_values[key])} (preset {label})"
        return _shown(getattr(defaults, key)) if fallback is None else fallback

    spec = p.add_argument_group("what to run")
    which = spec.add_mutually_exclusive_group()
    which.add_argument("--preset", metavar="NAME|FILE",
                       help=f"a preset ({', '.join(preset_names())}) or a YAML study file [default: {DEFAULT_PRESET}]")
    which.add_argument("--config", metavar="FILE", help="a YAML study file (`study:` and `train:` parts), like "
                       "--preset FILE [default: none: the preset]")
    spec.add_argument("--out", metavar="DIR", help="study folder [default: studies/<the study's name>]")
    own = p.add_argument_group("study settings (override the preset's `study:` part)")
    own.add_argument("--seeds", type=int, metavar="K", help="seeds per cell (mean ± std in the tables when > 1) "
                     f"[default: {study_default('seeds')}]")
    own.add_argument("--norms", type=_comma_list("NORM_NAMES"), metavar="NAME,...",
                     help=f"norms compared; `all` is every norm [default: {study_default('norms')}]")
    own.add_argument("--classes", type=_names, metavar="NAME,...", help="class names for Grad-CAM "
                     f"[default: {study_default('gradcam_classes', 'every class, capped')}]")
    run = p.add_argument_group("execution")
    run.add_argument("--jobs", type=int, default=1, metavar="J", help="runs at once: one per visible GPU, or J CPU "
                     "processes with the cores split between them [default: 1]")
    run.add_argument("--force", action="store_true", help="accept a study folder made with other settings "
                     "[default: off]")
    run.add_argument("--plan-only", action="store_true",
                     help="write the plan (plan/<run>.yaml) and print one `normlab train` command per run, e.g. for "
                          "a cluster [default: off]")
    from normlab.study.executors import add_executor_flags  # stdlib only: cheap to import

    add_executor_flags(p)
    title = "train settings shared by every run (override the preset's `train:` part"
    title += f"; the defaults shown are preset {label}'s where it sets them)" if label else ")"
    add_setting_flags(p, title, skip=("out",), preset=(label, train_values) if label else None)
    if label and study_values.get("batch_norms", defaults.batch_norms) and study_values.get("batch_sizes",
                                                                                         defaults.batch_sizes):
        for action in p._actions:  # the batch-size cells have a cap of their own, which an explicit flag replaces
            if action.dest in ("epochs", "patience"):
                key = "batch_max_epochs" if action.dest == "epochs" else "batch_patience"
                action.help += (f"; batch-size cells: {study_default(key)} ({key}), unless --{action.dest} is given")


# ----------------------------------------------------------------------------------------- commands

def cmd_augment_preview(args: argparse.Namespace) -> int:
    from normlab.data.augmentations import preview_augmentations

    if args.samples < 1 or (args.image_size is not None and args.image_size < 1):
        raise NormlabError("--samples and --image-size must be >= 1")
    if args.image:
        from normlab.analysis.activations import read_image

        img = read_image(args.image, size=args.image_size)
    else:
        from normlab.config import make_config
        from normlab.data import load_data

        over = {"dataset": args.dataset, "data_root": args.data_root, "image_size": args.image_size}
        data = load_data(make_config({k: v for k, v in over.items() if v is not None}, where="augment-preview"))
        img = data.train_x[0]
    print(preview_augmentations(img, args.out, args.augment, args.augment_params, samples=args.samples, seed=args.seed))
    return 0


def cmd_activations(args: argparse.Namespace) -> int:
    from normlab.analysis.activations import run_activations

    files = run_activations(_existing(args.run_dir, "run folder"), args.image, args.out, channels=args.channels,
                            device=args.device)
    for entry in files.values():
        print(entry["file"])
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from normlab.study import run_study
    from normlab.study.executors import options_from_args

    study_over = {k: v for k, v in {"seeds": args.seeds, "gradcam_classes": args.classes,
                                     "norms": args.norms}.items() if v is not None}
    report = run_study(args.config or args.preset or "quick", args.out, study_overrides=study_over,
                       train_overrides=config_overrides(args), jobs=args.jobs, force=args.force,
                       plan_only=args.plan_only, executor_options=options_from_args(args))
    print(report)
    return 0


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise NormlabError(f"{what} {p} does not exist: give the folder made by normlab")
    return p


def cmd_report(args: argparse.Namespace) -> int:
    from normlab.report.build import build_report
    from normlab.study import analyse_study

    study_dir = _existing(args.study_dir, "study folder")
    if not (study_dir / "plan.json").is_file():
        raise NormlabError(f"{study_dir} is not a study folder (no plan.json): run `normlab study --out {study_dir}` first")
    from normlab.study import study_lock

    with study_lock(study_dir):  # not while a study (or another report) writes the folder
        analyse_study(study_dir, device=args.device)
        md, html = build_report(study_dir)
    print(html)
    return 0


def cmd_gradcam(args: argparse.Namespace) -> int:
    from normlab.analysis.gradcam import compare_gradcam, run_gradcam

    run_dirs = [_existing(r, "run folder") for r in args.run_dir]
    if len(run_dirs) > 1:
        out = Path(args.out) if args.out else run_dirs[0].parent / "gradcam_compare"
        labels = [r.name for r in run_dirs]
        if len(set(labels)) != len(labels):
            labels = [str(r) for r in run_dirs]
        index = compare_gradcam(run_dirs, out, labels=labels, classes=_names(args.classes) if args.classes else None, split=args.split,
                                max_classes=args.max_classes, device=args.device)
    else:
        run_dir = run_dirs[0]
        index = run_gradcam(run_dir, classes=_names(args.classes) if args.classes else None, per_class=args.per_class, split=args.split,
                            max_classes=args.max_classes, out_dir=args.out, device=args.device)
        out = Path(args.out) if args.out else run_dir / "gradcam"
    for name, entry in index["classes"].items():
        print(out / entry["file"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from normlab.config import check_pretrained_file, load_config
    from normlab.train.loop import train

    if args.resume:
        if args.config:
            raise NormlabError("--resume takes the run's saved config; drop --config (or start a new run with --out)")
        changes = config_overrides(args)
        if changes and (Path(args.resume) / "summary.json").is_file():
            raise NormlabError(f"--resume {args.resume}: the run is finished (summary.json exists), so there is "
                               f"nothing to continue with {', '.join(sorted(changes))}; start a new run with --out")
        train(None, resume_dir=args.resume, changes=changes, force=args.force)  # type: ignore[arg-type]
        return 0
    cfg = load_config(args.config, **config_overrides(args))
    check_pretrained_file(cfg)  # before any data is loaded
    out = train(cfg, force=args.force)
    print(out)
    return 0


def add_robustness_parser(sub) -> None:
    """``normlab robustness RUN...``: corruption robustness, test-time statistics and calibration of runs."""
    p = sub.add_parser("robustness", help="evaluate runs' best weights on corrupted test images (15 corruptions × "
                                          "severities), with re-estimated statistics, and their calibration")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="+", help="folders made by `normlab train`")
    p.add_argument("--corruptions", type=_names, metavar="NAME,...",
                   help="corruptions to apply [default: every one that fits the data set]")
    p.add_argument("--severities", type=_names, default=["1", "2", "3", "4", "5"], metavar="S,...",
                   help="severities 1-5 [default: 1,2,3,4,5]")
    p.add_argument("--baseline", metavar="RUN_DIR", help="the run that normalizes CE and mCE [default: the first "
                                                        "given run whose norm is torch_bn; none: mean errors only]")
    p.add_argument("--no-test-time", dest="test_time", action="store_false",
                   help="skip re-estimated and prior-mixed statistics and the batch-statistics sweep")
    p.add_argument("--prior-n", type=int, default=16, metavar="N", help="prior strength N of the mixed statistics "
                                                                        "[default: 16]")
    p.add_argument("--batch-stats-images", type=int, metavar="N",
                   help="images of the clean batch-statistics sweep [default: the whole split]")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.set_defaults(func=cmd_robustness)


def cmd_robustness(args: argparse.Namespace) -> int:
    from normlab import runfolder
    from normlab.analysis.calibration import run_calibration
    from normlab.analysis.galleries import load_run
    from normlab.analysis.robustness import check_severities, normalize_runs, run_robustness

    severities = check_severities(args.severities)  # before any run is loaded
    runs = [_existing(r, "run folder") for r in args.run_dir]
    baseline = _existing(args.baseline, "baseline run folder") if args.baseline else None
    results = {}
    for run_dir in runs + ([baseline] if baseline and baseline not in runs else []):
        loaded = load_run(run_dir, args.device)
        results[str(run_dir)] = run_robustness(run_dir, corruptions=args.corruptions, severities=severities,
                                               test_time=args.test_time, prior_n=args.prior_n, device=args.device,
                                               batch_stats_images=args.batch_stats_images, loaded=loaded)
        results[str(run_dir)]["calibration"] = run_calibration(run_dir, loaded=loaded)
    base = [str(baseline)] if baseline else [k for k, v in results.items() if v["norm"] == "torch_bn"][:1]
    label = f"{results[base[0]]['norm']} ({Path(base[0]).name})" if base else ""
    for key, res in normalize_runs(results, base, label).items():
        cal = res.pop("calibration", {})
        if res.get("normalized"):
            runfolder.write_robustness(key, res)
        n = res.get("normalized") or {}
        acc = [a for sev in res["accuracy"].values() for a in sev.values()]
        adapted = [a for sev in (res.get("adapted") or {}).values() for a in sev.values()]
        print(f"{key}: clean {res['clean']['acc']:.4f}, corrupted {sum(acc) / len(acc):.4f}"
              + (f", re-estimated {sum(adapted) / len(adapted):.4f}" if adapted else "")
              + (f", mCE {n['mce']:.3f}, relative mCE {n['relative_mce']:.3f}" if n else "")
              + "".join(f", {split} ECE {c['ece']:.4f}" for split, c in cal.items())
              + f" -> {Path(key) / runfolder.ROBUSTNESS}")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    try:
        import shtab
    except ImportError:
        raise NormlabError("shell completion needs shtab: pip install shtab") from None
    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


# -------------------------------------------------------------------------------------------- main

def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as ``normlab: warning: ...`` on one line, without the source line Python prints."""
    text = " ".join(str(message).split()).removeprefix("normlab: ")
    print(f"normlab: warning: {text}", file=file or sys.stderr)


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell tool reports when its reader went away (`normlab ... | head`)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every outcome is a return code (0, 2 for a usage or input error, 130 interrupted,
    141 when whoever reads the output stopped reading)."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe is often noticed only here
        return code
    except BrokenPipeError:
        # the reader (head, less, ...) has gone: nothing more to say to it, and nothing to say about it. Point
        # stdout at /dev/null so that the interpreter's own flush at exit does not fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (e.g. captured by a test)
            pass
        return SIGPIPE_EXIT


def _main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else list(argv)
    if args_in[:1] in (["--version"], ["-V"]):  # answered without importing torch
        print(f"normlab {__version__}")
        return 0
    try:
        parser = build_parser(args_in)
    except ImportError as exc:  # the parser's choices come from the registries, which need torch
        need = ("PyTorch: pip install 'torch>=2.4' 'torchvision>=0.19' (or the build for your GPU from pytorch.org)"
                if exc.name in ("torch", "torchvision") else "its dependencies: pip install normlab installs them")
        print(f"normlab: error: {exc}; normlab needs {need}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(args_in)
    except SystemExit as exc:  # --help, --version and usage errors: a return code like every other outcome
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except NormlabError as exc:
        print(f"normlab: error: {_for_command(exc, args)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a full disk reported by any layer (torch, TensorBoard, matplotlib): one line too
        from normlab.errors import DiskFull, disk_full_cause

        cause = disk_full_cause(exc)
        if cause is None:
            raise
        full = DiskFull(cause.filename or getattr(args, "out", None) or getattr(args, "resume", None))
        print(f"normlab: error: {_for_command(full, args)}", file=sys.stderr)
        return full.exit_code
    except KeyboardInterrupt:
        print("normlab: interrupted; finished epochs are saved (resume with `normlab train --resume RUN_DIR`)",
              file=sys.stderr)
        return 130


def _for_command(exc: NormlabError, args: argparse.Namespace) -> NormlabError:
    """A full disk met outside ``normlab train`` (a study's or a report's own files): rerun that command."""
    from normlab.errors import DiskFull

    if isinstance(exc, DiskFull) and exc.advice == DiskFull.RESUME and args.command != "train":
        return DiskFull(exc.path, f"free space and rerun the same normlab {args.command} command")
    return exc


def entry() -> int:
    """The console script: ``main`` with warnings printed on one line (not in ``main`` itself, so a caller
    such as a test keeps its own warning handling)."""
    warnings.showwarning = _one_line_warning
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
