"""Stratified, seeded index selection (hold-out and subsets).

All selections use FIXED seeds, not the run's training seed: runs with different ``--seed`` share
the same validation set and the same training subset, so comparisons across seeds differ only by
training randomness (initialisation, order, augmentation).
"""

from __future__ import annotations

import torch

SPLIT_SEED = 0  # the validation hold-out
SUBSET_SEED = 1  # --train-subset
EVAL_SUBSET_SEED = 2  # load_data(max_eval=...)


def _class_indices(y: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    order = torch.argsort(y, stable=True)
    counts = torch.bincount(y, minlength=num_classes).tolist()
    return list(torch.split(order, counts))


def stratified_holdout(y: torch.Tensor, num_classes: int, fraction: float,
                       seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, held_out) sorted index tensors; each class gives ``round(fraction * n_c)`` images to the
    held-out part (at least one image of every class with >= 2 images stays on each side)."""
    g = torch.Generator().manual_seed(seed)
    keep, out = [], []
    for idx in _class_indices(y, num_classes):
        n = len(idx)
        k = int(round(fraction * n))
        if n >= 2:
            k = min(max(k, 1), n - 1)
        else:
            k = 0
        perm = idx[torch.randperm(n, generator=g)]
        out.append(perm[:k])
        keep.append(perm[k:])
    return torch.cat(keep).sort().values, torch.cat(out).sort().values


def stratified_subset(y: torch.Tensor, num_classes: int, n: int, seed: int = SUBSET_SEED) -> torch.Tensor:
    """Sorted indices of exactly ``min(n, len(y))`` items, classes in proportion to their counts
    (largest-remainder rounding, ties to the lower class index)."""
    total = len(y)
    if n >= total:
        return torch.arange(total)
    groups = _class_indices(y, num_classes)
    counts = [len(idx) for idx in groups]
    quotas = [n * c / total for c in counts]
    take = [int(q) for q in quotas]
    rest = n - sum(take)
    for c in sorted(range(len(counts)), key=lambda c: (-(quotas[c] - take[c]), c))[:rest]:
        take[c] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = [idx[torch.randperm(len(idx), generator=g)[:k]] for idx, k in zip(groups, take)]
    return torch.cat(chosen).sort().values
