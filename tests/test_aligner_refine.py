"""The aligner's reference-free refinement pass for long clips: pauses found in the audio, cuts between the
first pass's words, pieces no longer than the window, every word kept in order."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3asr_train.config.schema import ModelConfig
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import AlignedWord, Utterance
from qwen3asr_train.eval import align_eval
from qwen3asr_train.eval.align_eval import align, pieces_at, refine_cuts
from qwen3asr_train.eval.alignment import find_pauses
from qwen3asr_train.model.builder import build_model

SR = 16000


def bursts(spans: list[tuple[float, float]], total: float) -> np.ndarray:
    """Noise bursts at ``spans`` (s), digital-quiet noise floor elsewhere (60 dB down)."""
    rng = np.random.default_rng(0)
    audio = 1e-4 * rng.standard_normal(int(total * SR))
    for a, b in spans:
        audio[int(a * SR) : int(b * SR)] += 0.1 * rng.standard_normal(int(b * SR) - int(a * SR))
    return audio.astype(np.float32)


def test_find_pauses_reports_the_silent_runs_between_speech_longer_than_the_minimum():
    words = [(0.3, 0.8), (1.2, 1.6), (1.65, 2.0), (2.5, 3.0)]  # gaps 0.4, 0.05 (too short), 0.5 s
    pauses = find_pauses(bursts(words, 3.5), min_pause_s=0.1)
    assert len(pauses) == 2
    # a 25 ms frame is silent once it lies wholly in the gap: centres from gap start + 12.5 ms to end - 12.5 ms
    for (a, b), (gap_a, gap_b) in zip(pauses, [(0.8, 1.2), (2.0, 2.5)], strict=True):
        assert a == pytest.approx(gap_a + 0.0125, abs=0.011) and b == pytest.approx(gap_b - 0.0125, abs=0.011)
    assert find_pauses(np.zeros(SR, np.float32)) == []


def test_refine_cuts_cut_in_pauses_between_the_first_pass_words_and_keep_pieces_within_the_window():
    # 12 words of 0.4 s; after words 3, 7 a long pause (0.8 s), elsewhere 0.2 s
    spans, t = [], 0.3
    for k in range(12):
        spans.append((t, t + 0.4))
        t += 0.4 + (0.8 if k in (3, 7) else 0.2)
    total = t + 0.3
    audio = bursts(spans, total)
    coarse = [(a + 0.15, b + 0.15) for a, b in spans]  # first pass 150 ms late: still the right side of pauses
    cuts = refine_cuts(audio, coarse, window_s=3.5)
    # window 1 [0, 3.5]: pauses after words 0-4 (centres 0.8, 1.4, 2.0, 2.8, 3.5 - beyond); second half 1.75-3.5:
    # 2.0 (0.2 wide) and 2.8 (0.8 wide): the wide one, after word 3. Window 2 [2.8, 6.3]: pauses at 3.5, 4.1,
    # 4.7, 5.5 (wide, after word 7) in its second half 4.55-6.3 -> 5.5. The rest (5.5 to 8.7 = 3.2 s) fits.
    assert [last for _, last in cuts] == [3, 7]
    gaps = [((spans[k][1] + spans[k + 1][0]) / 2) for k in (3, 7)]
    assert [c for c, _ in cuts] == pytest.approx(gaps, abs=0.015)
    sample = Sample(
        Utterance(
            "u",
            "u.wav",
            total,
            " ".join(f"w{k}" for k in range(12)),
            "English",
            words=[AlignedWord(f"w{k}", a, b) for k, (a, b) in enumerate(spans)],
        ),
        audio,
        0,
    )
    pieces = pieces_at(sample, cuts)
    assert [p.utt.text for _, p in pieces] == ["w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9 w10 w11"]
    assert all(p.audio.size / SR <= 3.5 for _, p in pieces)
    assert sum(p.audio.size for _, p in pieces) == audio.size
    # pieces' words are shifted to the piece: word 4 starts 0.4 s after the first cut
    offset, second = pieces[1]
    assert second.utt.words[0].start == pytest.approx(spans[4][0] - offset, abs=1e-6)
    # a clip within the window is not cut
    assert refine_cuts(audio, coarse, window_s=total + 1) == []


def test_refine_cuts_fall_back_between_first_pass_words_when_the_window_has_no_pause():
    spans = [(0.1 + 0.5 * k, 0.1 + 0.5 * k + 0.5) for k in range(10)]  # continuous speech, 5.2 s
    audio = bursts([(0.1, 5.1)], 5.2)
    cuts = refine_cuts(audio, spans, window_s=2.0)
    # last word ending inside [0, 2]: word 2 (ends 1.6; word 3 ends 2.1) -> cut at 1.6; then [1.6, 3.6]: word 6
    assert [last for _, last in cuts] == [2, 6]
    assert [c for c, _ in cuts] == pytest.approx([1.6, 3.6])


def test_align_with_refinement_realigns_the_pieces_and_changes_nothing_for_short_clips(monkeypatch):
    model, processor = build_model(ModelConfig(source="tiny", task="aligner", num_labels=200), seed=0)
    spans, t = [], 0.3
    for k in range(16):
        spans.append((t, t + 0.3))
        t += 0.3 + (0.6 if k % 4 == 3 else 0.15)
    total = t + 0.3
    words = [AlignedWord(f"w{k % 5}", a, b) for k, (a, b) in enumerate(spans)]
    sample = Sample(
        Utterance("u", "u.wav", total, " ".join(w.word for w in words), "English", words=words), bursts(spans, total), 0
    )
    plain = align(model, processor, [sample])[0]
    # a random model's first pass is degenerate (all words at one time); the cuts are planned from the
    # reference here, and the call records what align() hands the planner (its own first pass)
    cuts = refine_cuts(sample.audio, spans, 3.0)
    assert [last for _, last in cuts] == [3, 7, 11]
    seen: list = []

    def planned(audio, coarse, window_s):
        seen.append((coarse, window_s))
        return cuts

    monkeypatch.setattr(align_eval, "refine_cuts", planned)
    refined = align(model, processor, [sample], refine_seconds=3.0)[0]
    assert seen == [(plain, 3.0)] and len(refined) == len(plain) == 16
    # the same by hand: each piece aligned on its own, its times offset back
    by_hand = []
    for offset, piece in pieces_at(sample, cuts):
        by_hand += [(round(a + offset, 3), round(b + offset, 3)) for a, b in align(model, processor, [piece])[0]]
    assert refined == by_hand
    assert align(model, processor, [sample], refine_seconds=total + 1.0)[0] == plain
    assert (
        align(model, processor, [sample], decode="monotonic")[0] != []
        and len(align(model, processor, [sample], decode="monotonic", refine_seconds=3.0)[0]) == 16
    )


def test_decode_settings_are_checked_and_reach_the_aligner_evaluator(monkeypatch, tmp_path):
    from qwen3asr_train.config.base import ConfigError
    from qwen3asr_train.config.recipes import DecodeConfig

    with pytest.raises(ConfigError, match="align_decode"):
        DecodeConfig(align_decode="viterbi").validate()
    with pytest.raises(ConfigError, match="align_refine_seconds"):
        DecodeConfig(align_refine_seconds=-1.0).validate()
    calls: list = []
    monkeypatch.setattr(align_eval, "align", lambda *args, **kwargs: calls.append(kwargs) or [])
    decode = DecodeConfig(align_decode="monotonic", align_refine_seconds=6.0, max_batch_seconds=50.0)
    evaluator = align_eval.AlignmentEvaluator.from_decode_config(None, {}, decode)
    evaluator.sets = {"dev": []}
    evaluator.evaluate(None, tmp_path, write=False)
    assert calls == [
        {
            "chunk_long": True,
            "decode": "monotonic",
            "refine_seconds": 6.0,
            "chain": align_eval.ChainSettings(),
        }
    ]
    assert (evaluator.max_batch_seconds, evaluator.max_batch_size) == (50.0, 32)
