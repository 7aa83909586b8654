"""Paired bootstrap over utterances for the difference between two systems' corpus error rates.

Why: comparing two training methods (e.g. GSPO against continued SFT) on a held-out set of 100-200 clips, a
difference of a point or two of WER can be noise. The paired bootstrap resamples *utterances* with replacement,
uses the same draw for both systems (their errors on one clip are correlated) and recomputes both corpus-level
rates (sum of errors / sum of reference units, the evaluation's definition) on each resample. The spread of the
resampled differences gives a percentile confidence interval for the difference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapCI:
    """``difference`` = rate of system a − rate of system b on the whole set, and its percentile interval."""

    difference: float
    low: float
    high: float
    confidence: float
    resamples: int
    rate_a: float
    rate_b: float

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely on one side of 0 (the difference is not resampling noise)."""
        return self.low > 0 or self.high < 0


def corpus_rate(errors: Sequence[float], units: Sequence[float]) -> float:
    """Sum of errors over sum of reference units (the evaluation's corpus WER/CER)."""
    total = float(np.sum(units))
    if total <= 0:
        raise ValueError("corpus_rate: the reference units sum to 0")
    return float(np.sum(errors)) / total


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n)`` utterance indices drawn with replacement (numpy ``default_rng(seed)``)."""
    if n < 1 or resamples < 1:
        raise ValueError(f"resample_indices: need n >= 1 and resamples >= 1, got n={n}, resamples={resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired_bootstrap(
    errors_a: Sequence[float],
    errors_b: Sequence[float],
    units: Sequence[float],
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    indices: np.ndarray | None = None,
) -> BootstrapCI:
    """Percentile interval of ``rate(a) − rate(b)`` over paired utterance resamples.

    Args:
        errors_a, errors_b: per-utterance error counts (S + D + I) of the two systems, in the same utterance order.
        units: per-utterance reference units (words or characters); every one must be > 0 (score no-speech
            items separately: they have no units).
        resamples, seed: the draw (ignored when ``indices`` is given).
        confidence: e.g. 0.95 for the 2.5 % and 97.5 % quantiles (numpy's linear interpolation).
        indices: explicit ``(R, n)`` resamples (tests, or one draw shared by several comparisons).
    """
    a, b, u = (np.asarray(x, dtype=np.float64) for x in (errors_a, errors_b, units))
    if not (a.shape == b.shape == u.shape and a.ndim == 1 and a.size > 0):
        raise ValueError(
            f"paired_bootstrap: need three equal-length 1-D sequences, got {a.shape}, {b.shape}, {u.shape}"
        )
    bad = np.flatnonzero(u <= 0)
    if bad.size:
        raise ValueError(f"paired_bootstrap: utterance {int(bad[0])} has {u[bad[0]]} reference units (must be > 0)")
    if np.any(a < 0) or np.any(b < 0):
        raise ValueError("paired_bootstrap: error counts must be >= 0")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap: confidence must be in (0, 1), got {confidence}")
    idx = resample_indices(a.size, resamples, seed) if indices is None else np.asarray(indices)
    if idx.ndim != 2 or idx.shape[1] != a.size:
        raise ValueError(f"paired_bootstrap: indices must have shape (R, {a.size}), got {idx.shape}")
    total_units = u[idx].sum(axis=1)  # (R,)
    diffs = (a[idx].sum(axis=1) - b[idx].sum(axis=1)) / total_units  # (R,)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    rate_a, rate_b = corpus_rate(a, u), corpus_rate(b, u)
    logger.debug("paired bootstrap: %d resamples of %d utterances", idx.shape[0], a.size)
    return BootstrapCI(rate_a - rate_b, float(low), float(high), confidence, int(idx.shape[0]), rate_a, rate_b)


__all__ = ["BootstrapCI", "corpus_rate", "paired_bootstrap", "resample_indices"]
