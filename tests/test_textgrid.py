"""MFA TextGrid -> manifest rows in the aligner's word units, on hand-written TextGrids."""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("praatio")

from qwen3asr_train.data.word_units import split_words  # noqa: E402
from qwen3asr_train.tools.textgrid import TextGridError, mfa_corpus_to_manifest, textgrid_to_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Long format, as MFA 3 writes it (empty intervals are silence).
ENGLISH_LONG = """File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 2.0
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 2.0
        intervals: size = 8
        intervals [1]:
            xmin = 0
            xmax = 0.2
            text = ""
        intervals [2]:
            xmin = 0.2
            xmax = 0.55
            text = "hello"
        intervals [3]:
            xmin = 0.55
            xmax = 0.6
            text = ","
        intervals [4]:
            xmin = 0.6
            xmax = 0.95
            text = "world"
        intervals [5]:
            xmin = 0.95
            xmax = 1.1
            text = "sil"
        intervals [6]:
            xmin = 1.1
            xmax = 1.3
            text = "it's"
        intervals [7]:
            xmin = 1.3
            xmax = 1.7
            text = "fine"
        intervals [8]:
            xmin = 1.7
            xmax = 2.0
            text = "sp"
    item [2]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0
        xmax = 2.0
        intervals: size = 1
        intervals [1]:
            xmin = 0
            xmax = 2.0
            text = ""
"""
ENGLISH_WORDS = [
    {"word": "Hello", "start": 0.2, "end": 0.55},
    {"word": "world", "start": 0.6, "end": 0.95},
    {"word": "It's", "start": 1.1, "end": 1.3},
    {"word": "fine", "start": 1.3, "end": 1.7},
]

Tier = list[tuple[float, float, str]]


def long_format(tiers: dict[str, Tier], xmax: float) -> str:
    """A long-format TextGrid (MFA's default output), gaps not filled: praatio reads both."""
    out = [
        'File type = "ooTextFile"',
        'Object class = "TextGrid"',
        "",
        "xmin = 0",
        f"xmax = {xmax}",
        "tiers? <exists>",
        f"size = {len(tiers)}",
        "item []:",
    ]
    for i, (name, ivs) in enumerate(tiers.items(), 1):
        out += [
            f"    item [{i}]:",
            '        class = "IntervalTier"',
            f'        name = "{name}"',
            "        xmin = 0",
            f"        xmax = {xmax}",
            f"        intervals: size = {len(ivs)}",
        ]
        for j, (s, e, label) in enumerate(ivs, 1):
            out += [
                f"        intervals [{j}]:",
                f"            xmin = {s}",
                f"            xmax = {e}",
                f'            text = "{label}"',
            ]
    return "\n".join(out) + "\n"


def short_format(tiers: dict[str, Tier], xmax: float) -> str:
    out = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "0", str(xmax), "<exists>", str(len(tiers))]
    for name, ivs in tiers.items():
        out += ['"IntervalTier"', f'"{name}"', "0", str(xmax), str(len(ivs))]
        for s, e, label in ivs:
            out += [str(s), str(e), f'"{label}"']
    return "\n".join(out) + "\n"


def write(tmp_path: Path, text: str, name: str = "utt.TextGrid") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def words_of(row: dict) -> list[tuple[str, float, float]]:
    return [(w["word"], w["start"], w["end"]) for w in row["words"]]


def test_english_long_format_with_silences_and_punctuation(tmp_path: Path) -> None:
    text = "Hello, world! It's fine."
    row = textgrid_to_rows(write(tmp_path, ENGLISH_LONG), text, "en", "a.wav")
    assert row == {
        "id": "utt",
        "audio": "a.wav",
        "text": text,
        "language": "English",
        "duration": 2.0,
        "words": ENGLISH_WORDS,
    }
    assert [w["word"] for w in row["words"]] == split_words(text, "English")


def test_english_short_format_reads_the_same(tmp_path: Path) -> None:
    words = [(0.2, 0.55, "hello"), (0.6, 0.95, "world"), (0.95, 1.1, "sil"), (1.1, 1.3, "it's"), (1.3, 1.7, "fine")]
    path = write(tmp_path, short_format({"words": words}, 2.0))
    row = textgrid_to_rows(path, "Hello, world! It's fine.", "English", "a.wav")
    assert row is not None and row["words"] == ENGLISH_WORDS


