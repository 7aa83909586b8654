"""A passive clock for our training path: when each optimizer step ended and what it processed.

Why a callback and not the logged metrics: ``make bench`` must time both sides the same way. The official
recipe is observed by :mod:`benchmarks.official_launcher` at the same point (the end of every optimizer step),
so the two JSON files this module and the launcher write are summarised by one function
(:func:`benchmarks.bench_sft.summarise`). The callback only reads the batch; it changes nothing.

Use: ``+trainer.callbacks.bench_clock._target_=benchmarks.step_clock.StepClock
+trainer.callbacks.bench_clock.out=<file.json>`` (run from the repository root so ``benchmarks`` imports).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


def batch_stats(batch: dict[str, Any]) -> dict[str, float]:
    """Audio seconds, real (non-padding) decoder positions, all decoder positions and rows of one micro-batch.

    Audio seconds come from the mel mask (100 frames per second, as the official side counts them), so both
    sides measure audio the same way. A packed batch (several utterances per row) has no padding inside rows;
    its ``attention_mask`` (or, without one, every position) is what is real.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = float(mask.sum()) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else float(ids.numel())
    frames = batch.get("input_features_mask")
    audio = float(frames.sum()) / 100.0 if isinstance(frames, torch.Tensor) else float(batch.get("audio_seconds", 0.0))
    rows = batch.get("ids")
    return {
        "audio_s": audio,
        "real_tokens": real,
        "positions": float(ids.numel()),
        "rows": float(len(rows)) if rows is not None else float(ids.shape[0]),
        "target_tokens": float(batch.get("num_target_tokens", 0)),
        "head_rows": float(batch.get("num_target_tokens", 0)),  # our head runs on the target positions only
    }


class StepClock(L.Callback):
    """Append ``{"t", "audio_s", "real_tokens", "positions", "rows", "micro_batches"}`` per optimizer step."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.steps: list[dict[str, float]] = []
        self._pending: dict[str, float] = {}
        self._last_step = 0
        self.t_begin = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t_begin = time.perf_counter()
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for micro in batch if isinstance(batch, list) else [batch]:
            for key, value in batch_stats(micro).items():
                self._pending[key] = self._pending.get(key, 0.0) + value
            self._pending["micro_batches"] = self._pending.get("micro_batches", 0.0) + 1
        if trainer.global_step != self._last_step:  # an optimizer step just ran
            self._last_step = trainer.global_step
            self.steps.append({"t": time.perf_counter(), **self._pending})
            self._pending = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        record = {
            "side": "ours",
            "t_begin": self.t_begin,
            "steps": self.steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "torch_threads": torch.get_num_threads(),
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(record) + "\n")
