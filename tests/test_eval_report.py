"""Tests for the evaluation artifacts: files hold hand-counted numbers and re-score to the logged ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwen3asr_train.eval.decode import DecodeResult
from qwen3asr_train.eval.metrics import MetricAggregator
from qwen3asr_train.eval.normalize import NORMALIZER_VERSION
from qwen3asr_train.eval.report import (
    format_table,
    log_metrics,
    rescore_recogs,
    score_results,
    summarize_set,
    write_reports,
)

EN, ZH = "language English<asr_text>", "language Chinese<asr_text>"


def utt(id: str, language: str | None, ref: str, hyp: str, **kw: Any) -> DecodeResult:
    return DecodeResult(id, language, ref, hyp, audio_seconds=kw.pop("seconds", 2.0), truncated=False, **kw)


def results_by_set() -> dict[str, list[DecodeResult]]:
    loop = DecodeResult("e5", "English", "Yes, I agree.", EN + "Yes I agree" + " I agree" * 4, 2.0, truncated=True)
    return {
        "en": [
            utt("e1", "English", "Hello, World!", EN + "hello world."),  # casing/punctuation only: 0 errors
            utt("e2", "English", "The cat sat on the mat.", EN + "The cat sit on mat"),  # 1 sub, 1 del
            utt("e3", None, "", "language None<asr_text>"),  # no speech, detected
            utt("e4", "English", "good morning everyone", "good morning"),  # malformed: 1 del, LID wrong
            loop,  # 8 insertions, a loop
            utt("e6", "English", "good evening.", "Good evening", forced_language="English"),  # forced: no LID
        ],
        "zh": [
            utt("z1", "Chinese", "今天天气很好。", ZH + "今天天气很好"),
            utt("z2", "Chinese", "我们去公园吧", ZH + "我们去公圆了吧"),  # 1 sub, 1 ins
            utt("z3", None, "", ZH + "谢谢观看"),  # hallucination on no speech
        ],
        "mix": [
            utt("m1", "English", "hello there", EN + "hello"),
            utt("m2", "Chinese", "你好", ZH + "你好\n"),
        ],
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("eval")
    return out, write_reports(out, results_by_set())


def test_records() -> None:
    _, records = score_results("en", results_by_set()["en"])
    by_id = {r.id: r for r in records}
    assert by_id["e4"].format_ok is False and by_id["e4"].text == "good morning"
    assert by_id["e6"].language_forced and by_id["e6"].parsed_language == "English"
    assert by_id["e3"].no_speech and by_id["e3"].counts.empty_refs == 1
    assert [r.id for r in records if r.repetition] == ["e5"] and by_id["e5"].repetition_report.loop
    assert (by_id["e2"].counts.substitutions, by_id["e2"].counts.deletions) == (1, 1)
    assert by_id["e2"].alignment == "the cat (sat->sit) on (the->*) mat"
    with pytest.raises(ValueError, match="duplicate"):
        score_results("dup", [utt("a", "English", "x", EN + "x"), utt("a", "English", "y", EN + "y")])


def test_set_files(written: tuple[Path, dict[str, Any]]) -> None:
    out, _ = written
    recogs = (out / "recogs-en.txt").read_text(encoding="utf-8")
    for i in range(1, 7):
        assert f"e{i}:\tref=" in recogs and f"e{i}:\thyp=" in recogs and f"e{i}:\traw=" in recogs
    assert "e2:\thyp=The cat sit on mat\n" in recogs and "e4:\traw=good morning\n" in recogs
    assert "m2:\traw=language Chinese<asr_text>你好\\n\n" in (out / "recogs-mix.txt").read_text(encoding="utf-8")

    errs = (out / "errs-en.txt").read_text(encoding="utf-8")
    # English: 16 reference words; S=1 (sat->sit), D=2 (the, everyone), I=8 (loop) -> 11/16 = 68.75 %
    assert "%WER 68.75 [ 11 / 16, 8 ins, 2 del, 1 sub ] English (hits 13, utterances 5)" in errs
    assert "e2:\tthe cat (sat->sit) on (the->*) mat" in errs and "(everyone->*)" in errs
    assert "e4:\tgood morning (everyone->*)\t# format-error" in errs
    assert "1\tsat -> sit" in errs and "4\tagree" in errs and "4\ti" in errs
    zh_errs = (out / "errs-zh.txt").read_text(encoding="utf-8")
    assert (
        "%CER 16.67 [ 2 / 12, 1 ins, 0 del, 1 sub ] Chinese" in zh_errs
        and "我们去公(*->圆)(园->了)吧" in zh_errs.replace(" ", "")
    )

    summary = (out / "wer-summary-en.txt").read_text(encoding="utf-8").splitlines()
    assert "English\twer\t68.75\t1\t2\t8\t16\t5" in summary
    assert "macro\ter\t68.75" in summary
    assert "lid_accuracy\t75.00\t3/4" in summary  # e4 malformed; e3 no speech, e6 forced: not counted
    assert "no_speech_precision\t100.00\t1/1" in summary and "no_speech_recall\t100.00\t1/1" in summary
    assert {"format_errors\t1", "repetitions\t1", "truncated\t1"} <= set(summary)
    zh_summary = (out / "wer-summary-zh.txt").read_text(encoding="utf-8").splitlines()
    assert "Chinese\tcer\t16.67\t1\t0\t1\t12\t2" in zh_summary and "no_speech_recall\t0.00\t0/1" in zh_summary
    assert "no_speech_precision\t-\t0/0" in zh_summary
    mix = (out / "wer-summary-mix.txt").read_text(encoding="utf-8").splitlines()
    assert "macro\ter\t25.00" in mix and "corpus\ter\t25.00\t0\t1\t0\t4\t2" in mix

    rows = [json.loads(line) for line in (out / "results-en.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["e1", "e2", "e3", "e4", "e5", "e6"]
    e5 = rows[4]
    assert e5["repetition"] and e5["loop"] and e5["truncated"] and e5["repeated_ngram"] == ["i", "agree"]
    assert e5["counts"]["insertions"] == 8 and e5["scoring"]["normalizer_version"] == NORMALIZER_VERSION


def test_summary_files(written: tuple[Path, dict[str, Any]]) -> None:
    out, summary = written
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["sets"] == summary
    assert (out / "error_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "summary.md").read_text(encoding="utf-8")
    assert table == format_table(summary) + "\n![error rate per language](error_rates.png)\n"
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    pairs = {(row[0].removeprefix("| "), row[1]) for row in rows}
    expected = {("en", "English"), ("en", "None"), ("zh", "Chinese"), ("zh", "None"), ("mix", "English")}
    assert pairs == expected | {("mix", "Chinese")} | {(s, "**macro**") for s in ("en", "zh", "mix")}
    assert len(rows) == len(pairs)
    en_row = next(r for r in rows if r[0] == "| en" and r[1] == "English")
    assert en_row[2:9] == ["wer", "68.75", "1", "2", "8", "16", "5"]
    assert f"normaliser {NORMALIZER_VERSION}" in table


def test_log_metrics(written: tuple[Path, dict[str, Any]]) -> None:
    _, summary = written
    aggregator = MetricAggregator()
    for name, results in results_by_set().items():
        score_results(name, results, aggregator)
    sets = aggregator.summary()["sets"]
    en = log_metrics(summary, "en")
    assert en == {
        "val/en/wer": pytest.approx(11 / 16),
        "val/en/sub_rate": pytest.approx(1 / 16),
        "val/en/del_rate": pytest.approx(2 / 16),
        "val/en/ins_rate": pytest.approx(8 / 16),
        "val/en/lid_acc": 0.75,
        "val/en/no_speech_precision": 1.0,
        "val/en/no_speech_recall": 1.0,
        "val/en/hallucination_rate": 0.0,
        "val/en/format_errors": 1.0,
        "val/en/repetitions": 1.0,
        "val/en/truncated": 1.0,
    }
    assert en["val/en/wer"] == sets["en"]["languages"]["English"]["rate"] == sets["en"]["corpus"]["rate"]
    zh = log_metrics(summary, "zh")
    assert zh["val/zh/cer"] == sets["zh"]["corpus"]["rate"] == 2 / 12
    assert zh["val/zh/hallucination_rate"] == 1.0 and "val/zh/no_speech_precision" not in zh
    mix = log_metrics(summary, "mix")
    assert "val/mix/wer" not in mix and "val/mix/cer" not in mix
    assert mix["val/mix/macro_er"] == sets["mix"]["macro"] == 0.25
    assert (mix["val/mix/English/wer"], mix["val/mix/Chinese/cer"]) == (0.5, 0.0)


def test_rescore_reproduces_logged_numbers(written: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, summary = written
    for name in summary:
        rescored = rescore_recogs(out / f"recogs-{name}.txt")
        assert rescored == {name: summary[name]}
        assert log_metrics(rescored, name) == log_metrics(summary, name)
    # the hyp= line is what is scored: fixing e2 by hand removes its two errors
    for name in ("recogs-en.txt", "results-en.jsonl"):
        (tmp_path / name).write_text((out / name).read_text(encoding="utf-8"), encoding="utf-8")
    edited = (
        (tmp_path / "recogs-en.txt")
        .read_text(encoding="utf-8")
        .replace("e2:\thyp=The cat sit on mat", "e2:\thyp=the cat sat on the mat")
    )
    (tmp_path / "recogs-en.txt").write_text(edited, encoding="utf-8")
    assert log_metrics(rescore_recogs(tmp_path / "recogs-en.txt"), "en")["val/en/wer"] == 9 / 16


def test_escaping_round_trip(tmp_path: Path) -> None:
    odd = [utt("a\tb", "English", "one\ttwo\\n three\nfour", EN + "one two\\n three\r\nfour")]
    summary = write_reports(tmp_path, {"odd": odd})
    lines = (tmp_path / "recogs-odd.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and lines[0] == "a\\tb:\tref=one\\ttwo\\\\n three\\nfour"
    assert rescore_recogs(tmp_path / "recogs-odd.txt") == summary
    aggregator, records = score_results("odd", odd)
    assert records[0].reference == odd[0].reference and summarize_set(aggregator, "odd", records) == summary["odd"]