def test_unit_spanning_several_mfa_words_takes_their_span(tmp_path: Path) -> None:
    words = [(0.1, 0.4, "john"), (0.4, 0.5, "'s"), (0.5, 0.9, "well"), (0.9, 1.2, "known"), (1.2, 1.5, "car")]
    row = textgrid_to_rows(write(tmp_path, long_format({"words": words}, 1.6)), "John's well-known car", "English", "x")
    assert words_of(row) == [("John's", 0.1, 0.5), ("wellknown", 0.5, 1.2), ("car", 1.2, 1.5)]


def test_chinese_word_timed_per_character_from_pinyin_phones(tmp_path: Path) -> None:
    tiers = {
        "words": [(0.1, 0.6, "你好"), (0.7, 0.9, "吗")],
        "phones": [
            (0.1, 0.2, "n"),
            (0.2, 0.35, "i3"),
            (0.35, 0.45, "h"),
            (0.45, 0.6, "ao3"),
            (0.7, 0.78, "m"),
            (0.78, 0.9, "a5"),
        ],
    }
    stats: Counter[str] = Counter()
    row = textgrid_to_rows(write(tmp_path, long_format(tiers, 1.0)), "你好吗？", "Chinese", "x", stats=stats)
    assert words_of(row) == [("你", 0.1, 0.35), ("好", 0.35, 0.6), ("吗", 0.7, 0.9)]
    assert stats["words_split_by_phones"] == 1 and stats["utterances_split_by_phones"] == 1
    assert stats["words_split_by_even"] == 0


def test_mandarin_mfa_ipa_codas(tmp_path: Path) -> None:
    # 今天: coda n before the onset tʰ closes 今; 我年 (one word here): a lone "n"+glide is ambiguous -> its middle.
    tiers = {
        "words": [(0.0, 0.6, "今天"), (0.6, 1.2, "我年")],
        "phones": [
            (0.0, 0.1, "tɕ"),
            (0.1, 0.2, "i˥˥"),
            (0.2, 0.3, "n"),
            (0.3, 0.4, "tʰ"),
            (0.4, 0.45, "j"),
            (0.45, 0.55, "e˥˥"),
            (0.55, 0.6, "n"),
            (0.6, 0.7, "w"),
            (0.7, 0.9, "o˨˩˦"),
            (0.9, 1.0, "n"),
            (1.0, 1.05, "j"),
            (1.05, 1.15, "e˧˥"),
            (1.15, 1.2, "n"),
        ],
    }
    row = textgrid_to_rows(write(tmp_path, long_format(tiers, 1.2)), "今天我年", "zh", "x")
    assert words_of(row) == [("今", 0.0, 0.3), ("天", 0.3, 0.6), ("我", 0.6, 0.95), ("年", 0.95, 1.2)]


@pytest.mark.parametrize("phones", [None, [(0.1, 0.3, "n"), (0.3, 0.6, "i3")]], ids=["no_phones_tier", "bad_count"])
def test_chinese_word_split_evenly_without_usable_phones(tmp_path: Path, phones: Tier | None) -> None:
    tiers = {"words": [(0.1, 0.7, "你好们")]} | ({"phones": phones} if phones else {})
    stats: Counter[str] = Counter()
    row = textgrid_to_rows(write(tmp_path, long_format(tiers, 1.0)), "你好们", "Chinese", "x", stats=stats)
    assert words_of(row) == [("你", 0.1, 0.3), ("好", 0.3, 0.5), ("们", 0.5, 0.7)]
    assert stats["words_split_by_even"] == 1 and stats["utterances_split_by_even"] == 1


def test_chinese_with_latin_inside(tmp_path: Path) -> None:
    words = [(0.0, 0.4, "我爱"), (0.5, 1.0, "python")]
    row = textgrid_to_rows(write(tmp_path, long_format({"words": words}, 1.0)), "我爱Python！", "Chinese", "x")
    assert words_of(row) == [("我", 0.0, 0.2), ("爱", 0.2, 0.4), ("Python", 0.5, 1.0)]


UNK_TIERS = {
    "words": [(0.1, 0.4, "the"), (0.4, 0.9, "<unk>"), (1.0, 1.3, "sat")],
    "phones": [(0.1, 0.2, "ð"), (0.2, 0.4, "ə"), (0.4, 0.9, "spn"), (1.0, 1.1, "s"), (1.1, 1.2, "æ"), (1.2, 1.3, "t")],
}


