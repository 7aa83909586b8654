"""Aligner evaluation: AAS on hand cases, slot decoding vs transformers, writers, baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from praatio import textgrid
from transformers import Qwen3ASRProcessor

from qwen3asr_train.eval.alignment import (
    AlignmentStats,
    _tier_entries,
    decode_slots,
    energy_baseline,
    slots_to_spans,
    uniform_baseline,
    write_alignments_json,
    write_textgrid,
)
from qwen3asr_train.eval.plots import plot_alignment

TS = 7  # <timestamp> id in the hand-made batches
PAD = 0
C = 64


def test_aas_and_within_shares_on_hand_case():
    stats = AlignmentStats()
    ref = [(0.10, 0.30), (0.30, 0.60)]
    pred = [(0.12, 0.30), (0.35, 0.70)]  # errors 20, 0, 50, 100 ms
    assert stats.add("a", ["x", "y"], pred, ref, set_name="dev", language="English") == pytest.approx(42.5)
    stats.add("b", ["z"], [(1.0, 1.2)], [(1.0, 1.2)], set_name="dev", language="French")  # errors 0, 0
    stats.add("c", ["z"], [(0.0, 0.5)], [(0.3, 0.5)], set_name="test", language="English")  # 300, 0
    summary = stats.summary()
    en = summary["dev"]["English"]
    assert en["aas_ms"] == pytest.approx(42.5)
    assert (en["within_20ms"], en["within_50ms"], en["within_100ms"]) == (0.5, 0.75, 1.0)  # thresholds inclusive
    assert (en["boundaries"], en["words"], en["utterances"]) == (4, 2, 1)
    every = summary["dev"]["all"]  # micro-average over the set's 6 boundaries
    assert every["aas_ms"] == pytest.approx(170 / 6)
    assert every["within_20ms"] == pytest.approx(4 / 6)
    assert every["median_ms"] == pytest.approx(10.0)  # sorted 0, 0, 0, 20, 50, 100
    assert summary["test"]["English"]["aas_ms"] == pytest.approx(150.0)
    assert summary["test"]["English"]["within_100ms"] == 0.5
    assert [r["id"] for r in stats.records] == ["a", "b", "c"]
    assert stats.records[0]["words"][1] == {"word": "y", "start": 0.35, "end": 0.7, "ref_start": 0.3, "ref_end": 0.6}


def hand_batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (3 audio/word tokens before each slot pair) and logits whose argmax at the k-th slot of
    a row is ``rows[r][k]``; other positions get random logits."""
    seqs = [[11, 12] + sum(([13, TS] for _ in classes), []) for classes in rows]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(rows), length), PAD)
    logits = torch.randn(len(rows), length, C, generator=torch.Generator().manual_seed(0))  # (B, L, C)
    for r, (seq, classes) in enumerate(zip(seqs, rows, strict=True)):
        ids[r, length - len(seq) :] = torch.tensor(seq)
        slots = (ids[r] == TS).nonzero().flatten()
        for pos, cls in zip(slots.tolist(), classes, strict=True):
            logits[r, pos, cls] = 100.0
    return ids, logits


