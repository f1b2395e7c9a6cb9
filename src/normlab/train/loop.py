"""The training loop: one run = one folder, resumable, deterministic on CPU for a given seed.

Data order and augmentation of epoch ``e`` come from generators seeded by ``(seed, e)``, so a run resumed
from ``last.pt`` after epoch ``e`` sees exactly the batches an uninterrupted run would; the global RNG
(dropout) is restored from the checkpoint.

Run folder: ``config.yaml`` · ``metrics.csv`` · ``events.*`` (TensorBoard) · ``best.pt`` · ``last.pt``
· ``quantiles.json`` · ``summary.json`` · ``curves.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normlab import runfolder
from normlab.checkpoint import (CheckpointUnreadable, load_checkpoint, load_weights, rng_state, save_checkpoint,
                                set_rng_state)
from normlab.config import TrainConfig, dump_yaml, make_config, read_yaml, resume_config
from normlab.data import images, load_data, normalize
from normlab.device import pick_device, unwrap
from normlab.errors import NormlabError, disk_full_cause
from normlab.evaluation import evaluate
from normlab.io import write_text
from normlab.layer_outputs import record_outputs
from normlab.metrics import quantiles, scores_from_confusion
from normlab.models import build_model, check_model, count_parameters
from normlab.plots import plot_curves
from normlab.train import distributed as dist_utils
from normlab.train.distributed import world_of
from normlab.train.optim import build_optimizer
from normlab.train.progress import EpochProgress
from normlab.runfolder import RunLock
from normlab.train.runtime import compile_settings, grad_scaler, maybe_compile, tune_malloc
from normlab.train.step import TrainStep


QUANTILES = (0.01, 0.2, 0.8, 0.99)


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (0: order, 1: augmentation) of one epoch of one seed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


def memory_format_of(cfg: TrainConfig) -> torch.memory_format:
    """The activation layout a run uses (``cfg.memory_format``)."""
    return torch.channels_last if cfg.memory_format == "channels_last" else torch.contiguous_format


def probe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose outputs the feature-quantile probe records. ``last_norm`` (the headline layer) is
    the second norm of the last block: the normalization's output right before the final residual add."""
    m = unwrap(model)
    stages = list(getattr(m, "stages", None) or [])  # models without stem/stages: probe what exists
    stem = m.stem if isinstance(getattr(m, "stem", None), nn.Module) else None
    if not stages and isinstance(getattr(m, "feature_info", None), list):  # timm: its feature stages
        names = [f.get("module") for f in m.feature_info if isinstance(f, dict)]
        stages = [m.get_submodule(n) for n in names if n and n != "stem" and not n.startswith("act")]
    layers = {**({"stem": stem} if stem is not None else {}), **{f"stage{i + 1}": s for i, s in enumerate(stages)}}
    tail = stages[-1] if stages else None
    last = getattr(tail[-1], "bn2", None) if isinstance(tail, (nn.Sequential, nn.ModuleList, list)) and len(tail) else None
    if last is None and tail is not None and not isinstance(getattr(m, "fc", None), nn.Linear):
        from normlab.models.swap import is_normalization

        norms = [x for x in tail.modules() if is_normalization(x)]  # a timm model: the last norm of its last stage
        last = norms[-1] if norms else None
    if last is not None:
        layers["last_norm"] = last
    return layers


@torch.no_grad()
def probe_quantiles(model: nn.Module, probe: torch.Tensor) -> dict[str, list[float]]:
    model.eval()
    with record_outputs(probe_layers(model), keep=lambda o: quantiles(o, QUANTILES)) as out:
        model(probe)
    return out


def run_dir_of(cfg: TrainConfig) -> Path:
    return Path(cfg.out or Path("runs") / cfg.run_name())


def prepare_run_dir(cfg: TrainConfig, force: bool) -> Path:
    return runfolder.prepare(run_dir_of(cfg), force)


def resume_settings(out: Path, log) -> dict[str, Any]:
    """The saved settings of the run in ``out``: ``config.yaml``, or, when that was deleted, the copy inside
    ``last.pt`` (then ``best.pt``); the run writes ``config.yaml`` again when it starts."""
    if not out.is_dir():
        raise NormlabError(f"--resume {out}: no such folder; point it at a run folder made by normlab train")
    if (out / runfolder.CONFIG).is_file():
        return read_yaml(out / runfolder.CONFIG)
    for name in (runfolder.LAST, runfolder.BEST):
        try:
            saved = load_checkpoint(out / name)["config"]
        except NormlabError:
            continue
        log(f"{out / runfolder.CONFIG} is missing: using the settings saved in {out / name}")
        return saved
    raise NormlabError(f"--resume {out}: no config.yaml there and no readable last.pt or best.pt holding the "
                       f"settings: point it at a run folder made by normlab train, or start a new run there with "
                       f"`normlab train --config FILE --out {out} --force`")


