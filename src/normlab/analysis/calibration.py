"""Calibration of a finished run's best weights: ECE (15 bins), NLL, Brier score and a reliability diagram.

``run_calibration(run_dir)`` runs one eval-mode pass per split (val, and test when the data set has one),
saves the logits (``logits.npz``), computes the metrics from them (``normlab.metrics.calibration_metrics``)
into ``calibration.json`` and draws ``reliability_<split>.png``. Nothing is retrained;
``calibration_from_logits`` recomputes the metrics from the saved logits alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from normlab import runfolder
from normlab.metrics import calibration_metrics

N_BINS = 15


def calibration_from_logits(logits: Any, target: Any, n_bins: int = N_BINS) -> dict[str, Any]:
    logits = torch.as_tensor(logits, dtype=torch.float64)
    return calibration_metrics(logits.softmax(1), torch.as_tensor(target), n_bins)


def run_calibration(run_dir: str | Path, device: str = "cpu", loaded: Any = None, n_bins: int = N_BINS
                    ) -> dict[str, Any]:
    from normlab.analysis.galleries import load_run
    from normlab.analysis.robustness import logits_of, memory_format
    from normlab import plots

    run_dir = Path(run_dir)
    run = loaded or load_run(run_dir, device)
    data, model = run.data, run.model.eval().to(memory_format=memory_format(run.cfg))
    logits, out = {}, {}
    for split in ("val", "test"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        if x is None:
            continue
        logits[split] = logits_of(model, x, data.mean, data.std, run.device, run.cfg.eval_batch_size)
        out[split] = calibration_from_logits(logits[split], y, n_bins)
        plots.plot_reliability({run.cfg.norm: out[split]["bins"]}, run_dir / runfolder.RELIABILITY_PNG.format(split=split),
                               title=f"{split} reliability · {run.cfg.norm} (ECE {out[split]['ece']:.3f})")
    labels = {f"{k}{runfolder.LABELS_SUFFIX}": getattr(data, f"{k}_y").numpy() for k in logits}
    runfolder.write_logits(run_dir, {**{k: v.numpy() for k, v in logits.items()}, **labels})
    runfolder.write_calibration(run_dir, out)
    return out