def test_unk_dropped_by_default_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, long_format(UNK_TIERS, 1.5))
    stats: Counter[str] = Counter()
    assert textgrid_to_rows(path, "The zyzzyva sat.", "English", "x", stats=stats) is None
    assert stats["dropped_unk"] == 1
    assert str(path) in caplog.text and "zyzzyva" in caplog.text


def test_unk_error_policy_raises(tmp_path: Path) -> None:
    path = write(tmp_path, long_format(UNK_TIERS, 1.5))
    with pytest.raises(TextGridError, match="could not align") as err:
        textgrid_to_rows(path, "The zyzzyva sat.", "English", "x", unk_policy="error")
    assert err.value.reason == "unk" and str(path) in str(err.value)


def test_unk_interpolate_uses_the_unk_interval(tmp_path: Path) -> None:
    path = write(tmp_path, long_format(UNK_TIERS, 1.5))
    stats: Counter[str] = Counter()
    row = textgrid_to_rows(path, "The zyzzyva sat.", "English", "x", unk_policy="interpolate", stats=stats)
    assert words_of(row) == [("The", 0.1, 0.4), ("zyzzyva", 0.4, 0.9), ("sat", 1.0, 1.3)]
    assert stats["interpolated_utterances"] == 1 and stats["interpolated_words"] == 1


def test_spn_phones_under_a_known_word_count_as_unaligned(tmp_path: Path) -> None:
    tiers = {"words": [(0.1, 0.4, "the"), (0.4, 0.9, "zyzzyva")], "phones": [(0.1, 0.4, "ð"), (0.4, 0.9, "spn")]}
    path = write(tmp_path, long_format(tiers, 1.0))
    assert textgrid_to_rows(path, "the zyzzyva", "English", "x") is None
    row = textgrid_to_rows(path, "the zyzzyva", "English", "x", unk_policy="interpolate")
    assert words_of(row)[1] == ("zyzzyva", 0.4, 0.9)


def test_missing_interval_follows_the_policy(tmp_path: Path) -> None:
    # MFA gave no interval for "big": never shift "dog" into its place.
    path = write(tmp_path, long_format({"words": [(0.1, 0.4, "a"), (0.8, 1.2, "dog")]}, 1.5))
    assert textgrid_to_rows(path, "a big dog", "English", "x") is None
    with pytest.raises(TextGridError):
        textgrid_to_rows(path, "a big dog", "English", "x", unk_policy="error")
    row = textgrid_to_rows(path, "a big dog", "English", "x", unk_policy="interpolate")
    assert words_of(row) == [("a", 0.1, 0.4), ("big", 0.4, 0.8), ("dog", 0.8, 1.2)]


def test_transcript_mismatch_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, long_format({"words": [(0.1, 0.4, "three"), (0.4, 0.9, "cats")]}, 1.0))
    with pytest.raises(TextGridError, match="does not follow the transcript") as err:
        textgrid_to_rows(path, "3 cats", "English", "x", unk_policy="interpolate")
    assert err.value.reason == "mismatch" and str(path) in str(err.value)


def test_multi_speaker_tier_names_and_missing_tier(tmp_path: Path) -> None:
    path = write(tmp_path, long_format({"spk1 - words": [(0.0, 0.5, "hi")], "spk1 - phones": []}, 0.5))
    assert words_of(textgrid_to_rows(path, "Hi!", "English", "x")) == [("Hi", 0.0, 0.5)]
    with pytest.raises(TextGridError, match="tier 'segments'") as err:
        textgrid_to_rows(path, "Hi!", "English", "x", words_tier="segments")
    assert err.value.reason == "parse"


