"""Plumbing of ``make bench`` and ``make gpu-check`` (fast; the benchmarks themselves are run by hand)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from benchmarks import bench_sft, gpu_check, official_launcher, step_clock


def test_vendored_official_recipe_is_upstreams_bytes(tmp_path):
    body = official_launcher.upstream_bytes()
    assert body.startswith(b"# coding=utf-8\n# Copyright 2026 The Alibaba Qwen team.")
    assert b'eval_strategy="steps"' in body  # the quirk the bench works around with --eval_file
    edited = tmp_path / "qwen3_asr_sft.py"
    edited.write_bytes(official_launcher.VENDORED.read_bytes().replace(b"default=32", b"default=33"))
    with pytest.raises(official_launcher.VendoredFileChanged, match="sha256"):
        official_launcher.upstream_bytes(edited)


def test_duration_mix():
    durations = bench_sft.draw_durations(2000, seed=3)
    assert durations == bench_sft.draw_durations(2000, seed=3)
    assert min(durations) >= 1.0 and max(durations) <= 30.0
    assert 5.3 < statistics.median(durations) < 6.3  # log-normal, median 5.8 s


def _record(side: str, steps: list[tuple[float, float, float, float]]) -> dict:
    """steps: (end time, audio s, real tokens, positions)."""
    return {
        "side": side,
        "t_begin": 0.0,
        "peak_rss_mb": 100.0,
        "process_wall_s": 9.0,
        "steps": [{"t": t, "audio_s": a, "real_tokens": r, "positions": p, "rows": 2.0} for t, a, r, p in steps],
    }


def test_summary_leaves_out_the_warmup_and_times_whole_steps():
    record = _record("ours", [(5.0, 10.0, 100.0, 120.0), (7.0, 20.0, 200.0, 220.0), (11.0, 30.0, 300.0, 300.0)])
    s = bench_sft.summarise(record, warmup_steps=1)
    # timed: steps 2 and 3, from the end of step 1 (t=5) to the end of step 3 (t=11)
    assert s["elapsed_s"] == 6.0 and s["steps"] == 2.0
    assert s["audio_s_per_s"] == pytest.approx(50.0 / 6.0)
    assert s["real_tokens_per_s"] == pytest.approx(500.0 / 6.0)
    assert s["padding_fraction"] == pytest.approx(1 - 500.0 / 520.0)
    with pytest.raises(ValueError, match="warm-up"):
        bench_sft.summarise(record, warmup_steps=3)


def test_pooled_rates_and_ratios():
    a = bench_sft.summarise(_record("official", [(1.0, 0, 0, 1), (5.0, 8.0, 80.0, 160.0)]), 1)
    b = bench_sft.summarise(_record("official", [(1.0, 0, 0, 1), (3.0, 4.0, 40.0, 80.0)]), 1)
    pooled = bench_sft.pool([a, b])
    assert pooled["audio_s_per_s"] == pytest.approx(12.0 / 6.0)  # summed work over summed time
    assert pooled["padding_fraction"] == pytest.approx(0.5)
    ours = {**pooled, "audio_s_per_s": 5.0, "real_tokens_per_s": 60.0, "padding_fraction": 0.1, "peak_rss_mb": 50.0}
    r = bench_sft.ratios(ours, pooled)
    assert r["audio_s_per_s"] == pytest.approx(2.5)
    assert r["peak_rss_official_over_ours"] == pytest.approx(2.0)


def test_step_clock_batch_stats_hand_count():
    batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "input_features_mask": torch.tensor([[1] * 150 + [0] * 50, [1] * 200]),
        "ids": ["a", "b"],
        "num_target_tokens": 4,
    }
    stats = step_clock.batch_stats(batch)
    assert stats == {
        "audio_s": 3.5,
        "real_tokens": 8.0,
        "positions": 10.0,
        "rows": 2.0,
        "target_tokens": 4.0,
        "head_rows": 4.0,
    }


def test_real_vocabulary_tokenizer_keeps_the_small_bpe_ids():
    from qwen3asr_train.model.tiny import build_tokenizer

    texts = ["alpha bravo charlie", "one two three"]
    big, small = bench_sft.real_vocab_tokenizer(texts), build_tokenizer(texts)
    assert big.convert_tokens_to_ids("<|endoftext|>") >= bench_sft.QWEN_BASE_VOCAB
    assert len(big) < bench_sft.REAL_VOCAB
    assert big.encode("alpha two", add_special_tokens=False) == small.encode("alpha two", add_special_tokens=False)


def test_gpu_check_without_cuda_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The whole bench path (synthetic budget batches, our loss, backward, AdamW, summary files) on a tiny model."""
    assert gpu_check.main(["--dry-run", "--skip-tests", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    (row,) = result["bench"]
    assert row["model"] == "tiny" and row["steps"] == 2
    assert row["audio_s_per_s"] > 0 and 0 < row["real_token_fraction"] <= 1
    assert "| tiny |" in (tmp_path / "gpu_check.md").read_text()


def test_budget_batches_fill_the_budget():
    batches = gpu_check.budget_batches(20, 120.0, seed=0)
    assert all(sum(b) <= 120.0 or len(b) == 1 for b in batches)
    assert all(1.0 <= s <= 30.0 for b in batches for s in b)
    assert statistics.mean(sum(b) for b in batches) > 100.0  # filled close to the budget


@pytest.mark.slow
def test_gpu_check_dry_run_with_the_gpu_test_step(tmp_path):
    """With the pytest step: on a CPU every GPU test skips, and the JUnit counts say so."""
    assert gpu_check.main(["--dry-run", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)]) == 0
    tests = json.loads((tmp_path / "gpu_check.json").read_text())["tests"]
    assert tests["skipped"] == len(tests["cases"]) > 0 and tests["failure"] == 0
