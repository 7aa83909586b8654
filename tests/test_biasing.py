"""Context-biasing evaluation: metric functions against hand counts, list construction, and recipe=eval end to end."""

from __future__ import annotations

import json

import pytest

from qwen3asr_train.eval.biasing import (
    BiasingCounts,
    BiasingItem,
    build_items,
    log_metrics,
    score_item,
    summarize,
    word_pool,
)


def _fox(utt_id: str = "a") -> BiasingItem:
    return BiasingItem(
        utt_id, "English", "The quick brown fox jumps.", ("quick", "jumps"), ("lazy", "dog", "cat", "owl")
    )


def test_metrics_match_a_hand_count():
    counts = BiasingCounts()
    # list of 3 = quick, jumps + distractor "lazy"; hyp: the->a (non-hot sub), "lazy" inserted (a listed word)
    score_item(counts, _fox("a"), 3, "language English<asr_text>A quick brown fox jumps lazy.")
    # same list; "jumps" deleted, no distractor said
    score_item(counts, _fox("b"), 3, "language English<asr_text>the quick brown fox")
    # hand count:
    #   recall: a: quick, jumps found; b: quick found, jumps missing      -> 3 / 4
    #   false alarms: one distractor listed per utterance, "lazy" said in a -> 1 / 2 distractors, 1 / 2 utterances
    #   U-WER: non-hot reference words the, brown, fox (x2) = 6; errors: a: the->a        -> 1 / 6
    #   B-WER: hot reference words quick, jumps (x2) = 4; errors: a: +lazy (listed), b: -jumps -> 2 / 4
    rates = counts.rates()
    assert (counts.true_found, counts.true_words) == (3, 4)
    assert (counts.false_alarms, counts.distractors) == (1, 2)
    assert (counts.speech_with_false_alarm, counts.speech_with_distractors) == (1, 2)
    assert (counts.u_errors, counts.u_ref, counts.b_errors, counts.b_ref) == (1, 6, 2, 4)
    assert rates["recall"] == 0.75 and rates["false_alarm_rate"] == 0.5 and rates["false_alarm_utterance_rate"] == 0.5
    assert rates["u_wer"] == pytest.approx(1 / 6) and rates["b_wer"] == 0.5
    assert rates["hallucination_rate"] is None and rates["mean_list_size"] == 3.0
    assert counts.false_alarm_words == {"lazy": 1}


def test_size_zero_is_the_recall_baseline_without_false_alarms():
    counts = BiasingCounts()
    score_item(counts, _fox(), 0, "language English<asr_text>the quick brown fox lazy")
    # no list; recall still measured on the same true words. "jumps" -> "lazy" is one substitution on a hot word
    assert counts.rates()["recall"] == 0.5
    assert counts.rates()["false_alarm_rate"] is None and counts.rates()["false_alarm_utterance_rate"] is None
    assert (counts.u_errors, counts.b_errors) == (0, 1)
    assert counts.list_words == 0


def test_a_distractor_counts_only_when_listed():
    counts = BiasingCounts()
    # size 4 lists lazy and dog; "cat" is said but not listed at this size: an insertion, not a false alarm
    score_item(counts, _fox(), 4, "language English<asr_text>the quick brown fox jumps cat dog")
    assert (counts.false_alarms, counts.distractors) == (1, 2)
    assert (counts.u_errors, counts.b_errors) == (1, 1)  # +cat (U), +dog (listed -> B)


def test_no_speech_hallucination_rate():
    silent = BiasingItem("s", None, "", (), ("lazy", "dog"))
    counts = BiasingCounts()
    score_item(counts, silent, 2, "language None<asr_text>")
    score_item(counts, silent, 2, "language English<asr_text>lazy dog")
    score_item(counts, silent, 2, "language None<asr_text>")
    assert (counts.hallucinated, counts.no_speech) == (1, 3)
    assert counts.true_words == 0 and counts.distractors == 0  # no-speech rows do not enter recall / FA


def test_cer_language_hot_words_match_contiguous_characters():
    item = BiasingItem("z", "Chinese", "今天天气很好", ("天气",), ("电脑",))
    counts = BiasingCounts()
    score_item(counts, item, 2, "language Chinese<asr_text>今天天器很好电脑")
    assert (counts.true_found, counts.true_words) == (0, 1)  # 天器 is not 天气
    assert (counts.false_alarms, counts.distractors) == (1, 1)
    assert (counts.b_ref, counts.b_errors) == (2, 1 + 2)  # 气->器 on a hot unit; 电, 脑 inserted listed units
    assert (counts.u_ref, counts.u_errors) == (4, 0)


def test_lists_are_rare_true_words_plus_nested_distractors_never_from_the_reference():
    rows = [("u1", "English", "alpha bravo charlie"), ("u2", "English", "bravo delta"), ("n", None, "")]
    pool = word_pool([(t, lang) for _, lang, t in rows] + [("echo foxtrot golf hotel india", "English")] * 3)
    items = build_items("dev", rows, pool, max_size=10, hotwords_per_utterance=2, seed=1)
    u1, u2, silent = items
    # bravo occurs twice in the pool, alpha and charlie once: the two rarest are chosen
    assert set(u1.true_words) == {"alpha", "charlie"}
    assert set(u2.true_words) == {"delta", "bravo"}
    for item in items:
        own = set(item.reference.split())
        assert not own & set(item.distractors), "a reference word can never be a distractor"
    assert silent.true_words == () and len(silent.distractors) == len(pool)
    # the pool has 9 words; u1 can use the 6 that are not its own
    assert len(u1.distractors) == 6
    small, large = u1.hot_list(4, seed=1), u1.hot_list(6, seed=1)
    assert set(u1.true_words) <= set(small) and len(small) == 4 and set(small) <= set(large)
    assert u1.listed_distractors(4) == u1.distractors[:2]
    again = build_items("dev", rows, pool, max_size=10, hotwords_per_utterance=2, seed=1)
    assert again == items
    other = build_items("dev", rows, pool, max_size=10, hotwords_per_utterance=2, seed=2)
    assert [i.distractors for i in other] != [i.distractors for i in items]