def test_decode_slots_is_argmax_times_80ms_with_upstream_repair():
    rows = [
        [1, 3, 2, 5, 6, 40, 7, 8],  # two single outliers: snapped to the nearer normal neighbour (ties left)
        [1, 50, 51, 52, 2, 3, 4, 5],  # a block of 3 outliers: linearly interpolated between 80 and 160 ms
        [2, 4],  # already monotonic
    ]
    ids, logits = hand_batch(rows)
    got = decode_slots(logits, ids, TS)
    assert got == [
        [0.08, 0.24, 0.24, 0.4, 0.48, 0.48, 0.56, 0.64],
        [0.08, 0.1, 0.12, 0.14, 0.16, 0.24, 0.32, 0.4],
        [0.16, 0.32],
    ]
    # the same numbers as transformers' own decoder (self is only read when timestamp_segment_time is None)
    words = [[f"w{k}" for k in range(len(r) // 2)] for r in rows]
    upstream = Qwen3ASRProcessor.decode_forced_alignment(None, logits, ids, words, TS, timestamp_segment_time=80)
    assert [slots_to_spans(g) for g in got] == [[(w["start_time"], w["end_time"]) for w in row] for row in upstream]
    # a row without slots decodes to nothing (the repair itself would fail on it)
    empty_ids = torch.tensor([[11, 12, 13]])
    assert decode_slots(torch.zeros(1, 3, C), empty_ids, TS) == [[]]


def test_writers_produce_files_and_textgrid_round_trips(tmp_path):
    words = ["alpha", "bravo", "charlie"]
    pred = [(0.08, 0.32), (0.4, 0.56), (0.64, 0.96)]
    ref = [(0.1, 0.3), (0.42, 0.55), (0.6, 1.0)]
    stats = AlignmentStats()
    stats.add("u0", words, pred, ref, language="English")
    data = json.loads(write_alignments_json(tmp_path / "align.json", stats).read_text())
    assert data["summary"]["eval"]["English"]["boundaries"] == 6 and data["utterances"][0]["id"] == "u0"

    grid_path = write_textgrid(tmp_path / "u0.TextGrid", words, pred, duration=1.2, ref=ref)
    grid = textgrid.openTextgrid(str(grid_path), includeEmptyIntervals=False)
    assert grid.tierNames == ("words", "reference")
    assert grid.maxTimestamp == pytest.approx(1.2)
    for name, spans in (("words", pred), ("reference", ref)):
        entries = [(e.start, e.end, e.label) for e in grid.getTier(name).entries]
        assert entries == [(s, e, w) for w, (s, e) in zip(words, spans, strict=True)]

    png = plot_alignment(tmp_path / "u0.png", np.sin(np.arange(19200) / 20.0), words, pred, ref, title="u0")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_textgrid_entries_fix_empty_and_overlapping_intervals():
    # start == end (same 80 ms bin) and a 1 ms reference overlap: both illegal in Praat
    entries = _tier_entries(["a", "b", "c"], [(0.08, 0.08), (0.08, 0.24), (0.2395, 0.4)])
    assert entries == [(0.08, pytest.approx(0.081), "a"), (pytest.approx(0.081), 0.24, "b"), (0.24, 0.4, "c")]


def test_baselines_on_hand_case():
    rate = 16000
    audio = np.zeros(2 * rate, np.float32)
    t = np.arange(rate) / rate
    audio[rate // 2 : rate // 2 + rate] = 0.5 * np.sin(2 * np.pi * 300 * t)  # "speech" from 0.5 to 1.5 s
    words = ["ab", "abcd"]  # 1/3 and 2/3 of the characters
    uniform = uniform_baseline(audio, words)
    assert uniform == [(0.0, pytest.approx(2 / 3)), (pytest.approx(2 / 3), 2.0)]
    (s0, e0), (s1, e1) = energy_baseline(audio, words)
    assert s0 == pytest.approx(0.5, abs=0.03) and e1 == pytest.approx(1.5, abs=0.03)
    assert e0 == s1 == pytest.approx(s0 + (e1 - s0) / 3)
    assert energy_baseline(np.zeros(rate, np.float32), words) == uniform_baseline(np.zeros(rate, np.float32), words)
    # scored like a model: the energy baseline is far better than the uniform one here
    stats = AlignmentStats()
    ref = [(0.5, 5 / 6), (5 / 6, 1.5)]
    stats.add("u", words, energy_baseline(audio, words), ref, set_name="energy")
    stats.add("u", words, uniform, ref, set_name="uniform")
    summary = stats.summary()
    assert summary["energy"]["all"]["aas_ms"] < 30 < summary["uniform"]["all"]["aas_ms"]


def test_monotonic_classes_is_the_best_non_decreasing_sequence_by_brute_force():
    """Against an independent search: every non-decreasing class sequence enumerated, the best sum kept."""
    import itertools

    from qwen3asr_train.eval.alignment import monotonic_classes

    rng = np.random.default_rng(7)
    for trial in range(200):
        n_slots, n_classes = int(rng.integers(1, 5)), int(rng.integers(1, 7))
        scores = rng.normal(size=(n_slots, n_classes))
        if trial % 5 == 0:
            scores = np.round(scores)  # ties
        best = max(
            sum(scores[s, c] for s, c in enumerate(seq))
            for seq in itertools.combinations_with_replacement(range(n_classes), n_slots)
        )
        got = monotonic_classes(scores)
        assert all(a <= b for a, b in zip(got[:-1], got[1:], strict=True))
        assert abs(sum(scores[s, c] for s, c in enumerate(got)) - best) < 1e-9
    assert monotonic_classes(np.zeros((0, 4))).size == 0


def test_monotonic_decoding_keeps_ordered_argmax_and_takes_the_second_mode_that_fits():
    rows = [[1, 3, 3, 5]]
    ids, logits = hand_batch(rows)
    assert (
        decode_slots(logits, ids, TS, method="monotonic") == decode_slots(logits, ids, TS) == [[0.08, 0.24, 0.24, 0.4]]
    )
    # slot 2 prefers class 40 (a far-away mode) but has a second mode at 4: the ordered reading takes 4;
    # upstream's repair keeps 40 (its longest increasing run is 1, 3, 40) and moves the last slot up to it
    ids, logits = hand_batch([[1, 3, 40, 5]])
    slot = (ids[0] == TS).nonzero().flatten()[2]
    logits[0, slot, 4] = 99.0
    assert decode_slots(logits, ids, TS, method="monotonic") == [[0.08, 0.24, 0.32, 0.4]]
    assert decode_slots(logits, ids, TS) == [[0.08, 0.24, 3.2, 3.2]]
    with pytest.raises(ValueError, match="unknown slot decoding"):
        decode_slots(logits, ids, TS, method="viterbi")


def test_centroid_decoding_by_hand():
    """``centroid``: each slot at the probability-weighted mean bin of its argmax and the two beside it; slots
    moved by upstream's repair stay where it put them; the result stays non-decreasing."""
    n_classes = 12
    logp = np.full((5, n_classes), -30.0)
    logp[0, 1:4] = np.log([0.1, 0.6, 0.3])  # 2.2 bins = 176 ms
    logp[1, 3:6] = np.log([0.2, 0.6, 0.2])  # symmetric around bin 4: exactly 320 ms
    logp[2, 10:12] = np.log([0.4, 0.6])  # argmax bin 11, an outlier: the repair snaps it to 320 ms, kept there
    logp[3, 4:6] = np.log([0.45, 0.55])  # 4.55 bins = 364 ms
    logp[4, 6] = 0.0  # one bin: 480 ms
    ids = torch.full((1, 7), 1)
    ids[0, 1:6] = TS
    logits = torch.full((1, 7, n_classes), -30.0, dtype=torch.float64)
    logits[0, 1:6] = torch.from_numpy(logp)
    assert decode_slots(logits, ids, TS)[0] == [0.16, 0.32, 0.32, 0.4, 0.48]
    got = decode_slots(logits, ids, TS, method="centroid")[0]
    assert got == pytest.approx([0.176, 0.32, 0.32, 0.364, 0.48], abs=1e-9)
    logits[0, 3, 10:12] = -30.0
    logits[0, 3, 5] = 0.0  # slot 2 now plainly on bin 5 (400 ms): slot 3's 364 ms must not go before it
    assert decode_slots(logits, ids, TS)[0] == [0.16, 0.32, 0.4, 0.4, 0.48]
    got = decode_slots(logits, ids, TS, method="centroid")[0]
    assert got == pytest.approx([0.176, 0.32, 0.4, 0.4, 0.48], abs=1e-9)
