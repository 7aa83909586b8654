"""Aligner word-unit policy (re-cut / skip / strict, counted per language), AAS by time in the clip, and
long clips evaluated in pieces."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qwen3asr_train.data.aligner import (
    UnitPolicyReport,
    resplit_words,
    usable_for_alignment,
    usable_samples,
)
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import AlignedWord, ManifestError, SkipReport, Utterance
from qwen3asr_train.eval.align_eval import (
    AlignmentEvaluator,
    align,
    alignment_metrics,
    bias_by_time_table,
    by_time_table,
    split_long_sample,
    worst_utterances_table,
    write_alignment_reports,
)
from qwen3asr_train.eval.alignment import TIME_BIN_LABELS, AlignmentStats, by_time, time_drift_ratio


def _utt(uid: str, text: str, language: str, words: list[tuple[str, float, float]], line: int = 1) -> Utterance:
    return Utterance(
        uid, "x.wav", 3.0, text, language, words=[AlignedWord(*w) for w in words], source=f"m.jsonl:{line}"
    )


# ----------------------------------------------------------------------------------------- unit policy


def test_resplit_merges_whole_words_with_exact_times():
    # "well-known" is one unit (the hyphen is dropped without ending it); MFA-style words split it in two
    utt = _utt(
        "a",
        "a well-known cat",
        "English",
        [("a", 0.1, 0.2), ("well", 0.3, 0.5), ("known", 0.55, 0.9), ("cat", 1.0, 1.3)],
    )
    words = resplit_words(utt)
    assert [(w.word, w.start, w.end) for w in words] == [("a", 0.1, 0.2), ("wellknown", 0.3, 0.9), ("cat", 1.0, 1.3)]
    # punctuation-only manifest words vanish, punctuation inside a word is cleaned
    utt = _utt("b", "go, now!", "English", [("go,", 0.0, 0.4), ("-", 0.4, 0.45), ("now!", 0.5, 0.8)])
    assert [(w.word, w.start, w.end) for w in resplit_words(utt)] == [("go", 0.0, 0.4), ("now", 0.5, 0.8)]


def test_resplit_refuses_to_invent_times_inside_a_word():
    # Chinese units are characters: a two-character manifest word has no measured boundary between them
    utt = _utt("c", "你好", "Chinese", [("你好", 0.1, 0.6)])
    assert resplit_words(utt) is None
    # different characters (a manifest word not in the text) cannot be re-cut either
    assert resplit_words(_utt("d", "a cat", "English", [("a", 0.0, 0.1), ("dog", 0.2, 0.5)])) is None


def test_unit_policy_counts_per_language_and_never_stops_by_default():
    rows = [
        _utt("ok", "a cat", "English", [("a", 0.0, 0.1), ("cat", 0.2, 0.5)], 1),
        _utt("merge", "well-known", "English", [("well", 0.0, 0.2), ("known", 0.3, 0.5)], 2),
        _utt("zh-ok", "你好", "Chinese", [("你", 0.0, 0.2), ("好", 0.3, 0.5)], 3),
        _utt("zh-bad", "你好", "Chinese", [("你好", 0.0, 0.5)], 4),
        Utterance("silence", "s.wav", 1.0, "", None, source="m.jsonl:5"),
    ]
    report, rejects = UnitPolicyReport(), SkipReport()
    kept = usable_for_alignment(rows, "skip", "train", rejects, report=report)  # default units="resplit"
    assert [u.id for u in kept] == ["ok", "merge", "zh-ok"]
    assert [w.word for w in kept[1].words] == ["wellknown"]
    assert report.as_dict() == {
        "train": {
            "Chinese": {"matched": 1, "resplit": 0, "skipped": 1},
            "English": {"matched": 1, "resplit": 1, "skipped": 0},
        }
    }
    assert rejects.counts == {"unit_mismatch": 1, "no_speech": 1}
    assert {r["line"] for r in rejects.rows} == {4, 5} and all(r["what"] == "train" for r in rejects.rows)
    # skip: every mismatch is dropped, counted per language
    report = UnitPolicyReport()
    kept = usable_for_alignment(rows[:4], "error", "eval:dev", units="skip", report=report)
    assert [u.id for u in kept] == ["ok", "zh-ok"]
    assert report.as_dict()["eval:dev"]["English"] == {"matched": 1, "resplit": 0, "skipped": 1}
    # strict (and its alias error) raise naming the file and line of the first mismatching row
    for units in ("strict", "error"):
        with pytest.raises(ManifestError, match=r"m\.jsonl:2"):
            usable_for_alignment(rows[:4], "error", "train", units=units)
    with pytest.raises(ValueError, match="word-unit policy"):
        usable_for_alignment(rows[:1], "error", "train", units="fix")


def test_japanese_rows_are_recut_with_the_processors_tokenizer():
    pytest.importorskip("nagisa")
    from qwen3asr_train.data.word_units import split_words

    text = "私は東京に行きます"
    units = split_words(text, "Japanese")
    assert "東京" in units
    k = units.index("東京")
    # a front end that timed 東 and 京 separately: the unit merges whole words, so its times are exact
    finer = [(u, 0.1 + 0.3 * i, 0.3 + 0.3 * i) for i, u in enumerate(units[:k])]
    finer += [("東", 2.0, 2.2), ("京", 2.25, 2.5)]
    finer += [(u, 3.0 + 0.3 * i, 3.2 + 0.3 * i) for i, u in enumerate(units[k + 1 :])]
    # one that timed two units as one word: no measured boundary between them, so the row is skipped
    coarse = [(units[0] + units[1], 0.0, 0.4)] + [(u, 0.5 + 0.2 * i, 0.6 + 0.2 * i) for i, u in enumerate(units[2:])]
    report = UnitPolicyReport()
    kept = usable_for_alignment(
        [_utt("fine", text, "Japanese", finer), _utt("coarse", text, "Japanese", coarse, 2)],
        "error",
        "train",
        report=report,
    )
    assert [u.id for u in kept] == ["fine"] and [w.word for w in kept[0].words] == units
    assert (kept[0].words[k].start, kept[0].words[k].end) == (2.0, 2.5)
    assert report.as_dict()["train"]["Japanese"] == {"matched": 0, "resplit": 1, "skipped": 1}


def test_usable_samples_keep_audio_and_replace_words():
    audio = np.zeros(1600, dtype=np.float32)
    utt = _utt("m", "well-known", "English", [("well", 0.0, 0.2), ("known", 0.3, 0.5)])
    [sample] = usable_samples([Sample(utt, audio, 7)], "error", "eval:x")
    assert sample.audio is audio and sample.index == 7 and [w.word for w in sample.utt.words] == ["wellknown"]


# ----------------------------------------------------------------------------------------- by time


def test_aas_by_time_bins_by_reference_boundary_time():
    stats = AlignmentStats()
    # boundaries at 0.5 (err 10 ms), 0.9 (30), 1.5 (40), 3.0 (100), 12.0 (200), 31.0 (0)
    ref = [(0.5, 0.9), (1.5, 3.0), (12.0, 31.0)]
    pred = [(0.51, 0.93), (1.54, 3.1), (12.2, 31.0)]
    stats.add("u", ["a", "b", "c"], pred, ref, "dev", "English")
    bins = stats.summary()["dev"]["English"]["by_time"]
    assert list(bins) == ["0-1 s", "1-2 s", "2-5 s", "10-30 s", ">30 s"]  # 5-10 s has no boundary
    assert bins["0-1 s"] == {"aas_ms": pytest.approx(20.0), "boundaries": 2, "bias_ms": pytest.approx(20.0)}
    assert bins["1-2 s"]["aas_ms"] == pytest.approx(40.0) and bins["2-5 s"]["aas_ms"] == pytest.approx(100.0)
    assert bins["10-30 s"]["aas_ms"] == pytest.approx(200.0) and bins[">30 s"]["aas_ms"] == pytest.approx(0.0)
    assert time_drift_ratio(bins) == pytest.approx(10.0)
    # bins partition the boundaries: the boundary-weighted mean of the bins is the overall AAS
    overall = stats.summary()["dev"]["all"]
    assert sum(b["aas_ms"] * b["boundaries"] for b in bins.values()) / overall["boundaries"] == pytest.approx(
        overall["aas_ms"]
    )
    assert by_time(np.array([5.0]), np.array([1.0])) == {"1-2 s": {"aas_ms": 5.0, "boundaries": 1}}  # edges: [lo, hi)
    assert TIME_BIN_LABELS == ("0-1 s", "1-2 s", "2-5 s", "5-10 s", "10-30 s", ">30 s")
    assert math.isnan(time_drift_ratio({"1-2 s": {"aas_ms": 3.0, "boundaries": 1}}))


def test_signed_error_by_time_tells_early_from_late():
    """pred - ref per bin: two boundaries 50 ms late and 30 ms early in the first second (|.| 40, sign +10),
    one 400 ms early at 12 s (|.| 400, sign -400): the AAS bins cannot show that the late one is a bias."""
    stats = AlignmentStats()
    stats.add("u", ["a", "b"], [(0.55, 0.87), (11.6, 12.8)], [(0.5, 0.9), (12.0, 12.8)], "dev", "English")
    scores = stats.summary()["dev"]["all"]
    bins = scores["by_time"]
    assert bins["0-1 s"]["aas_ms"] == pytest.approx(40.0) and bins["0-1 s"]["bias_ms"] == pytest.approx(10.0)
    assert bins["10-30 s"]["aas_ms"] == pytest.approx(200.0)  # 12.0 (-400) and 12.8 (0)
    assert bins["10-30 s"]["bias_ms"] == pytest.approx(-200.0)
    assert scores["bias_ms"] == pytest.approx((50 - 30 - 400 + 0) / 4)
    summary = {"model": {"dev": {"all": scores}}}
    assert "| dev | +10.0 | – | – | – | -200.0 | – |" in bias_by_time_table(summary)


def test_reports_show_time_bins_languages_baseline_and_unit_counts(tmp_path):
    rng = np.random.default_rng(0)
    sets, preds = {"dev": []}, {"dev": []}
    stats, baseline = AlignmentStats(), AlignmentStats()
    for k, lang in enumerate(["English", "German", "English"]):
        words = [AlignedWord(w, 0.3 + 0.7 * i, 0.6 + 0.7 * i) for i, w in enumerate(["ab", "cd", "ef"])]
        utt = Utterance(f"u{k}", "x.wav", 2.5, "ab cd ef", lang, words=words)
        sample = Sample(utt, (0.01 * rng.standard_normal(40000)).astype(np.float32), k)
        pred = [(w.start + 0.02 * k, w.end + 0.04) for w in words]
        sets["dev"].append(sample)
        preds["dev"].append(pred)
        stats.add(utt.id, [w.word for w in words], pred, [(w.start, w.end) for w in words], "dev", lang)
        baseline.add(utt.id, [w.word for w in words], [(0.0, 0.1)] * 3, [(w.start, w.end) for w in words], "dev", lang)
    report = UnitPolicyReport()
    report.add("eval:dev", "German", "resplit")
    summary = write_alignment_reports(tmp_path, sets, preds, stats, baseline, unit_report=report, max_textgrids=0)
    assert (tmp_path / "aas_by_time.png").stat().st_size > 0
    assert json.loads((tmp_path / "unit_policy.json").read_text())["eval:dev"]["German"]["resplit"] == 1
    md = (tmp_path / "alignment_summary.md").read_text()
    assert "| dev | German | model |" in md and "| dev | all | energy baseline |" in md and "aas_by_time.png" in md
    assert "| eval:dev | German | 0 | 1 | 0 |" in md
    metrics = alignment_metrics(summary)
    english_first = (20.0 + 40.0 + 40.0 + 40.0 + 0.0 + 40.0) / 6  # u0 and u2 starts/ends in 0-1 s, by hand
    bins = summary["model"]["dev"]["English"]["by_time"]
    assert bins["0-1 s"]["aas_ms"] == pytest.approx(english_first)
    assert metrics["val/dev/aas_ms_0to1s"] == pytest.approx(
        summary["model"]["dev"]["all"]["by_time"]["0-1 s"]["aas_ms"]
    )
    assert "val/dev/aas_ms_1to2s" in metrics and "val/dev/aas_time_ratio" in metrics
    assert by_time_table(summary).count("\n") == 2 + 2 * 3  # header + (all, English, German) x (model, baseline)
    assert "Mean signed error of the model" in md and "| dev | +" in md  # every prediction here is late


def test_worst_utterances_table_by_hand(tmp_path):
    """Three clips of one set: u0 exact, u1's second word 400 ms late at both ends (summed error 800 ms),
    u2's first start 100 ms late (100 ms, under the 150 ms mark). Shares 88.9% / 11.1% / 0.0% of the set's
    900 ms, worked out by hand; u1 goes off at word #1 "b" (ref start 1.00 s, +400 ms). The worst clip is
    also plotted."""
    rng = np.random.default_rng(1)
    refs = {
        "u0": [("a", 0.2, 0.5), ("b", 1.0, 1.3)],
        "u1": [("a", 0.2, 0.5), ("b", 1.0, 1.3)],
        "u2": [("a", 0.2, 0.5), ("b", 1.0, 1.3), ("c", 1.6, 1.9)],
    }
    late = {"u0": {}, "u1": {1: (0.4, 0.4)}, "u2": {0: (0.1, 0.0)}}
    sets, preds = {"long": []}, {"long": []}
    stats, baseline = AlignmentStats(), AlignmentStats()
    for k, (uid, words) in enumerate(refs.items()):
        ref = [(a, b) for _, a, b in words]
        pred = [(a + late[uid].get(j, (0, 0))[0], b + late[uid].get(j, (0, 0))[1]) for j, (a, b) in enumerate(ref)]
        utt = Utterance(
            uid, "x.wav", 2.5, " ".join(w for w, _, _ in words), "English", words=[AlignedWord(*w) for w in words]
        )
        sets["long"].append(Sample(utt, (0.01 * rng.standard_normal(40000)).astype(np.float32), k))
        preds["long"].append(pred)
        stats.add(uid, [w for w, _, _ in words], pred, ref, "long", "English")
        baseline.add(uid, [w for w, _, _ in words], ref, ref, "long", "English")
    table = worst_utterances_table(stats.records, count=2)
    rows = [line for line in table.splitlines() if line.startswith("| long |")]
    assert rows == [
        '| long | u1 | 2 | 200.0 | 88.9% | 1 | #1 "b", 1.00, +400 |',
        "| long | u2 | 3 | 16.7 | 11.1% | 0 | – |",
    ]
    write_alignment_reports(tmp_path, sets, preds, stats, baseline, max_textgrids=0, plots_per_language=1)
    assert rows[0] in (tmp_path / "alignment_summary.md").read_text()
    assert sorted(p.name for p in (tmp_path / "plots-long").iterdir()) == ["u0.png", "u1.png"]  # first + worst
    write_alignment_reports(tmp_path / "none", sets, preds, stats, baseline, max_textgrids=0, plots_per_language=0)
    assert not (tmp_path / "none" / "plots-long").exists()  # plots off means off
    assert worst_utterances_table([]) == ""


# ----------------------------------------------------------------------------------------- long clips


def _long_sample(n_words: int = 12, step: float = 0.5) -> Sample:
    words = [AlignedWord(f"w{i}", 0.2 + step * i, 0.2 + step * i + 0.3) for i in range(n_words)]
    seconds = words[-1].end + 0.3
    utt = Utterance("long", "x.wav", seconds, " ".join(w.word for w in words), "English", words=words)
    audio = np.arange(int(seconds * 16000), dtype=np.float32)  # the sample index, to check the cuts
    return Sample(utt, audio, 0)


def test_split_long_sample_cuts_between_words_within_the_limit():
    sample = _long_sample()
    assert split_long_sample(sample, 60.0) == [(0.0, sample)]
    pieces = split_long_sample(sample, 2.0)
    assert sum(len(p.utt.words) for _, p in pieces) == 12
    assert np.array_equal(np.concatenate([p.audio for _, p in pieces]), sample.audio)  # nothing lost or repeated
    for offset, piece in pieces:
        assert piece.audio.size / 16000 <= 2.0
        assert piece.audio[0] == round(offset * 16000)
        for w, orig in zip(
            piece.utt.words, [w for w in sample.utt.words if w.word in piece.utt.text.split()], strict=True
        ):
            assert w.start == pytest.approx(orig.start - offset) and w.end == pytest.approx(orig.end - offset)
    with pytest.raises(ValueError, match="no pause"):
        split_long_sample(_long_sample(step=0.25), 0.2)  # words overlap the cut window: no gap fits


def test_long_clips_are_aligned_in_pieces_equal_to_aligning_the_pieces(tmp_path):
    from qwen3asr_train.config.schema import ModelConfig
    from qwen3asr_train.model.builder import build_model

    model, processor = build_model(
        ModelConfig(source="tiny", task="aligner", num_labels=25), seed=0
    )  # 25 x 80 ms = 2 s
    model.eval()
    rng = np.random.default_rng(1)
    sample = _long_sample(n_words=10)
    sample = Sample(sample.utt, (0.05 * rng.standard_normal(sample.audio.size)).astype(np.float32), 0)
    with pytest.raises(ValueError, match="exceeds"):
        align(model, processor, [sample])
    whole = align(model, processor, [sample], chunk_long=True)[0]
    pieces = split_long_sample(sample, 2.0 - 0.04)
    by_piece = []
    for offset, piece in pieces:
        by_piece += [(round(a + offset, 3), round(b + offset, 3)) for a, b in align(model, processor, [piece])[0]]
    assert len(pieces) > 1 and whole == by_piece
    evaluator = AlignmentEvaluator(processor, {"long": [sample]})
    metrics = evaluator.evaluate(model, tmp_path, write=True)
    assert math.isfinite(metrics["val/long/aas_ms"]) and (tmp_path / "aas_by_time.png").exists()
    assert torch.is_grad_enabled()
