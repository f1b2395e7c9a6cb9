"""The ``normlab`` command: ``train`` (one run); every bad input ends in one line on stderr, exit code 2.

Every ``TrainConfig`` field is a flag (``gn_groups`` -> ``--gn-groups``) whose help is the field's comment;
flags override ``--config FILE`` which overrides the defaults.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from normlab.config import TrainConfig
from normlab.errors import NormlabError


def _field_comments() -> dict[str, str]:
    """``name: type = default  # comment`` lines of TrainConfig -> {name: comment}."""
    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config field; values stay strings here and are type-checked by ``make_config``."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (flags override it)")
    comments = _field_comments()
    group = parser.add_argument_group("settings (override the config file)")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        # --depth: the same as --n, for torchrun, whose own parser rejects `--n` as an ambiguous abbreviation
        names = [f"--{f.name.replace('_', '-')}"] + (["--depth"] if f.name == "n" else [])
        group.add_argument(*names, dest=f.name, default=None, metavar="V",
                           help=f"{comments.get(f.name, '')} [default: {default}]")


def config_overrides(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``normlab: error: ...``) and a did-you-mean for unknown flags."""

    def error(self, message: str):  # type: ignore[override]
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            flags = [o for a in self._actions for o in a.option_strings]
            for sub in self._subparsers._group_actions if self._subparsers else []:
                for p in getattr(sub, "choices", {}).values():
                    flags += [o for a in p._actions for o in a.option_strings]
            close = difflib.get_close_matches(m.group(1).split("=")[0], flags, n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
        self.exit(2, f"normlab: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="normlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    p = sub.add_parser("train", help="train one model; writes a run folder")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--force", action="store_true", help="overwrite an output folder that already holds a run")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("study", help="run a whole comparison (norms, batch sizes, augmentation) and write its report")
    p.add_argument("--preset", default="quick", help="preset name in configs/ (quick, cifar10-paper, birds) or a YAML path")
    p.add_argument("--out", metavar="DIR", help="study folder (default: studies/<preset name>)")
    p.add_argument("--seeds", type=int, help="seeds per cell (mean ± std in the tables when > 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once: one per visible GPU, or CPU processes")
    p.add_argument("--classes", help="comma-separated class names for Grad-CAM (default: every class, capped)")
    p.add_argument("--norms", help="comma-separated norms to compare (default: all seven)")
    p.add_argument("--force", action="store_true", help="accept a study folder made with other settings")
    p.add_argument("--plan-only", action="store_true",
                   help="write the plan (plan/<run>.yaml) and print one `normlab train` command per run, e.g. for a cluster")
    group = p.add_argument_group("train settings shared by every run (override the preset)")
    for f in fields(TrainConfig):
        if f.name != "out":
            group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar="V")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="(re)write the report of a study folder from its saved runs")
    p.add_argument("study_dir", metavar="STUDY_DIR")
    p.add_argument("--device", default="cpu", help="device for the missing galleries and Grad-CAM (cpu, cuda, mps, auto)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("gradcam", help="Grad-CAM galleries for one run folder; with several, the same images "
                                       "explained by every run side by side")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="+")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--classes", help="comma-separated class names (default: every class, capped at --max-classes)")
    p.add_argument("--per-class", type=int, default=5, help="correct and misclassified images per class")
    p.add_argument("--max-classes", type=int, default=10)
    p.add_argument("--split", default="val", choices=("val", "test", "train"))
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/gradcam; with several runs: "
                                                "gradcam_compare next to the first)")
    p.set_defaults(func=cmd_gradcam)

    p = sub.add_parser("augment-preview", help="a grid of one image under each augmentation of the catalogue")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="FILE", help="the image to augment")
    src.add_argument("--dataset", help="take the first training image of this data set (with --data-root)")
    p.add_argument("--data-root", metavar="DIR", help="data folder/tarball for --dataset")
    p.add_argument("--image-size", type=int, help="resize the image to this square size first")
    p.add_argument("--augment", help="comma-separated augmentations (default: the whole catalogue)")
    p.add_argument("--augment-params", help="settings, e.g. cutout.size=8,rotation.degrees=15")
    p.add_argument("--samples", type=int, default=6, help="random draws per augmentation (columns)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="FILE", default="augment-preview.png", help="output PNG")
    p.set_defaults(func=cmd_augment_preview)

    p = sub.add_parser("activations", help="feature maps after the stem and each stage of a run for one image")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--image", metavar="FILE", required=True, help="image file (resized/normalised like the run's data)")
    p.add_argument("--channels", type=int, default=16, help="feature maps per figure (first N channels)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/activations)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.set_defaults(func=cmd_activations)
    return parser


def cmd_augment_preview(args: argparse.Namespace) -> int:
    from normlab.data.augmentations import parse_spec, preview_augmentations

    if args.samples < 1 or (args.image_size is not None and args.image_size < 1):
        raise NormlabError("--samples and --image-size must be >= 1")
    names = parse_spec(args.augment) if args.augment else None
    if args.image:
        from normlab.analysis.activations import read_image

        img = read_image(args.image, size=args.image_size)
    else:
        from normlab.config import make_config
        from normlab.data import load_data

        over = {"dataset": args.dataset, "data_root": args.data_root, "image_size": args.image_size}
        data = load_data(make_config({k: v for k, v in over.items() if v is not None}, where="augment-preview"))
        img = data.train_x[0]
    print(preview_augmentations(img, args.out, names, args.augment_params, samples=args.samples, seed=args.seed))
    return 0


def cmd_activations(args: argparse.Namespace) -> int:
    from normlab.analysis.activations import run_activations

    files = run_activations(_existing(args.run_dir, "run folder"), args.image, args.out, channels=args.channels,
                            device=args.device)
    for entry in files.values():
        print(entry["file"])
    return 0


def _split_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def cmd_study(args: argparse.Namespace) -> int:
    from normlab.study import run_study

    study_over = {k: v for k, v in {"seeds": args.seeds, "gradcam_classes": _split_list(args.classes),
                                     "norms": _split_list(args.norms)}.items() if v is not None}
    report = run_study(args.preset, args.out, study_overrides=study_over, train_overrides=config_overrides(args),
                       jobs=args.jobs, force=args.force, plan_only=args.plan_only)
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
        index = compare_gradcam(run_dirs, out, labels=labels, classes=_split_list(args.classes), split=args.split,
                                max_classes=args.max_classes, device=args.device)
    else:
        run_dir = run_dirs[0]
        index = run_gradcam(run_dir, classes=_split_list(args.classes), per_class=args.per_class, split=args.split,
                            max_classes=args.max_classes, out_dir=args.out, device=args.device)
        out = Path(args.out) if args.out else run_dir / "gradcam"
    for name, entry in index["classes"].items():
        print(out / entry["file"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from normlab.config import load_config
    from normlab.train.loop import train

    if args.resume:
        extra = set(config_overrides(args)) | ({"config"} if args.config else set())
        if extra:
            raise NormlabError(f"--resume takes the run's saved config; drop {', '.join(sorted(extra))} "
                               "(or start a new run with --out)")
        train(None, resume_dir=args.resume)  # type: ignore[arg-type]
        return 0
    cfg = load_config(args.config, **config_overrides(args))
    from normlab.models.transfer import check_pretrained_file

    check_pretrained_file(cfg)  # before any data is loaded
    out = train(cfg, force=args.force)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NormlabError as exc:
        print(f"normlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("normlab: interrupted; finished epochs are saved (resume with `normlab train --resume RUN_DIR`)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
