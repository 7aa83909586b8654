"""Manifest parsing and validation: both row shapes, no-speech rows, every bad-row category under both
policies (the message must name ``file:line``), extra languages, duplicate ids, and the HF-datasets source.

Audio is written here with numpy + soundfile; nothing touches the network.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from qwen3asr_train.config.schema import HFDatasetConfig
from qwen3asr_train.data.dataset import UtteranceDataset, load_hf_source
from qwen3asr_train.data.manifest import (
    AlignedWord,
    ManifestError,
    RowChecks,
    SkipReport,
    read_jsonl,
    read_manifest,
    read_manifests,
)
from qwen3asr_train.languages import LanguageTable, UnknownLanguageError
from qwen3asr_train.testing import write_clip

# --------------------------------------------------------------------------- helpers


def make_checks(extra: tuple[str, ...] = (), **kwargs: Any) -> RowChecks:
    return RowChecks(languages=LanguageTable(extra_languages=extra), **kwargs)


def write_rows(path: Path, rows: list[dict | str], compress: bool = False) -> Path:
    """One line per row: dicts are JSON-encoded, strings written verbatim (for malformed lines)."""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def wav_bytes(seconds: float, rate: int = 16000, freq: float = 300.0) -> bytes:
    t = np.arange(int(round(seconds * rate))) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def good_row(i: int, audio: str = "wavs/good.wav") -> dict:
    return {"id": f"good-{i}", "audio": audio, "text": "hello world", "language": "English", "duration": 1.0}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A directory with ``wavs/good.wav`` (1.0 s, 16 kHz) next to where manifests are written."""
    write_clip(tmp_path / "wavs" / "good.wav", 1.0, seed=0)
    return tmp_path


# --------------------------------------------------------------------------- row shapes


@pytest.mark.parametrize(
    ("label", "language", "dialect"),
    [
        ("English", "English", None),
        ("english", "English", None),
        ("en", "English", None),
        ("zh", "Chinese", None),
        ("yue", "Cantonese", None),
        ("Sichuan", "Chinese", "Sichuan"),
        ("Cantonese (Hong Kong)", "Cantonese", "Cantonese (Hong Kong)"),
    ],
)
def test_both_row_shapes_parse_to_the_same_utterance(tmp_path: Path, label, language, dialect):
    wav = write_clip(tmp_path / "wavs" / "a.wav", 1.25, seed=0)
    structured = {"id": "u1", "audio": "wavs/a.wav", "text": "hello world", "language": label, "context": "ctx"}
    upstream = {"id": "u1", "audio": "wavs/a.wav", "text": f"language {label}<asr_text>hello world", "prompt": "ctx"}
    a = read_manifest(write_rows(tmp_path / "s.jsonl", [structured]), make_checks())
    b = read_manifest(write_rows(tmp_path / "u.jsonl", [upstream]), make_checks())
    assert len(a) == len(b) == 1
    for utt in (a[0], b[0]):
        assert utt.id == "u1"
        assert utt.language == language
        assert utt.dialect == dialect
        assert utt.text == "hello world"
        assert utt.context == "ctx"
        assert utt.audio == str(wav)
        assert utt.duration == pytest.approx(1.25)  # from the header: 20000 frames at 16 kHz
        assert utt.offset == 0.0
        assert utt.words is None
        assert not utt.no_speech
    assert a[0].source == f"{tmp_path / 's.jsonl'}:1"
    assert b[0].source == f"{tmp_path / 'u.jsonl'}:1"
    assert dataclasses.replace(a[0], source="") == dataclasses.replace(b[0], source="")


