"""Console progress for every stage: a text line every N optimizer steps or S seconds, a progress bar that
counts the run's steps, and interval means for the logged training metrics.

Why: with the progress bar off (recipes, SLURM, any non-interactive log) a run printed nothing for half an
hour, so progress could not be told from a hang; with the bar on it showed ``Epoch 3/-2`` and the batches
of the current epoch, never the step of the run or an ETA. And ``metrics.csv`` held one step's values
sampled every ``log_every_n_steps``, so the curves were as noisy as single steps.

- :class:`ConsoleProgress` logs (``logging``, logger ``qwen3asr_train.progress``, rank 0 only) after the first
  optimizer step, then whenever ``every_n_steps`` steps or ``every_seconds`` seconds have passed since the
  last line, and once at the end::

      step 120/1200 (10.0%) | loss 2.3451 | lr 3.00e-03 | 85.2 audio-s/s | 1.24 steps/s | elapsed 0:01:37 | ETA 0:14:31

  Rates and the ETA count only the steps of this process (a resumed run does not claim the earlier
  steps' speed). ``loss`` is the stage's last logged ``train/loss`` (a mean over the logging interval
  when the stage logs :class:`IntervalMeans`); ``lr`` is read from the optimizer; audio-s/s is the unpadded
  audio of the batches (``batch["audio_seconds"]``) this rank trained since the last line, times the
  world size, over the wall time since the last line (exact on one process; with several ranks it assumes
  the sampler's equal padded-seconds budget per rank); it is left out for batches without audio seconds.
- :class:`StepProgressBar`: Lightning's tqdm bar with ``total = max_steps`` and ``n = global_step``.
- :class:`IntervalMeans` + :func:`logger_writes_after_this_batch`: log running means so the value Lightning
  writes every ``log_every_n_steps`` is the mean over the steps since its previous write.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)

DEFAULT_EVERY_SECONDS = 30.0
"""A line at least this often: the acceptance bar for "progress can be told from a hang"."""


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded); ``?`` for an unknown (non-finite or negative) duration."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def run_total_steps(trainer: Any) -> int | None:
    """Optimizer steps of the whole run: ``max_steps``, or Lightning's estimate when only epochs are set."""
    if getattr(trainer, "max_steps", -1) and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimate = getattr(trainer, "estimated_stepping_batches", None)
    if estimate is None or not math.isfinite(float(estimate)):
        return None
    return int(estimate)


def _scalar(value: Any) -> float | None:
    """A logged metric (tensor or number) as a float; ``None`` when absent or not a scalar."""
    if value is None:
        return None
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None


class ConsoleProgress(L.Callback):
    """Log a progress line every ``every_n_steps`` optimizer steps or ``every_seconds`` seconds (module doc).

    Args:
        every_n_steps: a line after this many optimizer steps since the last one (0: time only).
        every_seconds: a line after this many seconds since the last one (0: steps only).
        clock: monotonic time source in seconds (injected by tests).
        loss_key: the logged metric shown as ``loss``.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        every_seconds: float = DEFAULT_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        loss_key: str = "train/loss",
    ) -> None:
        if every_n_steps < 0 or every_seconds < 0 or (every_n_steps == 0 and every_seconds == 0):
            raise ValueError(
                f"ConsoleProgress needs every_n_steps > 0 or every_seconds > 0 (got {every_n_steps}, {every_seconds})"
            )
        self.every_n_steps = int(every_n_steps)
        self.every_seconds = float(every_seconds)
        self.clock = clock
        self.loss_key = loss_key
        self._start_time = 0.0
        self._start_step = 0
        self._last_time = 0.0
        self._last_step = 0
        self._seen_step = 0
        self._audio = 0.0
        self._lines = 0

    # ------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start_time = self._last_time = self.clock()
        self._start_step = self._last_step = self._seen_step = int(trainer.global_step)
        self._audio = 0.0
        self._lines = 0
        if trainer.is_global_zero:
            total = run_total_steps(trainer)
            log.info(
                "training from step %d to %s; a progress line every %s",
                self._start_step,
                total if total is not None else "?",
                self._cadence(),
            )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, Mapping) and "audio_seconds" in batch:
            self._audio += float(_scalar(batch["audio_seconds"]) or 0.0) * max(int(trainer.world_size), 1)
        step = int(trainer.global_step)
        if step == self._seen_step:  # inside a gradient-accumulation window: no optimizer step yet
            return
        self._seen_step = step
        now = self.clock()
        first = self._lines == 0  # the first optimizer step: the run is alive, and how slow a step is
        due_steps = self.every_n_steps > 0 and step - self._last_step >= self.every_n_steps
        due_time = self.every_seconds > 0 and now - self._last_time >= self.every_seconds
        if first or due_steps or due_time:
            self._emit(trainer, step, now)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        step = int(trainer.global_step)
        if step != self._last_step:
            self._emit(trainer, step, self.clock())

    # ------------------------------------------------------------------------------------ the line
    def _cadence(self) -> str:
        parts = [f"{self.every_n_steps} steps"] if self.every_n_steps else []
        parts += [f"{self.every_seconds:g} s"] if self.every_seconds else []
        return " or ".join(parts)

    def line(self, trainer: Any, step: int, now: float) -> str:
        """The progress line at ``step`` and time ``now`` (state since the last line; nothing is reset)."""
        total = run_total_steps(trainer)
        elapsed = now - self._start_time
        done = step - self._start_step
        rate = done / elapsed if elapsed > 0 else math.nan
        parts = [f"step {step}/{total} ({100.0 * step / total:.1f}%)" if total else f"step {step}"]
        loss = _scalar(trainer.callback_metrics.get(self.loss_key)) if trainer.callback_metrics else None
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        interval = now - self._last_time
        if self._audio > 0 and interval > 0:
            parts.append(f"{self._audio / interval:.1f} audio-s/s")
        parts.append(f"{rate:.2f} steps/s" if math.isfinite(rate) else "? steps/s")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if total:
            eta = (total - step) / rate if rate > 0 else math.inf
            parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def _emit(self, trainer: Any, step: int, now: float) -> None:
        if trainer.is_global_zero:
            log.info("%s", self.line(trainer, step, now))
        self._last_time, self._last_step = now, step
        self._audio = 0.0
        self._lines += 1


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting optimizer steps of the run (``n = global_step``, ``total = max_steps``)
    instead of the batches of the current epoch under an ``Epoch N`` label (``Epoch 3/-2`` with max_steps)."""

    def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        total = run_total_steps(trainer)
        if bar.total != total:
            bar.reset(total=total)
            bar.initial = 0
        bar.n = int(trainer.global_step)
        bar.set_description("train steps")
        bar.refresh()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        step = int(trainer.global_step)
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
        if self._leave:  # one bar per epoch only when asked to keep them
            self.train_progress_bar.close()