def check_resumable(out: Path, force: bool, log) -> None:
    """Before a resume: say what will happen instead of silently retraining finished epochs. A damaged or
    missing ``last.pt`` of a run with finished epochs is refused with the way out (``--force``: start the
    run over in its folder with its saved settings)."""
    last = out / runfolder.LAST
    over = f"start it over with `normlab train --resume {out} --force` (retrains from epoch 1 with its saved settings)"
    if force:
        RunLock.check_free(out)
        runfolder.clear(out, keep=(runfolder.CONFIG,))
        log(f"starting {out} over from epoch 1 (--force): its earlier results are deleted")
        return
    if last.is_file():
        try:
            load_checkpoint(last)
        except CheckpointUnreadable as exc:
            raise NormlabError(f"--resume {out}: {last} cannot be read ({exc.reason}): it is truncated or damaged, "
                               f"so the run cannot continue from it; {over}") from None
        return
    done = len(runfolder.read_metrics(out))  # written after last.pt: rows without it mean last.pt was lost
    if done:
        raise NormlabError(f"--resume {out}: last.pt is missing but metrics.csv records {done} finished "
                           f"epoch{'s' if done != 1 else ''}; resuming would retrain from epoch 1, so nothing is done: "
                           f"{over}")


def _remove_if_empty(out: Path) -> None:
    with contextlib.suppress(OSError):
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def train(cfg: TrainConfig, *, force: bool = False, resume_dir: str | Path | None = None,
          log=None, changes: dict | None = None) -> Path:
    """Train one run (or resume ``resume_dir``, with the safe ``changes`` of ``config.resume_config``; with
    ``force``, start it over with its saved settings) and return its folder."""
    if resume_dir is not None:
        out = Path(resume_dir)
        cfg = resume_config(make_config(resume_settings(out, log or print), where=str(out / runfolder.CONFIG)),
                            changes or {})
    dinfo = dist_utils.setup("cuda" if (cfg.device == "auto" or cfg.device.startswith("cuda"))
                             and torch.cuda.is_available() else "cpu")
    progress = EpochProgress(cfg.progress, enabled=dinfo.is_main)
    say = log or progress.say  # the result lines, shown even with the progress display off
    log = log or progress.log
    created = False  # a folder this call made: removed again if the run fails before writing anything
    if resume_dir is not None:
        if runfolder.run_state(out) == "finished" and not force:
            log(f"run {out} is already finished (summary.json exists); nothing to do")
            return out
        if dinfo.is_main:
            check_resumable(out, force, say)
    elif dinfo.is_main:
        created = not run_dir_of(cfg).exists()
        out = prepare_run_dir(cfg, force)
    else:
        out = run_dir_of(cfg)
    dist_utils.barrier(dinfo)  # the other ranks look at the folder only once rank 0 has prepared it
    try:
        with RunLock(out, log) if dinfo.is_main else contextlib.nullcontext():
            result = _train(cfg, out, dinfo, progress, log, say)
    except BaseException:
        if created:  # e.g. the data was refused: no empty folder left behind
            _remove_if_empty(out)
        # no barrier here: the other ranks may be inside a collective this rank will never join
        if dinfo.enabled:
            dist_utils.teardown()
        raise
    if dinfo.enabled:  # all ranks destroy the group together (on torch 2.4, gloo's teardown could hang otherwise)
        dist_utils.barrier(dinfo)
        dist_utils.teardown()
    return result


