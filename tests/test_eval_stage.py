"""Evaluation in practice: the training hook, recipe=eval on both layouts, and sharded decoding."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwen3asr_train.checkpoints import load_for_inference
from qwen3asr_train.data.manifest import RowChecks
from qwen3asr_train.eval.decode import DecodeOptions, decode, decode_distributed
from qwen3asr_train.eval.hook import load_eval_sets
from qwen3asr_train.eval.report import rescore_recogs
from qwen3asr_train.languages import LanguageTable
from qwen3asr_train.stages import evaluate as eval_stage
from qwen3asr_train.stages import export as export_stage
from qwen3asr_train.stages import sft
from tests.conftest import make_config, tiny_sft_overrides


@pytest.fixture(scope="module")
def hooked_run(manifest_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hooked")
    overrides = tiny_sft_overrides(
        manifest_dir,
        run_dir,
        f"+evaluation.sets.dev={manifest_dir / 'dev.jsonl'}",
        "evaluation.every_n_steps=2",
        "evaluation.monitor=val/dev/wer",
    )
    sft.run(make_config(overrides))
    return run_dir


def test_hook_logs_at_interval_and_numbers_match_the_written_files(hooked_run):
    rows = list(csv.DictReader(open(hooked_run / "logs" / "metrics.csv")))
    logged = {int(r["step"]): float(r["val/dev/wer"]) for r in rows if r.get("val/dev/wer")}
    assert sorted(logged) == [2, 4]  # every 2 steps; the end-of-training run at step 4 is not repeated
    for step, wer in logged.items():
        recogs = hooked_run / "eval" / f"step-{step:08d}" / "recogs-dev.txt"
        rescored = rescore_recogs(recogs)["dev"]
        assert rescored["corpus"]["rate"] == pytest.approx(wer, abs=1e-12)
    assert (hooked_run / "checkpoints" / "best.ckpt").exists()
    samples = [json.loads(line) for line in open(hooked_run / "logs" / "samples.jsonl")]
    assert {s["step"] for s in samples} == {2, 4} and all(s["reference"] for s in samples)
    for key in ("val/dev/sub_rate", "val/dev/del_rate", "val/dev/ins_rate", "val/dev/lid_acc"):
        assert any(r.get(key) for r in rows), key


def test_eval_recipe_identical_on_native_and_original_layouts(hooked_run, manifest_dir, tmp_path):
    exported = export_stage.run(
        make_config(
            [
                "recipe=export",
                f"recipe.checkpoint={hooked_run}",
                "recipe.layout=both",
                f"recipe.output_dir={tmp_path / 'exp'}",
                f"run_dir={tmp_path}",
            ]
        )
    )
    summaries = {}
    for layout in ("native", "original"):
        out = tmp_path / f"eval_{layout}"
        summaries[layout] = eval_stage.run(
            make_config(
                [
                    "recipe=eval",
                    f"recipe.model_path={exported[layout]}",
                    f"+recipe.sets.dev={manifest_dir / 'dev.jsonl'}",
                    f"run_dir={out}",
                ]
            )
        )
        for name in (
            "recogs-dev.txt",
            "errs-dev.txt",
            "wer-summary-dev.txt",
            "summary.md",
            "summary.json",
            "error_rates.png",
        ):
            assert (out / name).exists(), name
    native = (tmp_path / "eval_native" / "recogs-dev.txt").read_text()
    original = (tmp_path / "eval_original" / "recogs-dev.txt").read_text()
    assert native == original
    assert summaries["native"] == summaries["original"]
    # a run directory (its last.ckpt) decodes the same as its export
    from_ckpt = eval_stage.run(
        make_config(
            [
                "recipe=eval",
                f"recipe.model_path={hooked_run}",
                f"+recipe.sets.dev={manifest_dir / 'dev.jsonl'}",
                f"run_dir={tmp_path / 'eval_ckpt'}",
            ]
        )
    )
    assert from_ckpt == summaries["native"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_dir: str, manifest: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, processor = load_for_inference(model_dir)
    checks = RowChecks(languages=LanguageTable())
    samples = load_eval_sets({"dev": manifest}, checks, "error")["dev"]
    results = decode_distributed(model, processor, samples, DecodeOptions(max_batch_size=2))
    if rank == 0:
        Path(out).write_text(json.dumps([r.__dict__ for r in results]))
    dist.destroy_process_group()


@pytest.mark.slow
def test_decoding_on_two_processes_equals_one(hooked_run, manifest_dir, tmp_path):
    model_dir = hooked_run / "export"
    manifest = str(manifest_dir / "dev.jsonl")
    out = tmp_path / "two.json"
    mp.spawn(_worker, args=(2, _free_port(), str(model_dir), manifest, str(out)), nprocs=2, join=True)
    model, processor = load_for_inference(model_dir)
    samples = load_eval_sets({"dev": manifest}, RowChecks(languages=LanguageTable()), "error")["dev"]
    one = [r.__dict__ for r in decode(model, processor, samples, DecodeOptions(max_batch_size=2))]
    assert json.loads(out.read_text()) == one