def test_logged_metric_names():
    counts = {"dev": {0: BiasingCounts(), 3: BiasingCounts()}}
    score_item(counts["dev"][0], _fox(), 0, "language English<asr_text>the quick brown fox jumps")
    score_item(counts["dev"][3], _fox(), 3, "language English<asr_text>the quick brown fox jumps")
    metrics = log_metrics(summarize(counts))
    assert metrics["val/dev/biasing/0/recall"] == 1.0 and metrics["val/dev/biasing/3/false_alarm_rate"] == 0.0
    assert "val/dev/biasing/0/false_alarm_rate" not in metrics


def _norm_words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in text).split()


def test_biasing_report_on_a_tiny_exported_checkpoint(tiny_model_and_processor, manifest_dir, tmp_path):
    """Export a tiny model, run recipe=eval with biasing on three list sizes and a no-speech set; recount recall
    and false alarms from the written per-utterance rows with plain word matching."""
    from qwen3asr_train.model.export import save_native
    from qwen3asr_train.stages import evaluate as eval_stage
    from qwen3asr_train.testing import write_manifest
    from tests.conftest import make_config

    model, processor = tiny_model_and_processor
    exported = {"native": save_native(model, processor, tmp_path / "export")}
    silent = write_manifest(
        tmp_path / "silent", num=2, seed=7, name="silent.jsonl", extra={"text": "", "language": None, "no_speech": True}
    )
    out = tmp_path / "eval"
    eval_stage.run(
        make_config(
            [
                "recipe=eval",
                f"recipe.model_path={exported['native']}",
                f"+recipe.sets.dev={manifest_dir / 'dev.jsonl'}",
                f"+recipe.sets.silent={silent}",
                "recipe.biasing.enabled=true",
                "recipe.biasing.sizes=[0,3,8]",
                f"recipe.biasing.pool_manifests=[{manifest_dir / 'train.jsonl'}]",
                "recipe.decode.max_new_tokens_cap=12",
                f"run_dir={out}",
            ]
        )
    )
    report = json.loads((out / "biasing_summary.json").read_text())
    assert (out / "biasing.png").stat().st_size > 0 and (out / "biasing_summary.md").exists()
    dev = report["sets"]["dev"]
    assert sorted(dev, key=int) == ["0", "3", "8"]
    rows = [json.loads(line) for line in (out / "biasing-dev.jsonl").read_text().splitlines()]
    for size, entry in dev.items():
        mine = [r for r in rows if r["size"] == int(size)]
        assert len(mine) == 4
        true = found = listed = alarms = 0
        for r in mine:
            hyp = _norm_words(r["hypothesis"].split("<asr_text>", 1)[-1])
            true += len(r["true_words"])
            found += sum(w in hyp for w in r["true_words"])
            listed += len(r["distractors"])
            alarms += sum(w in hyp for w in r["distractors"])
            listed_words = set(r["context"].split(", ")) - {""}
            assert listed_words == (set(r["true_words"]) | set(r["distractors"]) if int(size) else set())
            assert not set(r["distractors"]) & set(_norm_words(r["reference"]))
        assert (entry["true_found"], entry["true_words"]) == (found, true) and true > 0
        assert (entry["false_alarms"], entry["distractors"]) == (alarms, listed)
        assert entry["recall"] == found / true
        if int(size) == 0:
            assert entry["false_alarm_rate"] is None and listed == 0
        else:
            assert listed > 0 and entry["false_alarm_rate"] == alarms / listed
    silent_report = report["sets"]["silent"]
    assert all(e["no_speech"] == 2 and e["hallucination_rate"] is not None for e in silent_report.values())


def test_hook_evaluator_logs_biasing_metrics(tiny_model_and_processor, manifest_dir, tmp_path):
    """The training hook's evaluator: biasing on, three sizes -> ``val/<set>/biasing/<size>/...`` and the files."""
    from qwen3asr_train.config.recipes import BiasingConfig
    from qwen3asr_train.config.schema import DataConfig, DecodeConfig
    from qwen3asr_train.data.datamodule import row_checks
    from qwen3asr_train.eval.hook import ASREvaluator, load_eval_sets, pool_texts

    model, processor = tiny_model_and_processor
    checks = row_checks(DataConfig())
    sets = load_eval_sets({"dev": str(manifest_dir / "dev.jsonl")}, checks, "error", limit=2)
    cfg = BiasingConfig(enabled=True, sizes=[0, 2, 4], max_utterances=2)
    pool = pool_texts([str(manifest_dir / "train.jsonl")], checks, "error")
    evaluator = ASREvaluator(processor, sets, DecodeConfig(max_new_tokens_cap=8), 0, cfg, pool)
    metrics = evaluator.evaluate(model, tmp_path, write=True)
    for size in (0, 2, 4):
        assert f"val/dev/biasing/{size}/recall" in metrics
    assert "val/dev/biasing/2/false_alarm_rate" in metrics and "val/dev/biasing/0/false_alarm_rate" not in metrics
    assert "val/dev/wer" in metrics
    summary = json.loads((tmp_path / "biasing_summary.json").read_text())
    assert summary["settings"]["pool_words"] > 0 and (tmp_path / "biasing.png").exists()
    assert [e["mean_list_size"] for e in summary["sets"]["dev"].values()] == [0.0, 2.0, 4.0]