def _train(cfg: TrainConfig, out: Path, dinfo, progress: EpochProgress, log, say) -> Path:
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    tune_malloc()
    if device.type == "cuda":
        # an explicit index everywhere below: DDP's device_ids, set_device and checkpoints need one
        device = torch.device("cuda", dinfo.local_rank if dinfo.enabled else
                              device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    check_model(cfg.model)  # a misspelt timm architecture or a missing timm: before the data is loaded
    data = load_data(cfg, max_eval=cfg.eval_subset)
    if dinfo.is_main:
        write_text(out / "config.yaml", dump_yaml(cfg.to_dict()))
    # resuming: last.pt holds every weight, so --pretrained is not fetched again
    build_cfg = dataclasses.replace(cfg, pretrained=None) if (out / runfolder.LAST).is_file() else cfg
    model = build_model(build_cfg, data.in_channels, data.num_classes, sync=cfg.sync_bn and dinfo.enabled)
    if cfg.sync_bn and dinfo.enabled:
        model = dist_utils.sync_native_batchnorm(model, device, log if dinfo.is_main else None)
    model = model.to(device)
    fmt = memory_format_of(cfg)
    model = model.to(memory_format=fmt)
    optimizer = build_optimizer(model, cfg)
    scaler = grad_scaler(device, cfg.precision)

    # Device-resident uint8 data: one copy, no loader processes.
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    val_x, val_y = data.val_x.to(device), data.val_y.to(device)  # evaluated every epoch: copied once
    probe = normalize(data.val_x[: cfg.probe_size].to(device), data.mean, data.std)
    n_train = len(train_x)
    # what `normlab evaluate` / `normlab.load_run` need without reloading this data: classes and normalization
    data_of = {"classes": list(data.classes), "in_channels": data.in_channels, "mean": list(data.mean),
               "std": list(data.std)}
    per_rank = cfg.batch_size // dinfo.world_size
    if per_rank < 1:
        raise NormlabError(f"batch_size={cfg.batch_size} is smaller than the {dinfo.world_size} processes: raise it")
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs

    state: dict[str, Any] = {"epoch": 0, "rows": [], "best_acc": -1.0, "best_epoch": 0, "bad_epochs": 0,
                             "quantiles": [], "diverged": None, "train_seconds": 0.0}
    last = out / runfolder.LAST
    if last.is_file():
        resume_from(last, model, optimizer, scaler, state)
        log(f"resuming {out} after epoch {state['epoch']}")
    ddp_model = model
    if dinfo.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    compiled = compile_settings(cfg.compile, device, distributed=dinfo.enabled)
    run_model = maybe_compile(ddp_model, cfg.compile, device, log, settings=compiled)
    writer = _tensorboard(out, state["epoch"]) if dinfo.is_main else None
    if dinfo.is_main and not state["quantiles"]:
        state["quantiles"].append({"epoch": 0, **probe_quantiles(model, probe)})
    n_params = count_parameters(model)
    log(f"{out}: {cfg.dataset} {tuple(data.train_x.shape[1:])}, {data.num_classes} classes, "
        f"train/val/test {n_train}/{len(data.val_x)}/{0 if data.test_x is None else len(data.test_x)}, "
        f"{cfg.model_label} norm={cfg.norm} ({n_params:,} params), {device}, batch {cfg.batch_size}")
    step_fn = TrainStep(model, run_model, optimizer, cfg, device=device, num_classes=data.num_classes,
                        mean=data.mean, std=data.std, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                        scaler=scaler, rank=dinfo.rank, world_size=dinfo.world_size, memory_format=fmt,
                        all_reduce_min=(lambda t: dist_utils.all_reduce_min(t, dinfo)) if dinfo.enabled else None,
                        mark_step=compiled.cuda_graphs and run_model is not ddp_model)

    # a run that stopped early and then failed before its summary (last.pt says so): finish it, train no more
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1 if not state.get("stopped_early") else 0):
        run_model.train()
        t0 = time.perf_counter()
        # the epoch's order goes to the device once; batches are slices of it (no copy per step)
        order = torch.randperm(n_train, generator=epoch_generator(cfg.seed, epoch, 0)).to(device)
        aug_gen = epoch_generator(cfg.seed, epoch, 1)
        step_fn.begin_epoch()
        progress.start(f"epoch {epoch}/{cfg.epochs}", steps_per_epoch)
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if len(idx) < 2 * dinfo.world_size:  # a 1-image batch cannot be batch-normalized
                continue
            step_fn(train_x.index_select(0, idx), train_y.index_select(0, idx), step, aug_gen,
                    global_step=(epoch - 1) * steps_per_epoch + step)
            if step_fn.due():
                bad = step_fn.check()
                if bad is not None:
                    state["diverged"] = bad.record(epoch)
                    break
                progress.advance(len(idx), step_fn.last_loss)
            else:
                progress.advance(len(idx))
        if state["diverged"] is None:  # always before the sums are used and a checkpoint is written
            bad = step_fn.check()
            if bad is not None:
                state["diverged"] = bad.record(epoch)
        progress.stop()
        if state["diverged"] is not None:
            log(f"diverged at epoch {epoch}, step {state['diverged']['step']} (non-finite loss or gradient): "
                "stopping this run")
            break
        loss_sum, cm, seen = step_fn.sums()
        seen_t = dist_utils.all_reduce_sum(torch.tensor([float(seen)], device=device), dinfo)
        loss_sum = dist_utils.all_reduce_sum(loss_sum, dinfo)
        cm = dist_utils.all_reduce_sum(cm, dinfo)
        train_seconds = time.perf_counter() - t0
        state["train_seconds"] += train_seconds
        state["epoch"] = epoch
        if not dinfo.is_main:  # rank 0 evaluates and decides; the others follow its early-stopping decision
            if dist_utils.any_rank(False, dinfo, device):
                break
            continue
        val_loss, val_cm, _ = evaluate(model, val_x, val_y, data, device, cfg.eval_batch_size, cfg.precision, fmt)
        tr, va = scores_from_confusion(cm), scores_from_confusion(val_cm)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": loss_sum.item() / max(1.0, seen_t.item()), "train_error": 1 - tr["acc"],
               **{f"train_{m}": v for m, v in tr.items()},
               "val_loss": val_loss, "val_error": 1 - va["acc"], **{f"val_{m}": v for m, v in va.items()},
               "epoch_seconds": train_seconds, "images_per_s": seen_t.item() / max(train_seconds, 1e-9),
               "eval_seconds": time.perf_counter() - t0 - train_seconds}
        state["rows"].append(row)
        state["quantiles"].append({"epoch": epoch, **probe_quantiles(model, probe)})
        improved = va["acc"] > state["best_acc"]
        if improved:
            state.update(best_acc=va["acc"], best_epoch=epoch, bad_epochs=0)
            save_checkpoint(out / "best.pt", model, cfg, epoch=epoch, val_acc=va["acc"], data=data_of)
        else:
            state["bad_epochs"] += 1
        _log_epoch(writer, row, log, cfg)
        # last.pt first (it holds the rows and quantiles too), then their readable copies: metrics.csv with
        # rows but no last.pt means last.pt was lost, never that the disk filled before it was written
        state["stopped_early"] = cfg.patience is not None and state["bad_epochs"] >= cfg.patience
        save_checkpoint(last, model, cfg, optimizer=optimizer.state_dict(), rng=rng_state(), state=state,
                        scaler=scaler.state_dict() if scaler is not None else None, data=data_of)
        runfolder.write_metrics(out, state["rows"])
        runfolder.write_quantiles(out, QUANTILES, state["quantiles"])
        if dist_utils.any_rank(state["stopped_early"], dinfo, device):
            log(f"early stop: val accuracy has not improved for {cfg.patience} epochs (best {state['best_acc']:.4f} "
                f"at epoch {state['best_epoch']})")
            state["stopped_early"] = True
            break
    if writer is not None:
        writer.close()
    if dinfo.is_main:
        _finish(cfg, out, model, data, device, state, n_params, time.perf_counter() - t_start, log, say)
    return out


