"""Synthetic corpus: manifest shape, word times checked against the waveform, determinism, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

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
