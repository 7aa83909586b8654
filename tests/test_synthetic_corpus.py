"""Synthetic corpus: manifest shape, word times checked against the waveform, determinism, idempotence, and the
held-out split of unseen voices and speaking rates (never used by train/test) with cased, punctuated text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from qwen3asr_train.data.word_units import split_words
from qwen3asr_train.tools import synthetic
from qwen3asr_train.tools.synthetic import (
    Espeak,
    EspeakUnavailableError,
    espeak_available,
    make_corpus,
    write_tone_corpus,
)

requires_espeak = pytest.mark.skipif(
    not espeak_available(), reason="espeak-ng is not installed (apt-get install -y espeak-ng libespeak-ng1)"
)
ARGS = dict(languages=("en", "zh"), num_train=4, num_test=2, seed=7, words_per_clip=(3, 6), num_no_speech=2)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _check_rows(rows: list[dict], silent_pads: bool) -> None:
    """Shape, audio format and word times, the latter against the waveform itself."""
    for row in rows:
        assert set(row) == {"id", "audio", "text", "language", "duration", "words"}
        info = sf.info(row["audio"])
        assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
        assert info.frames / 16_000 == pytest.approx(row["duration"], abs=1e-6)
        units = list(row["text"]) if row["language"] == "Chinese" else row["text"].split()
        assert [w["word"] for w in row["words"]] == units
        times = [t for w in row["words"] for t in (w["start"], w["end"])]
        assert times == sorted(times) and 0 <= times[0] and times[-1] <= row["duration"]
        assert all(w["end"] - w["start"] >= 0.019 for w in row["words"])
        assert all(round(t, 3) == t for t in times)
        if not silent_pads:
            continue
        audio, sr = sf.read(row["audio"])
        first, last = round(times[0] * sr), round(times[-1] * sr)
        eps = 1e-3 * np.abs(audio).max()  # -60 dB re peak: "audible"
        loud = np.flatnonzero(np.abs(audio) > eps)  # independent onset/offset of sound
        assert abs(loud[0] - first) / sr < 0.005 and abs(loud[-1] - last) / sr < 0.005, row["id"]
        assert np.abs(audio[: max(0, first - 80)]).max(initial=0) < 1e-4  # padded silence before word 1
        assert np.abs(audio[last + 80 :]).max(initial=0) < 1e-4
        speech_rms = np.sqrt(np.mean(audio[first:last] ** 2))
        for w in row["words"]:
            span = audio[round(w["start"] * sr) : round(w["end"] * sr)]
            assert np.sqrt(np.mean(span**2)) > 0.1 * speech_rms, (row["id"], w)
            assert min(np.abs(span[:160]).max(), np.abs(span[-160:]).max()) > eps, (row["id"], w)  # sound at edges


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("syn"), workers=1, **ARGS)


@requires_espeak
def test_corpus_audio_and_word_times(corpus: dict[str, Path]) -> None:
    rows = _rows(corpus["train"]) + _rows(corpus["test"])
    assert len(rows) == 6 and {r["language"] for r in rows} == {"English", "Chinese"}
    assert all(Path(r["audio"]).is_absolute() for r in rows)
    _check_rows(rows, silent_pads=True)
    assert all(" " not in r["text"] for r in rows if r["language"] == "Chinese")
    no_speech = _rows(corpus["no_speech"])
    assert len(no_speech) == 2
    for row in no_speech:
        assert (row["language"], row["text"], row["words"], row["no_speech"]) == ("None", "", [], True)
        assert sf.info(row["audio"]).frames / 16_000 == pytest.approx(row["duration"])


@requires_espeak
def test_deterministic_across_workers_and_idempotent(corpus: dict[str, Path], tmp_path: Path) -> None:
    before = {k: p.stat().st_mtime_ns for k, p in corpus.items()}
    assert make_corpus(corpus["train"].parent, workers=1, **ARGS) == corpus  # cached: nothing rewritten
    assert {k: p.stat().st_mtime_ns for k, p in corpus.items()} == before
    again = make_corpus(tmp_path, workers=2, **ARGS)  # spawned workers, same seed
    for split in ("train", "test", "no_speech"):
        a, b = _rows(corpus[split]), _rows(again[split])
        assert [(r["id"], r["text"], r["language"]) for r in a] == [(r["id"], r["text"], r["language"]) for r in b]
    _check_rows(_rows(again["train"]), silent_pads=True)
    # the same worker count twice: bit-identical audio (a pool handing out chunks used to make it differ)
    twice = make_corpus(tmp_path / "twice", workers=2, **ARGS)
    for split in ("train", "test", "no_speech"):
        for a, b in zip(_rows(again[split]), _rows(twice[split]), strict=True):
            assert Path(a["audio"]).read_bytes() == Path(b["audio"]).read_bytes(), a["id"]
            assert (a["duration"], a["words"]) == (b["duration"], b["words"])


@requires_espeak
def test_noise_and_language_switch_rejection(tmp_path: Path) -> None:
    assert Espeak.get().synthesize("le weekend", "fr").switched_language  # espeak reads it as English
    assert not Espeak.get().synthesize("le chat", "fr").switched_language
    manifests = make_corpus(tmp_path, languages=("ru",), num_train=1, num_test=0, seed=1, noise_snr_db=(10, 20))
    (row,) = _rows(manifests["train"])
    _check_rows([row], silent_pads=False)
    audio, sr = sf.read(row["audio"])
    assert np.abs(audio[: int(row["words"][0]["start"] * sr)]).max() > 1e-3  # the pad is noisy now


def test_missing_library_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(Espeak, "_instance", None)
    monkeypatch.setattr(synthetic.ctypes, "CDLL", fail)
    with pytest.raises(EspeakUnavailableError, match="install espeak-ng"):
        Espeak.get()


def test_tone_corpus_without_espeak(tmp_path: Path) -> None:
    manifest = write_tone_corpus(tmp_path, 8, seed=3)
    rows = _rows(manifest)
    assert len(rows) == 8 and all(0.5 <= r["duration"] <= 3.0 for r in rows)
    _check_rows(rows, silent_pads=True)
    assert [r["text"] for r in rows] == [r["text"] for r in _rows(write_tone_corpus(tmp_path / "b", 8, seed=3))]


@requires_espeak
def test_version_1_corpora_unchanged(corpus: dict[str, Path]) -> None:
    """Texts written by the generator before the held-out options existed (recorded from that code) and the
    ``corpus_config.json`` record are unchanged, so corpora made earlier are recognised and left alone."""
    assert [r["text"] for r in _rows(corpus["train"])] == [
        "old pencil tree mother small stone",
        "城市学校白",
        "ball morning dark fish window dream",
        "学生黑家",
    ]
    assert [r["text"] for r in _rows(corpus["test"])] == ["small table bright dog city cloud", "老师狗"]
    record = json.loads((corpus["train"].parent / "corpus_config.json").read_text())["config"]
    assert set(record) == {
        "languages",
        "num_train",
        "num_test",
        "seed",
        "words_per_clip",
        "num_no_speech",
        "noise_snr_db",
        "vocabulary_size",
        "version",
    }
    assert record["version"] == 1


UNSEEN = dict(
    languages=("en", "zh"),
    num_train=8,
    num_test=2,
    num_unseen=6,
    seed=3,
    words_per_clip=(2, 5),
    rate_wpm=(140, 200),
    unseen_voices=("+m3", "+f3"),
    unseen_rate_wpm=((110, 130), (210, 230)),
    cased=True,
)


@pytest.fixture(scope="module")
def unseen_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("unseen"), workers=1, **UNSEEN)


@requires_espeak
def test_unseen_split_uses_only_held_out_voices_and_rates(unseen_corpus: dict[str, Path]) -> None:
    assert set(unseen_corpus) == {"train", "test", "test_unseen"}
    seen = _rows(unseen_corpus["train"]) + _rows(unseen_corpus["test"])
    unseen = _rows(unseen_corpus["test_unseen"])
    assert (len(seen), len(unseen)) == (10, 6)
    assert all(r["id"].startswith("syn-test_unseen-") for r in unseen)
    for row in seen:
        variant = "+" + row["synthesis"]["voice"].partition("+")[2]
        assert variant not in {"+m3", "+f3"}, row["id"]
        assert 140 <= row["synthesis"]["rate_wpm"] < 200, row["id"]
    for row in unseen:
        assert row["synthesis"]["voice"].endswith(("+m3", "+f3")), row["id"]
        rate = row["synthesis"]["rate_wpm"]
        assert 110 <= rate < 130 or 210 <= rate < 230, row["id"]
    assert {r["language"] for r in unseen} == {"English", "Chinese"}


@requires_espeak
def test_cased_punctuated_text_and_word_rows(unseen_corpus: dict[str, Path]) -> None:
    rows = [r for split in unseen_corpus.values() for r in _rows(split)]
    for row in rows:
        text = row["text"]
        assert text[-1] in ".?!。？！", text
        # the word rows are the aligner's word units of the cased, punctuated text (independent splitter)
        assert [w["word"] for w in row["words"]] == split_words(text, row["language"]), text
        if row["language"] == "English":
            assert text[0].isupper() and text[1:] == text[1:].lower(), text
            assert text.rstrip(".?!").replace(",", "").split() == [w["word"] for w in row["words"]]
        times = [t for w in row["words"] for t in (w["start"], w["end"])]
        assert times == sorted(times) and 0 <= times[0] and times[-1] <= row["duration"]
    assert any("," in r["text"] for r in rows if r["language"] == "English")  # fixed seed: some commas
    assert len({r["text"][-1] for r in rows}) >= 2  # more than one kind of sentence end


@requires_espeak
def test_unseen_options_are_recorded_and_idempotent(unseen_corpus: dict[str, Path]) -> None:
    folder = unseen_corpus["train"].parent
    record = json.loads((folder / "corpus_config.json").read_text())["config"]
    assert record["unseen_voices"] == ["+m3", "+f3"] and record["unseen_rate_wpm"] == [[110, 130], [210, 230]]
    assert record["cased"] is True and record["num_unseen"] == 6 and record["rate_wpm"] == [140, 200]
    before = {k: p.stat().st_mtime_ns for k, p in unseen_corpus.items()}
    assert make_corpus(folder, workers=1, **UNSEEN) == unseen_corpus
    assert {k: p.stat().st_mtime_ns for k, p in unseen_corpus.items()} == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(unseen_rate_wpm=((190, 220),)), "overlaps the training rates"),
        (dict(unseen_voices=("+x9",)), "neither a variant"),
        (dict(unseen_voices=(), unseen_rate_wpm=()), "needs unseen_voices"),
        (dict(languages=("ru",), unseen_voices=("ru",)), "leave no ru voice"),
        (dict(rate_wpm=(200, 140)), "0 < low < high"),
    ],
)
def test_held_out_options_refused_before_any_audio(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_corpus(tmp_path, workers=1, **{**UNSEEN, **change})
    assert not (tmp_path / "wavs").exists()


def test_rate_draw_covers_the_union_of_ranges() -> None:
    rng = np.random.default_rng(0)
    draws = {synthetic._draw_rate(rng, ((110, 113), (210, 212))) for _ in range(400)}
    assert draws == {110, 111, 112, 210, 211}  # half-open ranges, every value reachable, nothing else


def test_voice_combinations_partition_the_voices() -> None:
    cfg = synthetic.CorpusConfig(("en",), 1, 1, 0, (1, 2), 0, None, unseen_voices=("+m3", "en"))
    seen = synthetic._voice_combinations("en", cfg, unseen=False)
    unseen = synthetic._voice_combinations("en", cfg, unseen=True)
    every = {v + var for v in synthetic.VOICES["en"] for var in synthetic.VARIANTS}
    assert set(seen) | set(unseen) == every and not set(seen) & set(unseen)
    assert set(seen) == {"en-us" + var for var in synthetic.VARIANTS if var != "+m3"}