def resume_from(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler | None, state: dict[str, Any]) -> dict[str, Any]:
    """Restore weights, optimizer, scaler, progress and RNG from ``last.pt`` into a model already on its device.

    The file is read onto the CPU whatever device wrote it or runs now: RNG states must stay CPU byte
    tensors, and the weights and optimizer state are copied onto the parameters' device by their
    ``load_state_dict`` (so a run started on one device resumes on another)."""
    ckpt = load_checkpoint(path, map_location="cpu")
    load_weights(model, ckpt, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state.update(ckpt["state"])
    set_rng_state(ckpt["rng"])
    return ckpt


def _tensorboard(out: Path, epoch: int):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out), purge_step=epoch + 1 if epoch else None)


def _log_epoch(writer, row: dict[str, float], log, cfg: TrainConfig) -> None:
    e = int(row["epoch"])
    if writer is not None:
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key, value, e)
        writer.flush()
    log(f"epoch {e:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}/{row['val_loss']:.4f}  "
        f"acc {row['train_acc']:.4f}/{row['val_acc']:.4f}  macro-F1 {row['val_macro_f1']:.4f}  "
        f"{row['epoch_seconds']:.1f}s ({row['images_per_s']:,.0f} img/s)")


def hparams_of(cfg: TrainConfig, summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """(settings, final metrics) in the types TensorBoard's HParams tab takes: lists and None become text."""
    hp = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in cfg.to_dict().items()
          if k not in ("out", "progress")}
    metrics = {f"hparam/{k}": float(v) for k, v in runfolder.final_scores(summary).items() if v is not None}
    metrics["hparam/epochs_run"] = float(summary.get("epochs_run") or 0)
    return hp, metrics


