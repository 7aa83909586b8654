"""Forced-aligner evaluation: non-autoregressive decoding of every word's slots, AAS and artifacts.

Every word is slotted (as at inference), the logits' argmax at the ``<timestamp>`` positions × 80 ms is
repaired to a monotonic sequence exactly as upstream does, and compared with the reference word times:
the accumulated average shift (AAS, mean |pred − ref| over word starts and ends, ms) and the shares of
boundaries within 20 / 50 / 100 ms, per set and language. The same numbers are computed for the
no-model energy baseline (words spread over the detected speech region by character count): a result
only means something if it beats it. Work is sharded by batch over ranks and gathered, like ASR decoding.

Artifacts per set: ``alignments-<set>.json`` (per-utterance predictions and references),
``textgrids-<set>/<id>.TextGrid`` (predicted and reference tiers), ``plots-<set>/<id>.png`` for the first
utterance of every language of the set (``eval/plots.py``: legend, labels that never overlap, the
utterance's AAS in the title); over all sets: ``alignment_summary.{json,md}``, the table linking the plots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Qwen3ASRProcessor

from qwen3asr_train.data.aligner import AlignerCollator
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.prompts import TIMESTAMP
from qwen3asr_train.eval.alignment import (
    AlignmentStats,
    decode_slots,
    energy_baseline,
    slots_to_spans,
    write_alignments_json,
    write_textgrid,
)
from qwen3asr_train.eval.decode import duration_batches
from qwen3asr_train.eval.plots import one_per_language, plot_alignment

log = logging.getLogger(__name__)


@torch.no_grad()
def align(
    model: torch.nn.Module,
    processor: Qwen3ASRProcessor,
    samples: Sequence[Sample],
    max_batch_seconds: float = 240.0,
    max_batch_size: int = 32,
) -> list[list[tuple[float, float]]]:
    """Predicted (start, end) seconds of every word of every sample, sharded over ranks when distributed."""
    collator = AlignerCollator(processor, int(model.config.num_labels), slot_prob=1.0, seed=0)
    timestamp_id = processor.tokenizer.convert_tokens_to_ids(TIMESTAMP)
    plan = duration_batches([s.utt.duration for s in samples], max_batch_seconds, max_batch_size)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    local: list[tuple[int, list[tuple[float, float]]]] = []
    try:
        for batch_ids in plan[rank::world]:
            batch = collator([samples[i] for i in batch_ids])
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "input_features_mask")}
            inputs["input_features"] = batch["input_features"].to(device, next(model.parameters()).dtype)
            logits = model(**inputs).logits  # (B, L, C)
            for i, seconds in zip(batch_ids, decode_slots(logits, inputs["input_ids"], timestamp_id), strict=True):
                local.append((i, slots_to_spans(seconds)))
    finally:
        model.train(was_training)
    if world > 1:
        gathered: list[list[tuple[int, list[tuple[float, float]]]]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, local)
        local = [pair for part in gathered for pair in part]
    spans = dict(local)
    return [spans[i] for i in range(len(samples))]


def score_alignments(
    set_name: str,
    samples: Sequence[Sample],
    predictions: Sequence[Sequence[tuple[float, float]]],
    stats: AlignmentStats,
    baseline: AlignmentStats,
) -> None:
    """Add a set's predictions (and the energy baseline) to the accumulators."""
    for sample, pred in zip(samples, predictions, strict=True):
        words = [w.word for w in sample.utt.words or []]
        ref = [(w.start, w.end) for w in sample.utt.words or []]
        stats.add(sample.utt.id, words, pred, ref, set_name, sample.utt.language)
        baseline.add(sample.utt.id, words, energy_baseline(sample.audio, words), ref, set_name, sample.utt.language)


