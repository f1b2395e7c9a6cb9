"""Can the runs tell two variants apart? Pure functions behind the report's findings.

Two sources of noise decide whether a gap between two accuracies means anything:

* **seed noise** (initialisation, data order, augmentation): estimated only with several seeds per cell. Cells
  whose runs share seed numbers are compared **paired** (seed s of A against seed s of B: same data order
  and split), with a Student-t interval of the mean difference over seeds.
* **test-set noise** (which images happen to be in the test set): with one seed this is all that can be
  estimated. With per-image predictions (``predictions.json``, written by the analyses) the two models are
  paired on the same images: an exact McNemar test on the images only one of them gets right. Without
  them the accuracies are treated as independent proportions; two models scored on the *same* images make
  positively correlated errors, so that interval is wider than the paired one (conservative). Either way,
  a gap beyond test-set noise still says nothing about seed noise, and the verdict says so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# two-sided 95 % Student-t quantiles by degrees of freedom (1..30); 1.96 beyond
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z95 = 1.96


def t95(df: int) -> float:
    if df < 1:
        return math.inf
    return _T95[df - 1] if df <= len(_T95) else Z95


@dataclass(frozen=True)
class Gap:
    """Mean difference ``a - b`` with a 95 % half-width and what the half-width accounts for."""
    diff: float
    half_width: float  # inf when nothing can be estimated
    n: int  # paired seeds, or 1 for a single-seed comparison
    basis: str  # "paired over seeds" | "McNemar" | "test-set sampling only" | "none"
    p: float | None = None  # McNemar's two-sided p-value
    images: int = 0  # images of the McNemar pairing

    @property
    def separated(self) -> bool:
        if self.p is not None:
            return self.p < 0.05
        return math.isfinite(self.half_width) and abs(self.diff) > self.half_width

    def verdict(self) -> str:
        """A short phrase: 'within noise' / 'beyond noise' and on what evidence."""
        if math.isnan(self.diff):
            return "no data"
        if self.basis == "paired over seeds":
            if self.separated:
                return f"beyond seed noise (paired over {self.n} seeds, 95 % interval ±{self.half_width:.4f})"
            return f"within noise (paired over {self.n} seeds, 95 % interval ±{self.half_width:.4f})"
        if self.basis == "McNemar":
            p = "p<0.001" if self.p < 0.001 else f"p={self.p:.3f}"
            if self.separated:
                return (f"beyond test-set noise (McNemar on {self.images} shared images, {p}) but one seed: "
                        "seed-to-seed variation cannot be ruled out")
            return f"within noise (one seed; McNemar on {self.images} shared images, {p})"
        if self.basis == "test-set sampling only":
            if self.separated:
                return (f"beyond test-set noise (±{self.half_width:.4f}) but one seed: seed-to-seed variation "
                        "cannot be ruled out")
            return f"within noise (one seed; test-set sampling alone gives ±{self.half_width:.4f})"
        if self.basis == "bootstrap over images":
            if self.separated:
                return (f"beyond test-set noise (paired bootstrap over {self.images} images, 95 % interval "
                        f"±{self.half_width:.4f}) but one seed: seed-to-seed variation cannot be ruled out")
            return (f"within noise (one seed; a paired bootstrap over {self.images} images gives "
                    f"±{self.half_width:.4f})")
        return "cannot be separated (one seed and no test-set size)"


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, 95 % half-width of the mean over the values: t with n-1 df; inf for one value)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.inf
    if len(vals) == 1:
        return vals[0], math.inf
    return statistics.fmean(vals), t95(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))


def paired_gap(a: dict[int, float], b: dict[int, float]) -> Gap | None:
    """Paired comparison over the seeds both cells have; None with fewer than two shared seeds."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds if not (math.isnan(a[s]) or math.isnan(b[s]))]
    if len(diffs) < 2:
        return None
    mean, half = mean_interval(diffs)
    return Gap(mean, half, len(diffs), "paired over seeds")


def proportion_gap(acc_a: float, acc_b: float, n_images: int) -> Gap:
    """One seed each, scored on the same ``n_images``: the unpaired (conservative) 95 % interval of the gap."""
    if not n_images or math.isnan(acc_a) or math.isnan(acc_b):
        return Gap(acc_a - acc_b, math.inf, 1, "none")
    var = (acc_a * (1 - acc_a) + acc_b * (1 - acc_b)) / n_images
    # a floor of one image either way: two perfect scores are not "separated" by a zero-width interval
    half = max(Z95 * math.sqrt(var), 1.0 / n_images)
    return Gap(acc_a - acc_b, half, 1, "test-set sampling only")


def compare(a: dict[int, float], b: dict[int, float], n_images: int) -> Gap:
    """Paired over seeds when both cells have two or more shared seeds, else the single-seed test-set gap
    (of the seed means)."""
    gap = paired_gap(a, b)
    if gap is not None:
        return gap
    ma = statistics.fmean(a.values()) if a else math.nan
    mb = statistics.fmean(b.values()) if b else math.nan
    return proportion_gap(ma, mb, n_images)



def mcnemar_p(only_a_right: int, only_b_right: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (a binomial test at 1/2)."""
    n = only_a_right + only_b_right
    if n == 0:
        return 1.0
    k = min(only_a_right, only_b_right)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def chance_p(correct: int, n: int, classes: int) -> float:
    """One-sided exact binomial p-value of ``correct`` right out of ``n`` when guessing among ``classes``
    (each right with probability 1/classes): small = the model does better than chance. In log space, so
    large test sets do not overflow."""
    if n <= 0 or classes < 2:
        return math.nan
    p0 = 1.0 / classes

    def log_term(j: int) -> float:
        return (math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * math.log(p0)
                + (n - j) * math.log1p(-p0))

    return min(1.0, sum(math.exp(log_term(j)) for j in range(max(0, correct), n + 1)))


def mcnemar_gap(true: list[int], pred_a: list[int], pred_b: list[int]) -> Gap:
    """Two models (one seed each) on the same images: accuracy gap and the exact McNemar test."""
    if not (len(true) == len(pred_a) == len(pred_b)) or not true:
        raise ValueError("mcnemar_gap needs predictions of both models on the same, non-empty image list")
    a = [p == t for p, t in zip(pred_a, true)]
    b = [p == t for p, t in zip(pred_b, true)]
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    return Gap((sum(a) - sum(b)) / len(true), math.nan, 1, "McNemar", p=mcnemar_p(only_a, only_b), images=len(true))


def bootstrap_gap(stat, a: tuple, b: tuple, n_boot: int = 400, seed: int = 0) -> Gap:
    """``stat(*a) − stat(*b)`` for two models scored on the same images (``a``, ``b``: tuples of per-image
    numpy arrays, e.g. (confidence, correct)), with the 95 % half-width of a paired bootstrap over the
    images (the same resampled images for both): test-set noise for statistics such as the ECE that have
    no closed-form interval."""
    import numpy as np

    n = len(a[0])
    if n == 0 or any(len(v) != n for v in (*a, *b)):
        raise ValueError("bootstrap_gap needs both models' values on the same, non-empty image list")
    diff = stat(*a) - stat(*b)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        boots.append(stat(*(v[i] for v in a)) - stat(*(v[i] for v in b)))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    half = max(abs(hi - diff), abs(diff - lo))
    return Gap(float(diff), float(half), 1, "bootstrap over images", images=n)