def _log_hparams(out: Path, cfg: TrainConfig, summary: dict[str, Any], log) -> None:
    """The run's settings and final metrics, once, in the run folder itself (run_name "."), so that
    ``tensorboard --logdir <study>/runs`` lists every run in the HParams tab next to its scalars."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        hp, metrics = hparams_of(cfg, summary)
        with SummaryWriter(str(out)) as writer:
            writer.add_hparams(hp, metrics, run_name=".")
    except Exception as exc:  # TensorBoard is a convenience: a broken install must not lose the run
        if disk_full_cause(exc) is not None:
            raise
        log(f"warning: could not write TensorBoard HParams ({type(exc).__name__}: {exc})")


def _finish(cfg, out, model, data, device, state, n_params, wall, log, say) -> None:
    """Evaluate the best-on-val weights on train, val and test; write summary.json, HParams and curves.png;
    ``say`` the result (``EpochProgress.say`` unless the caller passed its own ``log``)."""
    best = out / runfolder.BEST
    splits: dict[str, Any] = {}
    if best.is_file():
        load_weights(model, load_checkpoint(best, map_location=device), best)
        for split, (x, y) in {"train": (data.train_x, data.train_y), "val": (data.val_x, data.val_y),
                              "test": (data.test_x, data.test_y)}.items():
            if x is None:
                continue
            loss, cm, _ = evaluate(model, x, y, data, device, cfg.eval_batch_size, cfg.precision,
                                   memory_format_of(cfg))
            splits[split] = {"loss": loss, **scores_from_confusion(cm), "confusion": cm.tolist()}
    status = "diverged" if state["diverged"] else "stopped_early" if state.get("stopped_early") else "finished"
    rows = state["rows"]
    summary = {
        "status": status, "diverged": state["diverged"], "run": out.name, "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"], "classes": data.classes, "params": n_params, "layers": cfg.layers if cfg.model == "resnet" else None,
        **{split: splits.get(split) for split in ("train", "val", "test")},
        "seconds_per_epoch": (sum(r["epoch_seconds"] for r in rows) / len(rows)) if rows else None,
        "images_per_s": (sum(r["images_per_s"] for r in rows) / len(rows)) if rows else None,
        "timing": {**runfolder.timing(rows), "data_load_seconds": data.info.get("load_seconds")},
        "wall_seconds": wall, "device": str(device), "world": world_of(), "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "data": _data_info(data.info),
        "model": runfolder.model_record(cfg.model, getattr(unwrap(model), "normlab_swaps", None),
                                        getattr(unwrap(model), "normlab_pretrained", None)),
    }
    _log_hparams(out, cfg, summary, log)
    if rows:
        plot_curves(runfolder.read_metrics(out), out / runfolder.CURVES,
                    title=f"{cfg.dataset} · {cfg.model_label} · {cfg.norm} · seed {cfg.seed}")
    # last: a summary says the run is complete, so nothing of the run may fail after it is written
    runfolder.write_summary(out, summary)
    skipped = int(data.info.get("num_skipped", 0) or 0)
    if skipped:
        shown = min(skipped, 20)
        say(f"skipped {skipped} unreadable image file{'s' if skipped > 1 else ''}; "
            f"{'the first ' + str(shown) + ' are' if skipped > shown else 'listed'} in "
            f"{out / runfolder.SUMMARY} (data.skipped)")
    ignored = int(data.info.get("num_ignored", 0) or 0)
    if ignored:
        names = summary["data"].get("ignored") or []
        say(f"warning: ignored {ignored} file{'s' if ignored > 1 else ''} that {'are' if ignored > 1 else 'is'} not "
            f"an image normlab reads ({' '.join(images.IMG_EXTENSIONS)}): {', '.join(names[:3])}"
            f"{', ...' if ignored > 3 else ''}; {'the first ' + str(len(names)) + ' are' if ignored > len(names) else 'listed'} "
            f"in {out / runfolder.SUMMARY} (data.ignored)")
    split = "test" if splits.get("test") else "val"
    scores = splits.get(split) or {}
    say(f"done: {status}; best epoch {state['best_epoch']}; "
        + (f"{split} acc {scores['acc']:.4f}, macro-F1 {scores['macro_f1']:.4f}; " if scores else "")
        + f"run folder {out}")


DATA_INFO_KEYS = ("source", "format", "cache_hit", "val_held_out", "val_fraction", "train_subset", "counts",
                  "num_skipped", "num_ignored", "warnings", "load_seconds")


def _data_info(info: dict[str, Any]) -> dict[str, Any]:
    """What the summary keeps about the data: provenance, counts, and the first skipped files."""
    out = {k: info[k] for k in DATA_INFO_KEYS if k in info}
    out["skipped"] = [list(map(str, s)) for s in info.get("skipped", [])[:20]]
    out["ignored"] = [str(p) for p in info.get("ignored_examples", [])[:20]]  # not images (e.g. .gif): by name
    return out


def summary_of(folder: str | Path) -> dict[str, Any] | None:
    return runfolder.read_summary(folder)
