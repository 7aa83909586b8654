"""``recipe=eval``: decode any checkpoint on one or more manifests and write the evaluation artifacts.

The model can be an exported directory in either layout, a Lightning ``.ckpt`` or a training run
directory (its ``last.ckpt``). Per set: ``recogs-<set>.txt``, ``errs-<set>.txt``, ``wer-summary-<set>.txt``,
``results-<set>.jsonl``; over all sets: ``summary.md``, ``summary.json`` and ``error_rates.png``; the
summary table is logged at the end. With ``recipe.streaming.enabled`` the sets are also decoded as upstream
streams (``eval/streaming.py``): the same files under ``streaming/`` and ``streaming_summary.{md,json}``.
With ``recipe.biasing.enabled`` every set is also decoded once per hot-word list size (``eval/biasing.py``):
``biasing_summary.{md,json}``, ``biasing.png`` and ``biasing-<set>.jsonl``.
Launched with ``torchrun --nproc_per_node=N``, the decoding is sharded by batch over the processes and
gathered (same results as one process).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qwen3asr_train.checkpoints import load_for_inference
from qwen3asr_train.config.schema import EvalConfig, RunConfig
from qwen3asr_train.data.datamodule import row_checks
from qwen3asr_train.data.manifest import ManifestError, SkipReport
from qwen3asr_train.eval.decode import decode_distributed
from qwen3asr_train.eval.hook import load_eval_sets

log = logging.getLogger(__name__)


def _evaluate_aligner(
    model: torch.nn.Module,
    processor: Any,
    sets: dict[str, list],
    out_dir: Path,
    recipe: EvalConfig,
    rank: int,
    policy: str,
    rejects: SkipReport,
) -> dict[str, Any]:
    """AAS per set and language (+ the energy baseline), alignments as JSON/TextGrid, a few plots."""
    from qwen3asr_train.data.aligner import UnitPolicyReport, usable_samples
    from qwen3asr_train.eval.align_eval import AlignmentEvaluator

    units = UnitPolicyReport()
    for name, samples in sets.items():
        sets[name] = usable_samples(
            samples, policy, f"eval:{name}", rejects, units=recipe.on_unit_mismatch, report=units
        )
        if not sets[name]:
            raise ManifestError(f"evaluation set {name}: no usable rows for alignment", "empty_manifest")
    evaluator = AlignmentEvaluator.from_decode_config(processor, sets, recipe.decode, unit_report=units)
    evaluator.title = model_title(recipe.model_path)
    metrics = evaluator.evaluate(model, out_dir, write=rank == 0)
    if dist.is_initialized():
        dist.barrier()
    return metrics


def model_title(model_path: str | Path) -> str:
    """What the charts say they show: the model directory, with the training step its weights are from when
    the export recorded it (``qwen3asr_train_run.json``)."""
    path = Path(model_path)
    record = path / "qwen3asr_train_run.json"
    step = None
    if record.is_file():
        step = (json.loads(record.read_text(encoding="utf-8")).get("exported_from") or {}).get("global_step")
    return f"{path.name or path}" + (f", step {step}" if step is not None else "")


def run(cfg: RunConfig) -> dict[str, Any]:
    """Evaluate ``recipe.model_path`` on ``recipe.sets`` (see the module docstring)."""
    recipe: EvalConfig = cfg.recipe
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    out_dir = Path(recipe.output_dir or cfg.run_dir)
    model, processor = load_for_inference(recipe.model_path, cfg.model)
    if torch.cuda.is_available():
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if recipe.streaming.enabled and not hasattr(model, "generate"):
        raise ValueError(
            f"recipe.streaming.enabled: {recipe.model_path} is a forced aligner, which has no transcripts to stream"
        )
    rejects = SkipReport()
    sets = load_eval_sets(dict(recipe.sets), row_checks(cfg.data), cfg.data.on_bad_row, rejects=rejects)
    if not hasattr(model, "generate"):  # a forced aligner: timestamps, not transcripts
        metrics = _evaluate_aligner(model, processor, sets, out_dir, recipe, rank, cfg.data.on_bad_row, rejects)
        if rank == 0:
            _write_skips(out_dir, rejects, sets)
        return metrics
    opts = recipe.decode
    results = {name: decode_distributed(model, processor, samples, opts) for name, samples in sets.items()}
    biasing = None
    if recipe.biasing.enabled:
        from qwen3asr_train.eval.biasing import evaluate_biasing
        from qwen3asr_train.eval.hook import pool_texts

        pool = pool_texts(recipe.biasing.pool_manifests, row_checks(cfg.data), cfg.data.on_bad_row)
        biasing = evaluate_biasing(model, processor, sets, opts, recipe.biasing, pool)
    streamed = None
    if recipe.streaming.enabled:
        from qwen3asr_train.eval.streaming import decode_streaming_distributed

        streamed = {
            name: decode_streaming_distributed(model, processor, samples, opts, recipe.streaming)
            for name, samples in sets.items()
        }
    summary: dict[str, Any] = {}
    if rank == 0:
        from qwen3asr_train.eval.report import write_reports

        summary = write_reports(out_dir, results, title=model_title(recipe.model_path))
        if streamed is not None:
            from qwen3asr_train.eval.streaming import write_streaming_reports

            write_streaming_reports(out_dir, summary, streamed, recipe.streaming, model_title(recipe.model_path))
        if biasing is not None:
            from qwen3asr_train.eval.biasing import write_biasing_report

            write_biasing_report(
                out_dir, biasing[0]["sets"], biasing[0]["settings"], biasing[1], model_title(recipe.model_path)
            )
        _write_skips(out_dir, rejects, sets)
        (out_dir / "eval_config.json").write_text(
            json.dumps({"model_path": str(recipe.model_path), "sets": dict(recipe.sets)}, indent=2) + "\n"
        )
        log.info("evaluation artifacts in %s", out_dir)
    if dist.is_initialized():
        dist.barrier()
    return summary


def _write_skips(out_dir: Path, rejects: SkipReport, sets: dict[str, list]) -> None:
    """``rejects.jsonl`` (every skipped row) and ``skipped.json`` (per set: rows evaluated, skipped by reason)."""
    rejects.write(out_dir / "rejects.jsonl")
    per_set: dict[str, dict[str, Any]] = {
        name: {"evaluated": len(samples), "skipped": {}} for name, samples in sets.items()
    }
    for row in rejects.rows:
        name = str(row.get("what", "")).removeprefix("eval:")
        counts = per_set.setdefault(name, {"evaluated": 0, "skipped": {}})["skipped"]
        counts[row["reason"]] = counts.get(row["reason"], 0) + 1
    (out_dir / "skipped.json").write_text(json.dumps(per_set, indent=2) + "\n")
    for name, entry in per_set.items():
        if entry["skipped"]:
            log.warning("evaluation set %s: %d rows evaluated, skipped %s", name, entry["evaluated"], entry["skipped"])