def make_corpus(tmp_path: Path) -> tuple[Path, Path]:
    corpus, aligned = tmp_path / "corpus", tmp_path / "aligned"
    utts = {  # utt -> (transcript, words tier or None = MFA wrote nothing)
        "ok": ("你好，世界", [(0.1, 0.5, "你好"), (0.6, 1.0, "世界")]),
        "unk": ("你好世界", [(0.1, 0.5, "你好"), (0.6, 1.0, "<unk>")]),
        "mismatch": ("一二", [(0.1, 0.5, "三")]),
        "unaligned": ("你好", None),
    }
    for utt, (text, words) in utts.items():
        (corpus / "spk1").mkdir(parents=True, exist_ok=True)
        (corpus / "spk1" / f"{utt}.wav").write_bytes(b"RIFF")
        (corpus / "spk1" / f"{utt}.lab").write_text(text + "\n", encoding="utf-8")
        if words is not None:
            (aligned / "spk1").mkdir(parents=True, exist_ok=True)
            (aligned / "spk1" / f"{utt}.TextGrid").write_text(long_format({"words": words}, 1.2), encoding="utf-8")
    (corpus / "spk1" / "orphan.txt").write_text("no audio", encoding="utf-8")
    return corpus, aligned


def test_corpus_to_manifest_counts_every_outcome(tmp_path: Path) -> None:
    corpus, aligned = make_corpus(tmp_path)
    out = tmp_path / "m" / "train.jsonl"
    counts = mfa_corpus_to_manifest(corpus, aligned, "Chinese", out)
    assert counts["written"] == 1 and counts["dropped_unk"] == 1 and counts["dropped_mismatch"] == 1
    assert counts["dropped_no_textgrid"] == 1 and counts["dropped_no_audio"] == 1
    assert counts["words_split_by_even"] == 2  # no phones tier: 你好 and 世界 split evenly
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row["id"] == "spk1/ok" and Path(row["audio"]) == (corpus / "spk1" / "ok.wav").resolve()
    assert row["language"] == "Chinese" and row["duration"] == 1.2
    assert words_of(row) == [("你", 0.1, 0.3), ("好", 0.3, 0.5), ("世", 0.6, 0.8), ("界", 0.8, 1.0)]


def test_cli_prints_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    corpus, aligned = make_corpus(tmp_path)
    out = tmp_path / "train.jsonl"
    argv = [
        "textgrid_to_manifest.py",
        "--corpus-dir",
        str(corpus),
        "--alignments-dir",
        str(aligned),
        "--language",
        "zh",
        "--out",
        str(out),
        "--unk-policy",
        "interpolate",
        "--log-level",
        "ERROR",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as code:
        runpy.run_path(str(REPO / "data_tools" / "textgrid_to_manifest.py"), run_name="__main__")
    assert code.value.code == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["written"] == 2 and counts["interpolated_utterances"] == 1 and counts["dropped_mismatch"] == 1
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.skipif(
    importlib.util.find_spec("nagisa") is None, reason="nagisa not installed (pip install nagisa==0.3.0)"
)
def test_japanese_units_cut_inside_mfa_words(tmp_path: Path) -> None:
    # nagisa: 東京 / 都 / に / 住ん / で / い / ます; MFA words are coarser, so units inside them split evenly.
    words = [(0.0, 0.6, "東京都"), (0.6, 0.7, "に"), (0.7, 1.3, "住んでいます")]
    stats: Counter[str] = Counter()
    text = "東京都に住んでいます。"
    row = textgrid_to_rows(write(tmp_path, long_format({"words": words}, 1.5)), text, "Japanese", "x", stats=stats)
    assert [w for w, _, _ in words_of(row)] == split_words(text, "Japanese")
    assert words_of(row) == [
        ("東京", 0.0, 0.4),
        ("都", 0.4, 0.6),
        ("に", 0.6, 0.7),
        ("住ん", 0.7, 0.9),
        ("で", 0.9, 1.0),
        ("い", 1.0, 1.1),
        ("ます", 1.1, 1.3),
    ]
    assert stats["words_split_by_even"] == 2


def test_corpus_error_policy_stops_and_leaves_no_partial_manifest(tmp_path: Path) -> None:
    corpus, aligned = make_corpus(tmp_path)
    out = tmp_path / "train.jsonl"
    with pytest.raises(TextGridError, match="unk.TextGrid"):
        mfa_corpus_to_manifest(corpus, aligned, "Chinese", out, unk_policy="error")
    assert not out.exists() and not out.with_name("train.jsonl.tmp").exists()
    with pytest.raises(ValueError, match="unk_policy"):
        textgrid_to_rows(write(tmp_path, ENGLISH_LONG), "hello", "English", "x", unk_policy="skip")  # type: ignore[arg-type]