def progress_callbacks(
    enable_progress_bar: bool, every_n_steps: int = 0, every_seconds: float = DEFAULT_EVERY_SECONDS
) -> list[L.Callback]:
    """The callbacks a stage's Trainer gets: always the console lines, the step bar when the bar is on
    (Lightning refuses a progress-bar callback with ``enable_progress_bar=False``)."""
    callbacks: list[L.Callback] = [ConsoleProgress(every_n_steps=every_n_steps, every_seconds=every_seconds)]
    if enable_progress_bar:
        callbacks.append(StepProgressBar())
    return callbacks


# ------------------------------------------------------------------------------------------ interval means


class IntervalMeans:
    """Per-key running means of per-step metrics since the last :meth:`reset`.

    Why: Lightning writes a metric's *last logged* value every ``log_every_n_steps`` steps. Logging
    ``add(step_values)`` every optimizer step and resetting after each write (see
    :func:`logger_writes_after_this_batch`) makes every written value the mean over its interval::

        means = self.interval.add(step_metrics)          # in training_step, once per optimizer step
        self.log_dict(means, on_step=True, rank_zero_only=True)
        if logger_writes_after_this_batch(self.trainer):
            self.interval.reset()                         # Lightning writes `means` at the end of this batch

    Keys absent from a step are averaged over the steps that had them. ``keep_last`` keys (counters,
    the learning rate) are written as their latest value, not averaged.
    """

    def __init__(self, keep_last: tuple[str, ...] = ("train/lr",)) -> None:
        self.keep_last = frozenset(keep_last)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def add(self, values: Mapping[str, Any]) -> dict[str, float]:
        """Add one step's values; return the running means (``keep_last`` keys: latest value)."""
        for key, value in values.items():
            number = _scalar(value)
            if number is None:
                raise TypeError(f"IntervalMeans.add: {key}={value!r} is not a scalar")
            self._last[key] = number
            if key not in self.keep_last:
                self._sums[key] = self._sums.get(key, 0.0) + number
                self._counts[key] = self._counts.get(key, 0) + 1
        return self.means()

    def means(self) -> dict[str, float]:
        """The means since the last reset (``keep_last`` keys: latest value)."""
        out = {key: self._sums[key] / self._counts[key] for key in self._sums}
        out.update({key: self._last[key] for key in self.keep_last if key in self._last})
        return out

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()
        self._last.clear()

    def __len__(self) -> int:
        """Steps added since the last reset (the most any key was added)."""
        return max(self._counts.values(), default=0)


def logger_writes_after_this_batch(trainer: Any) -> bool:
    """Whether Lightning writes the logged step metrics to the loggers at the end of the current batch.

    Reads ``trainer._logger_connector.should_update_logs`` (Lightning 2.6: ``(_batches_that_stepped + 1) %
    log_every_n_steps == 0`` or ``should_stop``): it is the very condition Lightning applies after
    ``on_train_batch_end``, so mirroring it by hand could only drift from it.
    """
    return bool(trainer._logger_connector.should_update_logs)
