"""Paired bootstrap of a WER difference (``rl/bootstrap.py``) against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3asr_train.rl.bootstrap import corpus_rate, paired_bootstrap, resample_indices

# 3 utterances: system a makes 1, 0, 2 errors, system b 0, 0, 1, over 2, 3, 5 reference words
A, B, U = [1, 0, 2], [0, 0, 1], [2, 3, 5]


def test_point_estimate_and_explicit_resamples_by_hand():
    # four resamples: only clip 0, only clip 1, only clip 2, all three
    idx = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 1, 2]])
    ci = paired_bootstrap(A, B, U, confidence=0.95, indices=idx)
    # whole set: a = 3/10, b = 1/10
    assert (ci.rate_a, ci.rate_b) == (pytest.approx(0.3), pytest.approx(0.1))
    assert ci.difference == pytest.approx(0.2)
    # resampled differences: 3/6 - 0 = 0.5, 0 - 0 = 0, 6/15 - 3/15 = 0.2, 3/10 - 1/10 = 0.2 -> sorted 0, .2, .2, .5
    # linear quantiles of 4 values: 2.5 % at position 0.075 -> 0 + 0.075 * 0.2 = 0.015;
    # 97.5 % at position 2.925 -> 0.2 + 0.925 * (0.5 - 0.2) = 0.4775
    assert ci.low == pytest.approx(0.015)
    assert ci.high == pytest.approx(0.4775)
    assert ci.resamples == 4 and ci.excludes_zero


def test_random_resamples_are_seeded_and_identical_systems_give_zero():
    first = paired_bootstrap(A, B, U, resamples=500, seed=3)
    again = paired_bootstrap(A, B, U, resamples=500, seed=3)
    assert first == again
    assert resample_indices(3, 500, 3).shape == (500, 3)
    same = paired_bootstrap(A, A, U, resamples=200)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    assert first.low <= first.difference <= first.high


def test_bad_input_raises():
    with pytest.raises(ValueError, match="utterance 1 has 0.0 reference units"):
        paired_bootstrap([1, 1], [0, 0], [2, 0])
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([1], [0, 0], [2, 2])
    with pytest.raises(ValueError, match="sum to 0"):
        corpus_rate([0], [0])
    with pytest.raises(ValueError, match="indices must have shape"):
        paired_bootstrap(A, B, U, indices=np.zeros((2, 2), dtype=int))
