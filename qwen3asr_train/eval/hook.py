"""The evaluation hook: decode named validation sets during training, in every stage.

Why a callback with a pluggable evaluator: SFT and GSPO decode transcripts and score WER/CER, the
aligner decodes timestamps and scores AAS; the *when* (every N optimizer steps, at the end, on every
rank with the work sharded and gathered) and the *what to do with the numbers* (log them, write the
artifacts, keep the best checkpoint) are the same. Metrics are logged at the optimizer step they were
measured after; the artifacts of each evaluation go to ``<run_dir>/eval/step-<N>/``, and after each one
the run's pictures are redrawn (``eval/plots.py``: ``training_curves.png``, ``eval/error_rates_by_step.png``,
and ``eval/summary.md`` linking them with every step's table and charts). With ``evaluation.biasing.enabled`` each
evaluation also writes ``biasing_summary.{md,json}`` and ``biasing.png`` (recall / false alarms / WER on the other
words per hot-word list size) and logs ``val/<set>/biasing/<size>/<rate>``; the no-speech hallucination rate of
each set is logged as ``val/<set>/hallucination_rate`` whenever the set has no-speech rows.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from transformers import Qwen3ASRProcessor

from qwen3asr_train.averaging import averaged_weights
from qwen3asr_train.config.recipes import BiasingConfig
from qwen3asr_train.config.schema import DataConfig, EvalHookConfig
from qwen3asr_train.data.audio import AudioError
from qwen3asr_train.data.dataset import Sample, UtteranceDataset
from qwen3asr_train.data.manifest import ManifestError, RowChecks, SkipReport, read_manifest
from qwen3asr_train.eval.decode import DecodeOptions, decode_distributed
from qwen3asr_train.training import stop_requested

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """Decodes its sets with ``model`` and returns flat metrics (``val/<set>/...``); rank 0 writes artifacts.

    ``title`` (model and step) is set by the hook before each evaluation and heads the written charts."""

    title: str | None

    def evaluate(self, model: torch.nn.Module, out_dir: Path, write: bool) -> dict[str, float]: ...


def load_eval_sets(
    sets: dict[str, str], checks: RowChecks, policy: str, limit: int = 0, rejects: SkipReport | None = None
) -> dict[str, list[Sample]]:
    """Decode every set's audio once (validation sets are small; they are reused at every evaluation).

    Under ``policy="skip"`` unusable rows are dropped and counted per set (``rejects`` collects them,
    tagged ``eval:<set>``), so one bad row does not abort the evaluation of the others.
    """
    out: dict[str, list[Sample]] = {}
    for name, path in sets.items():
        report = SkipReport()
        utts = read_manifest(path, checks, policy, report)
        if limit > 0:
            utts = utts[:limit]
        dataset = UtteranceDataset(utts, policy)
        out[name] = []
        for i, utt in enumerate(utts):
            try:
                sample = dataset.load(i)
            except AudioError as exc:
                raise ManifestError(f"{utt.source}: {exc}", "audio_decode_failed") from None
            if sample is None:
                report.add("audio_decode_failed", f"{utt.source}: audio could not be decoded", utt.source)
                continue
            out[name].append(sample)
        report.log(f"evaluation set {name}")
        if rejects is not None:
            rejects.extend(report, f"eval:{name}")
    return out


def pool_texts(paths: list[str], checks: RowChecks, policy: str) -> list[tuple[str, str | None]]:
    """``(text, language)`` of the manifests that feed the biasing distractor pool (``biasing.pool_manifests``)."""
    return [(u.text, u.language) for path in paths for u in read_manifest(path, checks, policy, SkipReport())]


class ASREvaluator:
    """Transcribes each set and scores it with the evaluation report code (WER/CER, LID, S/D/I); with ``biasing``
    enabled, also decodes each set once per hot-word list size (``eval/biasing.py``)."""

    def __init__(
        self,
        processor: Qwen3ASRProcessor,
        sets: dict[str, list[Sample]],
        opts: DecodeOptions,
        samples_to_log: int = 3,
        biasing: BiasingConfig | None = None,
        biasing_pool: list[tuple[str, str | None]] | None = None,
    ) -> None:
        self.processor = processor
        self.sets = sets
        self.opts = opts
        self.samples_to_log = samples_to_log
        self.biasing = biasing if biasing is not None and biasing.enabled else None
        self.biasing_pool = biasing_pool or []
        self.samples: list[dict[str, str]] = []
        self.title: str | None = None

    def evaluate(self, model: torch.nn.Module, out_dir: Path, write: bool) -> dict[str, float]:
        from qwen3asr_train.eval.report import log_metrics, write_reports

        results = {
            name: decode_distributed(model, self.processor, samples, self.opts) for name, samples in self.sets.items()
        }
        biasing = None
        if self.biasing is not None:
            from qwen3asr_train.eval.biasing import evaluate_biasing

            biasing = evaluate_biasing(model, self.processor, self.sets, self.opts, self.biasing, self.biasing_pool)
        if not write:
            return {}
        summary = write_reports(out_dir, results, title=self.title)
        metrics: dict[str, float] = {}
        if biasing is not None:
            from qwen3asr_train.eval import biasing as biasing_report

            (summary_b, rows) = biasing
            biasing_report.write_biasing_report(out_dir, summary_b["sets"], summary_b["settings"], rows, self.title)
            metrics.update(biasing_report.log_metrics(summary_b["sets"]))
        self.samples = []
        for name, rows in results.items():
            metrics.update(log_metrics(summary, name))
            for row in rows[: self.samples_to_log]:
                log.info("[%s] %s\n  ref: %s\n  hyp: %s", name, row.id, row.reference, row.hypothesis)
                self.samples.append(
                    {"set": name, "id": row.id, "reference": row.reference, "hypothesis": row.hypothesis}
                )
        return metrics


def log_samples(logger: Any, samples: list[dict[str, str]], step: int) -> None:
    """Reference/hypothesis pairs to the active logger: a wandb table, TensorBoard text, or ``samples.jsonl``
    next to the CSV metrics (a CSV column cannot hold them)."""
    if not samples:
        return
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_text(
            key="val/samples", columns=list(samples[0]), data=[list(s.values()) for s in samples], step=step
        )
    elif isinstance(logger, TensorBoardLogger):
        lines = ["| set | id | reference | hypothesis |", "|---|---|---|---|"]
        lines += [f"| {s['set']} | {s['id']} | {s['reference']} | {s['hypothesis']} |" for s in samples]
        logger.experiment.add_text("val/samples", "\n".join(lines), global_step=step)
    elif isinstance(logger, CSVLogger):
        path = Path(logger.log_dir) / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")


class PeriodicEvaluation(L.Callback):
    """Runs an :class:`Evaluator` every N optimizer steps and/or at the end; logs, writes, tracks the best."""

    def __init__(
        self,
        evaluator: Evaluator,
        every_n_steps: int,
        at_end: bool,
        run_dir: Path,
        monitor: str | None = None,
        mode: str = "min",
    ) -> None:
        self.evaluator = evaluator
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self.run_dir = run_dir
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.last_step = -1
        self.history: list[tuple[int, dict[str, float]]] = []

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return
        self.last_step = step
        model = pl_module.model
        out_dir = self.run_dir / "eval" / f"step-{step:08d}"
        self.evaluator.title = f"{self.run_dir.name}, step {step}"
        with averaged_weights(trainer, pl_module):  # the weight average, when the run keeps one
            metrics = self.evaluator.evaluate(model, out_dir, write=trainer.is_global_zero)
        metrics = trainer.strategy.broadcast(metrics, src=0)
        self.history.append((step, metrics))
        if trainer.is_global_zero and trainer.logger is not None and metrics:
            trainer.logger.log_metrics(metrics, step=step)
            log_samples(trainer.logger, getattr(self.evaluator, "samples", []), step)
            trainer.logger.save()
        if trainer.is_global_zero:
            self._write_plots()
        if self.monitor is not None:
            if self.monitor not in metrics:
                raise KeyError(f"evaluation.monitor={self.monitor!r} is not among the metrics {sorted(metrics)}")
            value = metrics[self.monitor]
            better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
            if better and math.isfinite(value):
                self.best = value
                trainer.save_checkpoint(self.run_dir / "checkpoints" / "best.ckpt")
                if trainer.is_global_zero:
                    log.info("new best %s = %.4f at step %d", self.monitor, value, step)

    def _write_plots(self) -> None:
        """Training curves, per-step error rates and ``eval/summary.md`` after every evaluation, so a run
        stopped at any point has its pictures. A plotting failure is logged, never fatal: the evaluation
        numbers are already logged and written, and losing a training run to a picture would be worse."""
        from qwen3asr_train.eval.plots import write_run_plots

        try:
            written = write_run_plots(self.run_dir)
        except Exception:
            log.exception("could not draw the run's plots in %s (training continues)", self.run_dir)
            return
        if written:
            log.info("plots: %s", ", ".join(str(p) for p in written.values()))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and not stop_requested(trainer):
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and not stop_requested(trainer):
            self._run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


def build_asr_hook(
    cfg: EvalHookConfig, data: DataConfig, processor: Qwen3ASRProcessor, run_dir: Path
) -> PeriodicEvaluation | None:
    """The hook for ASR stages, or None when no evaluation sets are configured."""
    if not cfg.sets:
        return None
    from qwen3asr_train.data.datamodule import row_checks

    checks = row_checks(data)
    sets = load_eval_sets(cfg.sets, checks, data.on_bad_row, cfg.max_utterances)
    pool = pool_texts(cfg.biasing.pool_manifests, checks, data.on_bad_row) if cfg.biasing.enabled else []
    evaluator = ASREvaluator(processor, sets, cfg.decode, cfg.samples_to_log, cfg.biasing, pool)
    return PeriodicEvaluation(evaluator, cfg.every_n_steps, cfg.at_end, run_dir, cfg.monitor, cfg.monitor_mode)