def test_relative_audio_resolves_against_the_manifest_directory(tmp_path: Path, monkeypatch):
    corpus = tmp_path / "corpus"
    wav = write_clip(corpus / "wavs" / "a.wav", 0.5, seed=1)
    elsewhere = write_clip(tmp_path / "elsewhere" / "b.wav", 0.75, seed=2)
    manifest = write_rows(
        corpus / "m.jsonl",
        [
            {"id": "rel", "audio": "wavs/a.wav", "text": "a b", "language": "en"},
            {"id": "abs", "audio": str(elsewhere), "text": "c d", "language": "en"},
        ],
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the cwd must not matter
    rel, absolute = read_manifest(manifest, make_checks())
    assert rel.audio == str(wav)
    assert Path(rel.audio).is_file()
    assert rel.duration == pytest.approx(0.5)
    assert absolute.audio == str(elsewhere)
    assert absolute.duration == pytest.approx(0.75)


def test_gzipped_manifest_reads_like_the_plain_one(corpus: Path):
    rows = [good_row(1), {**good_row(2), "text": "language fr<asr_text>bonjour", "language": None}]
    rows[1].pop("language")
    plain = read_manifest(write_rows(corpus / "m.jsonl", rows), make_checks())
    zipped = read_manifest(write_rows(corpus / "z.jsonl.gz", rows, compress=True), make_checks())
    assert [dataclasses.replace(u, source="") for u in plain] == [dataclasses.replace(u, source="") for u in zipped]
    assert zipped[1].language == "French"
    assert zipped[1].text == "bonjour"
    assert zipped[1].source == f"{corpus / 'z.jsonl.gz'}:2"


def test_default_ids_are_unique_per_line(corpus: Path):
    rows = [{k: v for k, v in good_row(i).items() if k != "id"} for i in range(3)]
    items = read_manifest(write_rows(corpus / "m.jsonl", rows), make_checks())
    assert len({u.id for u in items}) == 3


def test_duration_from_header_and_segments(tmp_path: Path):
    write_clip(tmp_path / "wavs" / "a.wav", 3.0, seed=3, rate=8000)  # 24000 frames at 8 kHz
    rows = [
        {"id": "whole", "audio": "wavs/a.wav", "text": "x", "language": "en"},
        {"id": "tail", "audio": "wavs/a.wav", "text": "x", "language": "en", "offset": 1.0},
        {"id": "seg", "audio": "wavs/a.wav", "text": "x", "language": "en", "offset": 0.5, "duration": 0.75},
        {"id": "given", "audio": "wavs/a.wav", "text": "x", "language": "en", "duration": 2.5},
    ]
    whole, tail, seg, given = read_manifest(write_rows(tmp_path / "m.jsonl", rows), make_checks())
    assert (whole.offset, whole.duration) == (0.0, pytest.approx(3.0))
    assert (tail.offset, tail.duration) == (1.0, pytest.approx(2.0))
    assert (seg.offset, seg.duration) == (0.5, 0.75)
    assert (given.offset, given.duration) == (0.0, 2.5)


def test_words_are_parsed(corpus: Path):
    words = [{"word": "hello", "start": 0.1, "end": 0.4}, {"word": "world", "start": 0.4, "end": 0.9}]
    (utt,) = read_manifest(write_rows(corpus / "m.jsonl", [{**good_row(1), "words": words}]), make_checks())
    assert utt.words == [AlignedWord("hello", 0.1, 0.4), AlignedWord("world", 0.4, 0.9)]


@pytest.mark.parametrize(
    "row",
    [
        {"text": "", "language": "None"},
        {"text": "", "no_speech": True},
        {"text": "", "language": "English", "no_speech": True},
        {"text": "   ", "no_speech": True},
        {"text": "language None<asr_text>"},
        {"text": "language None<asr_text>", "prompt": "some context"},
    ],
)
def test_no_speech_rows(corpus: Path, row):
    (utt,) = read_manifest(write_rows(corpus / "m.jsonl", [{"audio": "wavs/good.wav", **row}]), make_checks())
    assert utt.language is None
    assert utt.no_speech
    assert utt.text == ""
    assert utt.dialect is None
    assert utt.duration == pytest.approx(1.0)


# --------------------------------------------------------------------------- bad rows, both policies


def _random_bytes_wav(d: Path) -> None:
    (d / "wavs" / "bad.wav").write_bytes(np.random.default_rng(0).bytes(4096))


def _truncated_header_wav(d: Path) -> None:
    (d / "wavs" / "bad.wav").write_bytes(wav_bytes(1.0)[:20])  # cut inside the 'fmt ' chunk


def _long_low_rate_wav(d: Path) -> None:
    # 1201 s at 1 kHz: 2.4 MB of int16, read only through its header.
    sf.write(str(d / "wavs" / "bad.wav"), np.zeros(1000 * 1201, dtype=np.int16), 1000, subtype="PCM_16")


BAD_CASES = [
    # (case id, bad line, expected reason, file setup)
    (
        "missing_audio",
        {"audio": "wavs/nope.wav", "text": "a", "language": "en", "duration": 1.0},
        "audio_missing",
        None,
    ),
    ("random_bytes", {"audio": "wavs/bad.wav", "text": "a", "language": "en"}, "audio_unreadable", _random_bytes_wav),
    (
        "truncated_header",
        {"audio": "wavs/bad.wav", "text": "a", "language": "en"},
        "audio_unreadable",
        _truncated_header_wav,
    ),
    ("empty_text", {"audio": "wavs/good.wav", "text": "", "language": "en"}, "empty_text", None),
    ("blank_text", {"audio": "wavs/good.wav", "text": "  \t", "language": "en"}, "empty_text", None),
    ("upstream_empty_text", {"audio": "wavs/good.wav", "text": "language English<asr_text>"}, "empty_text", None),
    ("unknown_language", {"audio": "wavs/good.wav", "text": "a", "language": "Klingon"}, "unknown_language", None),
    ("tajik_not_configured", {"audio": "wavs/good.wav", "text": "a", "language": "Tajik"}, "unknown_language", None),
    (
        "upstream_unknown_language",
        {"audio": "wavs/good.wav", "text": "language Elvish<asr_text>a"},
        "unknown_language",
        None,
    ),
    ("no_language", {"audio": "wavs/good.wav", "text": "a"}, "no_language", None),
    ("malformed_json", '{"audio": "wavs/good.wav", "text": ', "malformed_json", None),
    ("not_an_object", "[1, 2, 3]", "not_an_object", None),
    ("no_audio_field", {"text": "a", "language": "en"}, "no_audio_field", None),
    (
        "too_long_duration_field",
        {"audio": "wavs/good.wav", "text": "a", "language": "en", "duration": 1300.0},
        "audio_too_long",
        None,
    ),
    ("too_long_header", {"audio": "wavs/bad.wav", "text": "a", "language": "en"}, "audio_too_long", _long_low_rate_wav),
    ("negative_offset", {"audio": "wavs/good.wav", "text": "a", "language": "en", "offset": -0.5}, "bad_segment", None),
    ("offset_past_end", {"audio": "wavs/good.wav", "text": "a", "language": "en", "offset": 2.0}, "bad_segment", None),
    ("zero_duration", {"audio": "wavs/good.wav", "text": "a", "language": "en", "duration": 0}, "bad_segment", None),
    (
        "words_not_monotonic",
        {
            "audio": "wavs/good.wav",
            "text": "a b",
            "language": "en",
            "words": [{"word": "a", "start": 0.2, "end": 0.6}, {"word": "b", "start": 0.3, "end": 0.8}],
        },
        "bad_words",
        None,
    ),
    (
        "words_past_end",
        {"audio": "wavs/good.wav", "text": "a", "language": "en", "words": [{"word": "a", "start": 0.2, "end": 1.5}]},
        "bad_words",
        None,
    ),
    (
        "words_negative_start",
        {"audio": "wavs/good.wav", "text": "a", "language": "en", "words": [{"word": "a", "start": -0.1, "end": 0.5}]},
        "bad_words",
        None,
    ),
    (
        "words_start_after_end",
        {"audio": "wavs/good.wav", "text": "a", "language": "en", "words": [{"word": "a", "start": 0.6, "end": 0.5}]},
        "bad_words",
        None,
    ),
    (
        "words_missing_key",
        {"audio": "wavs/good.wav", "text": "a", "language": "en", "words": [{"word": "a", "start": 0.1}]},
        "bad_words",
        None,
    ),
    ("words_not_a_list", {"audio": "wavs/good.wav", "text": "a", "language": "en", "words": "a"}, "bad_words", None),
    ("no_speech_with_text", {"audio": "wavs/good.wav", "text": "hello", "language": "None"}, "bad_text", None),
    ("no_speech_flag_with_text", {"audio": "wavs/good.wav", "text": "hello", "no_speech": True}, "bad_text", None),
    (
        "upstream_no_speech_with_text",
        {"audio": "wavs/good.wav", "text": "language None<asr_text>hello"},
        "bad_text",
        None,
    ),
    ("upstream_bad_prefix", {"audio": "wavs/good.wav", "text": "lang English<asr_text>hello"}, "bad_text", None),
    ("text_not_string", {"audio": "wavs/good.wav", "text": 5, "language": "en"}, "bad_text", None),
]


def _bad_manifest(corpus: Path, bad_line: dict | str, setup) -> Path:
    if setup is not None:
        setup(corpus)
    return write_rows(corpus / "m.jsonl", [good_row(1), bad_line, good_row(3)])


@pytest.mark.parametrize(("bad_line", "reason", "setup"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_row_raises_with_file_and_line(corpus: Path, bad_line, reason, setup):
    manifest = _bad_manifest(corpus, bad_line, setup)
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, make_checks(), policy="error")
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{manifest}:2: ")


@pytest.mark.parametrize(("bad_line", "reason", "setup"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_row_is_skipped_and_counted(corpus: Path, bad_line, reason, setup):
    manifest = _bad_manifest(corpus, bad_line, setup)
    report = SkipReport()
    items = read_manifest(manifest, make_checks(), policy="skip", report=report)
    assert [u.id for u in items] == ["good-1", "good-3"]
    assert dict(report.counts) == {reason: 1}
    assert report.total == 1
    assert len(report.examples) == 1 and report.examples[0].startswith(f"{manifest}:2: ")


def test_skip_counts_every_reason_across_manifests(corpus: Path, caplog):
    _random_bytes_wav(corpus)
    a = write_rows(
        corpus / "a.jsonl",
        [
            good_row(1),
            {"audio": "wavs/nope.wav", "text": "a", "language": "en", "duration": 1.0},
            "not json",
            {"audio": "wavs/good.wav", "text": "", "language": "en"},
        ],
    )
    b = write_rows(
        corpus / "b.jsonl",
        [
            {"audio": "wavs/bad.wav", "text": "a", "language": "en"},
            good_row(2),
            {"audio": "wavs/good.wav", "text": "a", "language": "xx"},
            {"audio": "wavs/nope.wav", "text": "a", "language": "en", "duration": 1.0},
        ],
    )
    with caplog.at_level("WARNING", logger="qwen3asr_train.data.manifest"):
        items = read_manifests([a, b], make_checks(), policy="skip")
    assert [u.id for u in items] == ["good-1", "good-2"]
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped 6 bad rows" in warning
    for reason in ("audio_missing", "malformed_json", "empty_text", "audio_unreadable", "unknown_language"):
        assert reason in warning
    assert "'audio_missing': 2" in warning


def test_skip_policy_still_fails_when_nothing_is_usable(corpus: Path):
    manifest = write_rows(corpus / "m.jsonl", ["nope", {"audio": "wavs/nope.wav", "text": "a", "language": "en"}])
    with pytest.raises(ManifestError, match="no usable rows") as info:
        read_manifest(manifest, make_checks(), policy="skip")
    assert info.value.reason == "empty_manifest"


def test_missing_manifest(tmp_path: Path):
    with pytest.raises(ManifestError, match="manifest not found") as info:
        read_manifest(tmp_path / "absent.jsonl", make_checks())
    assert str(tmp_path / "absent.jsonl") in str(info.value)


def test_blank_lines_are_ignored_and_line_numbers_stay_true(corpus: Path):
    manifest = corpus / "m.jsonl"
    manifest.write_text(json.dumps(good_row(1)) + "\n\n   \n" + '{"audio": "wavs/good.wav"}\n', encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, make_checks())
    assert str(info.value).startswith(f"{manifest}:4: ")


def test_max_and_min_duration_are_configurable(corpus: Path):
    rows = [good_row(1), {**good_row(2), "duration": 0.2}, {**good_row(3), "duration": 30.0}]
    manifest = write_rows(corpus / "m.jsonl", rows)
    report = SkipReport()
    items = read_manifest(manifest, make_checks(max_duration=20.0, min_duration=0.5, check_audio=False), "skip", report)
    assert [u.id for u in items] == ["good-1"]
    assert dict(report.counts) == {"audio_too_short": 1, "audio_too_long": 1}


# --------------------------------------------------------------------------- languages and ids


def test_extra_language_is_accepted(corpus: Path):
    table = LanguageTable(extra_languages=["Tajik"])
    assert table.resolve("Tajik") == ("Tajik", None)
    assert table.resolve("tajik") == ("Tajik", None)
    assert "Tajik" in table.names and len(table.names) == 31
    with pytest.raises(UnknownLanguageError):
        LanguageTable().resolve("Tajik")
    rows = [
        {"id": "t1", "audio": "wavs/good.wav", "text": "салом", "language": "Tajik"},
        {"id": "t2", "audio": "wavs/good.wav", "text": "language Tajik<asr_text>салом"},
    ]
    items = read_manifest(write_rows(corpus / "m.jsonl", rows), make_checks(extra=("Tajik",)))
    assert [u.language for u in items] == ["Tajik", "Tajik"]
    assert items[1].text == "салом"


def test_extra_language_does_not_duplicate_a_supported_one():
    assert LanguageTable(extra_languages=["English"]).names == LanguageTable().names


def test_dialects_can_be_disabled():
    with pytest.raises(UnknownLanguageError):
        LanguageTable(allow_dialects=False).resolve("Sichuan")
    assert LanguageTable(allow_dialects=False).resolve("zh") == ("Chinese", None)


def test_duplicate_ids_across_manifests_raise(corpus: Path):
    a = write_rows(corpus / "a.jsonl", [good_row(1), good_row(2)])
    b = write_rows(corpus / "b.jsonl", [good_row(3), good_row(2)])
    with pytest.raises(ManifestError, match="duplicate utterance ids") as info:
        read_manifests([a, b], make_checks())
    assert "good-2" in str(info.value)
    assert len(read_manifests([a], make_checks())) == 2


def test_duplicate_ids_within_one_manifest_raise(corpus: Path):
    a = write_rows(corpus / "a.jsonl", [good_row(1), good_row(1)])
    with pytest.raises(ManifestError, match="duplicate utterance ids"):
        read_manifests([a], make_checks())


def test_rows_without_ids_in_differently_named_manifests_do_not_collide(corpus: Path):
    rows = [{k: v for k, v in good_row(i).items() if k != "id"} for i in range(2)]
    a = write_rows(corpus / "a.jsonl", rows)
    b = write_rows(corpus / "b.jsonl", rows)
    assert len(read_manifests([a, b], make_checks())) == 4


def test_rows_without_ids_in_same_named_manifests_do_not_collide(corpus: Path):
    rows = [{k: v for k, v in good_row(i).items() if k != "id"} for i in range(2)]
    a = write_rows(corpus / "corpusA" / "train.jsonl", [{**r, "audio": "../wavs/good.wav"} for r in rows])
    b = write_rows(corpus / "corpusB" / "train.jsonl", [{**r, "audio": "../wavs/good.wav"} for r in rows])
    assert len(read_manifests([a, b], make_checks())) == 4


@pytest.mark.parametrize(
    "field_value",
    [{"duration": "long"}, {"offset": "soon"}, {"duration": [1.0]}],
    ids=["duration_str", "offset_str", "duration_list"],
)
def test_non_numeric_segment_fields_are_bad_rows(corpus: Path, field_value):
    manifest = write_rows(corpus / "m.jsonl", [good_row(1), {**good_row(2), **field_value}])
    report = SkipReport()
    items = read_manifest(manifest, make_checks(), policy="skip", report=report)
    assert [u.id for u in items] == ["good-1"]
    assert report.total == 1


def test_nan_duration_is_a_bad_row(corpus: Path):
    manifest = write_rows(corpus / "m.jsonl", [good_row(1), {**good_row(2), "duration": float("nan")}])
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, make_checks())
    assert str(info.value).startswith(f"{manifest}:2: ")


# --------------------------------------------------------------------------- HF datasets source


def _save_hf(tmp_path: Path, columns: dict, audio_feature: bool = True) -> Path:
    import datasets

    features = {name: datasets.Value("string") for name in columns if name != "audio"}
    if audio_feature:
        # Build the Arrow struct {bytes, path} directly, then cast to Audio: encoding through the Audio
        # feature would need torchcodec, which this environment (by design) does not have.
        features["audio"] = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    else:
        features["audio"] = datasets.Value("binary")
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    if audio_feature:
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
    path = tmp_path / "hf"
    ds.save_to_disk(str(path))
    return path


def _hf_columns() -> dict:
    return {
        "audio": [
            {"bytes": wav_bytes(1.0), "path": None},
            {"bytes": wav_bytes(0.5, rate=8000), "path": None},
            {"bytes": wav_bytes(0.75, rate=44100), "path": None},
        ],
        "sentence": ["hello there", "bonjour", "你好"],
        "lang": ["en", "French", "Sichuan"],
        "key": ["a", "b", "c"],
        "ctx": ["names: Ada", None, ""],
    }


def _hf_cfg(path: Path, **kw) -> HFDatasetConfig:
    return HFDatasetConfig(
        path=str(path), text_column="sentence", language_column="lang", id_column="key", context_column="ctx", **kw
    )


def test_hf_source_utterances(tmp_path: Path):
    path = _save_hf(tmp_path, _hf_columns())
    items, ds = load_hf_source(_hf_cfg(path), make_checks(), "error")
    assert len(ds) == 3
    assert [u.id for u in items] == ["a", "b", "c"]
    assert [u.text for u in items] == ["hello there", "bonjour", "你好"]
    assert [u.language for u in items] == ["English", "French", "Chinese"]
    assert [u.dialect for u in items] == [None, None, "Sichuan"]
    assert [u.duration for u in items] == pytest.approx([1.0, 0.5, 0.75])
    assert [u.context for u in items] == ["names: Ada", "", ""]
    assert [u.source for u in items] == [f"{path}[train]:{i}" for i in range(3)]


def test_hf_source_fixed_language_and_default_ids(tmp_path: Path):
    columns = {k: v for k, v in _hf_columns().items() if k in ("audio", "sentence")}
    path = _save_hf(tmp_path, columns)
    cfg = HFDatasetConfig(path=str(path), text_column="sentence", language_column=None, language="de")
    items, _ = load_hf_source(cfg, make_checks(), "error")
    assert [u.language for u in items] == ["German"] * 3
    assert [u.id for u in items] == ["hf-0", "hf-1", "hf-2"]


def test_hf_source_missing_columns(tmp_path: Path):
    path = _save_hf(tmp_path, _hf_columns())
    with pytest.raises(ManifestError, match="text_column='text'"):
        load_hf_source(HFDatasetConfig(path=str(path), language_column="lang"), make_checks(), "error")


def test_hf_source_bad_rows_follow_the_policy(tmp_path: Path):
    columns = _hf_columns()
    columns["audio"][1] = {"bytes": np.random.default_rng(0).bytes(1000), "path": None}
    columns["lang"][2] = "Klingon"
    path = _save_hf(tmp_path, columns)
    with pytest.raises(ManifestError) as info:
        load_hf_source(_hf_cfg(path), make_checks(), "error")
    assert str(info.value).startswith(f"{path}[train]:1: ")
    assert info.value.reason == "audio_unreadable"
    items, _ = load_hf_source(_hf_cfg(path), make_checks(), "skip")
    assert [u.id for u in items] == ["a"]


def test_hf_source_binary_audio_column(tmp_path: Path):
    columns = _hf_columns()
    columns["audio"] = [cell["bytes"] for cell in columns["audio"]]
    path = _save_hf(tmp_path, columns, audio_feature=False)
    items, _ = load_hf_source(_hf_cfg(path), make_checks(), "error")
    assert [u.duration for u in items] == pytest.approx([1.0, 0.5, 0.75])


def test_hf_source_audio_reference_keeps_the_hf_scheme(tmp_path: Path):
    items, _ = load_hf_source(_hf_cfg(_save_hf(tmp_path, _hf_columns())), make_checks(), "error")
    assert [u.audio for u in items] == ["hf://0", "hf://1", "hf://2"]


def test_hf_source_decodes_through_utterance_dataset(tmp_path: Path):
    items, ds = load_hf_source(_hf_cfg(_save_hf(tmp_path, _hf_columns())), make_checks(), "error")
    dataset = UtteranceDataset(items, on_bad_audio="error", hf_dataset=ds, hf_audio_column="audio")
    for i, seconds in enumerate([1.0, 0.5, 0.75]):
        sample = dataset.load(i)
        assert sample is not None and sample.index == i
        assert sample.audio.dtype == np.float32
        assert abs(len(sample.audio) - seconds * 16000) <= 1
        # a 300 Hz tone at amplitude 0.3 survives decoding and resampling
        assert np.abs(sample.audio).max() == pytest.approx(0.3, abs=0.02)


def test_hf_source_missing_language_column_is_a_clear_error(tmp_path: Path):
    columns = {k: v for k, v in _hf_columns().items() if k in ("audio", "sentence")}
    path = _save_hf(tmp_path, columns)
    cfg = HFDatasetConfig(path=str(path), text_column="sentence", language="German")  # language_column default
    try:
        items, _ = load_hf_source(cfg, make_checks(), "skip")
    except ManifestError as exc:
        assert "language" in str(exc)
    else:
        assert [u.language for u in items] == ["German"] * 3


def test_read_jsonl_returns_the_values_and_names_a_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "results-x.jsonl"
    # BOM on line 1, a blank line, a non-ASCII string: written by hand, read back value for value
    good.write_bytes('\ufeff{"id": "a", "n": 1}\n\n{"id": "b", "text": "über"}\n'.encode())
    assert read_jsonl(good) == [{"id": "a", "n": 1}, {"id": "b", "text": "über"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n{"id": \n', encoding="utf-8")
    with pytest.raises(ManifestError, match=rf"{bad}:2: malformed JSON"):
        read_jsonl(bad)