def write_alignment_reports(
    out_dir: Path,
    sets: dict[str, list[Sample]],
    predictions: dict[str, list[Any]],
    stats: AlignmentStats,
    baseline: AlignmentStats,
    max_textgrids: int = 50,
    plots_per_language: int = 1,
    title: str | None = None,
) -> dict[str, Any]:
    """Per-set JSON/TextGrids/plots and the summary table; returns the summary.

    ``plots_per_language``: alignment plots of the first N utterances of every language of a set;
    ``title``: model and step, for the table and the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plotted: dict[str, list[Path]] = {}
    for name, samples in sets.items():
        per_set = AlignmentStats()
        per_set.records = [r for r in stats.records if r["set"] == name]
        write_alignments_json(out_dir / f"alignments-{name}.json", per_set)
        to_plot = set(one_per_language(samples, lambda s: s.utt.language, plots_per_language))
        for k, (sample, pred) in enumerate(zip(samples, predictions[name], strict=True)):
            words = [w.word for w in sample.utt.words or []]
            ref = [(w.start, w.end) for w in sample.utt.words or []]
            safe = sample.utt.id.replace("/", "_")
            if k < max_textgrids:
                write_textgrid(
                    out_dir / f"textgrids-{name}" / f"{safe}.TextGrid",
                    words,
                    pred,
                    len(sample.audio) / SAMPLE_RATE,
                    ref,
                )
            if k in to_plot:
                aas = _utterance_aas_ms(pred, ref)
                heading = f"{name} / {sample.utt.language}: {sample.utt.id} (AAS {aas:.0f} ms)"
                plotted.setdefault(name, []).append(
                    plot_alignment(
                        out_dir / f"plots-{name}" / f"{safe}.png",
                        sample.audio,
                        words,
                        pred,
                        ref,
                        title=f"{heading}\n{title}" if title else heading,
                    )
                )
    summary = {"model": stats.summary(), "energy_baseline": baseline.summary()}
    (out_dir / "alignment_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "| set | language | AAS ms | median ms | ≤20 ms | ≤50 ms | ≤100 ms | boundaries | baseline AAS ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for set_name, langs in summary["model"].items():
        for lang, s in langs.items():
            b = summary["energy_baseline"][set_name][lang]
            lines.append(
                f"| {set_name} | {lang} | {s['aas_ms']:.1f} | {s['median_ms']:.1f} | "
                f"{100 * s['within_20ms']:.1f}% | {100 * s['within_50ms']:.1f}% | {100 * s['within_100ms']:.1f}% "
                f"| {s['boundaries']} | {b['aas_ms']:.1f} |"
            )
    table = "\n".join(lines) + "\n"
    links = [
        f"- {name}: " + ", ".join(f"[{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in paths)
        for name, paths in plotted.items()
    ]
    heading = f"# Alignment evaluation: {title}\n\n" if title else ""
    plots_md = "\nAlignment plots (one utterance per language):\n\n" + "\n".join(links) + "\n" if links else ""
    (out_dir / "alignment_summary.md").write_text(heading + table + plots_md)
    log.info("alignment summary:\n%s", table)
    return summary


def _utterance_aas_ms(pred: Sequence[tuple[float, float]], ref: Sequence[tuple[float, float]]) -> float:
    """Mean |pred - ref| over the starts and ends of one utterance, in ms (the AAS of that utterance)."""
    errors = [abs(p - r) for ps, rs in zip(pred, ref, strict=True) for p, r in zip(ps, rs, strict=True)]
    return 1000.0 * sum(errors) / len(errors) if errors else float("nan")


def alignment_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``val/<set>/aas_ms``, ``val/<set>/within_{20,50,100}ms`` (all languages), per language AAS, baseline."""
    metrics: dict[str, float] = {}
    for set_name, langs in summary["model"].items():
        overall = langs["all"]
        metrics[f"val/{set_name}/aas_ms"] = float(overall["aas_ms"])
        for key in ("within_20ms", "within_50ms", "within_100ms"):
            metrics[f"val/{set_name}/{key}"] = float(overall[key])
        metrics[f"val/{set_name}/baseline_aas_ms"] = float(summary["energy_baseline"][set_name]["all"]["aas_ms"])
        for lang, scores in langs.items():
            if lang != "all" and len(langs) > 2:
                metrics[f"val/{set_name}/{lang}/aas_ms"] = float(scores["aas_ms"])
    return metrics


class AlignmentEvaluator:
    """The evaluation hook's evaluator for aligners (see :class:`qwen3asr_train.eval.hook.Evaluator`)."""

    def __init__(
        self,
        processor: Qwen3ASRProcessor,
        sets: dict[str, list[Sample]],
        max_batch_seconds: float = 240.0,
        max_batch_size: int = 32,
    ) -> None:
        self.processor = processor
        self.sets = sets
        self.max_batch_seconds = max_batch_seconds
        self.max_batch_size = max_batch_size
        self.title: str | None = None

    def evaluate(self, model: torch.nn.Module, out_dir: Path, write: bool) -> dict[str, float]:
        predictions = {
            name: align(model, self.processor, samples, self.max_batch_seconds, self.max_batch_size)
            for name, samples in self.sets.items()
        }
        if not write:
            return {}
        stats, baseline = AlignmentStats(), AlignmentStats()
        for name, samples in self.sets.items():
            score_alignments(name, samples, predictions[name], stats, baseline)
        summary = write_alignment_reports(out_dir, self.sets, predictions, stats, baseline, title=self.title)
        return alignment_metrics(summary)
