"""``qwen3asr-data report``: hours, rows and text statistics per language and the unusual characters, checked
against numbers computed here from the rows the test writes; the histogram PNG holds one bar per bin."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from qwen3asr_train.tools.cli import main
from qwen3asr_train.tools.report import is_normal

ROWS = [
    {"id": "e1", "audio": "a.wav", "text": "hello world", "language": "en", "duration": 2.0},
    {"id": "e2", "audio": "a.wav", "text": "café, 3 euros!", "language": "English", "duration": 4.5},
    {"id": "e3", "audio": "a.wav", "text": "smile \U0001f600 now\u200b", "language": "en", "duration": 1.5},
    {"id": "z1", "audio": "a.wav", "text": "language Chinese<asr_text>你好，世界。"},
    {"id": "z2", "audio": "a.wav", "text": "你好привет", "language": "zh", "duration": 3.0},
    {"id": "n1", "audio": "a.wav", "text": "", "no_speech": True, "duration": 1.0},
]


def test_character_classes() -> None:
    assert is_normal("é", "English") and is_normal("，", "Chinese") and is_normal("7", "Thai")
    assert not is_normal("п", "Chinese") and not is_normal("\U0001f600", "English")
    assert not is_normal("\u200b", "English") and not is_normal("€", "English")  # format char, currency symbol
    assert is_normal("п", "Russian") and is_normal("カ", "Japanese") and not is_normal("カ", "Korean")
    assert is_normal("ж", "Klingon")  # languages outside the table accept every letter


def test_report(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS) + "{broken\n", encoding="utf-8")
    out = tmp_path / "report"
    assert main(["report", str(manifest), "--out-dir", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 6 and summary["rows_without_duration"] == 1
    assert summary["unreadable_rows"] == [
        f"{manifest}:7: malformed JSON (Expecting property name enclosed in double quotes)"
    ]
    assert summary["hours"] == pytest.approx(12.0 / 3600, abs=1e-4)
    en, zh = summary["languages"]["English"], summary["languages"]["Chinese"]
    assert (en["rows"], zh["rows"], summary["languages"]["None"]["rows"]) == (3, 2, 1)
    assert en["hours"] == pytest.approx(8.0 / 3600, abs=1e-4) and zh["hours"] == pytest.approx(3.0 / 3600, abs=1e-4)
    lengths = [len(r["text"]) for r in ROWS[:3]]
    assert en["text_chars"]["median"] == statistics.median(lengths) and en["text_chars"]["max"] == max(lengths)
    assert en["text_words"]["max"] == 3 and zh["text_chars"]["min"] == 6  # "你好，世界。" after the prefix
    assert en["duration_s"] == {"min": 1.5, "mean": round(8 / 3, 3), "median": 2.0, "p95": 4.5, "max": 4.5}
    found = {(c["code_point"], c["language"]): (c["count"], c["first_row"]) for c in summary["unusual_characters"]}
    assert found == {
        ("U+1F600", "English"): (1, f"{manifest}:3"),
        ("U+200B", "English"): (1, f"{manifest}:3"),
        **{(f"U+{ord(c):04X}", "Chinese"): (1, f"{manifest}:5") for c in "привет"},
    }
    assert en["rows_with_unusual_characters"] == 1 and zh["rows_with_unusual_characters"] == 1
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "| English | 3 |" in markdown and "GRINNING FACE" in markdown and "ZERO WIDTH SPACE" in markdown
    from PIL import Image

    with Image.open(out / "durations.png") as image:
        assert image.size[0] > 400 and image.size[1] > 300


def test_report_of_nothing_exits_1(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    assert main(["report", str(empty), "--out-dir", str(tmp_path / "r")]) == 1
