"""Exponential moving average (EMA) of the trained weights: ``trainer.ema_decay``.

Why: the weights at the last step carry the noise of the last few hundred updates; their running average
usually evaluates better and, for the small from-scratch models, varies less from seed to seed (icefall
averages models for the same reason). What is averaged: every parameter that requires a gradient (LoRA
adapters only in a LoRA run; a frozen reference or encoder never changes, so it needs no copy), in float32
whatever the training precision.

Where the average is used, and where it is not:

- the evaluation hook decodes with the averaged weights (swapped in for the evaluation and back after);
- the end-of-run export and ``recipe=export`` / ``recipe=eval`` / transcription from a checkpoint use
  them (``recipe.ema=false`` exports the raw weights instead);
- training itself always continues from the raw weights, and a checkpoint keeps both: ``state_dict`` (raw,
  so that a resumed run is bit-identical to an uninterrupted one) and ``ema_state_dict`` (the average).

Sharded strategies (FSDP, DeepSpeed) are refused by the config check: there no rank holds whole weights to
average, and gathering them every step would defeat the sharding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

EMA_KEY = "ema_state_dict"
"""Checkpoint key of the averaged weights (LightningModule names, as in ``state_dict``)."""


def trainable(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The parameters the average follows: those that train."""
    return ((name, p) for name, p in module.named_parameters() if p.requires_grad)


class WeightEMA(L.Callback):
    """Keeps ``avg ← decay · avg + (1 − decay) · w`` after every optimizer step.

    Before ``start_step`` the average simply follows the weights (decay 0), so it does not remember the
    random start of a from-scratch model. A step the fault handling skipped (non-finite loss) leaves the
    weights as they were, so the average moves towards unchanged weights.

    :func:`~qwen3asr_train.training.build_trainer` puts this callback first: its update of step N must be
    in place before anything else at the end of step N saves a checkpoint (preemption, the step interval)
    or evaluates.
    """

    def __init__(self, decay: float, start_step: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.average: dict[str, torch.Tensor] | None = None
        self.updated_step = 0

    # ------------------------------------------------------------------------------------ the average
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.average is None:
            self.average = {name: p.detach().float().clone() for name, p in trainable(pl_module)}
            return
        names = {name for name, _ in trainable(pl_module)}
        if names != set(self.average):
            raise RuntimeError(
                f"the checkpoint's averaged weights ({EMA_KEY}) name other parameters than this run trains "
                f"({len(set(self.average) ^ names)} differ, e.g. {sorted(set(self.average) ^ names)[:3]})"
            )
        device = next(p.device for _, p in trainable(pl_module))
        self.average = {name: t.to(device) for name, t in self.average.items()}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step <= self.updated_step or self.average is None:
            return  # a micro-batch inside gradient accumulation, or a skipped step
        self.updated_step = step
        weight = 1.0 - self.decay if step > self.start_step else 1.0
        with torch.no_grad():
            for name, p in trainable(pl_module):
                self.average[name].lerp_(p.detach().float(), weight)

    @contextlib.contextmanager
    def applied(self, pl_module: L.LightningModule) -> Iterator[None]:
        """The averaged weights in the module for the duration of the block, the raw ones restored after
        (also when the block raises)."""
        if self.average is None:
            yield
            return
        params = dict(trainable(pl_module))
        raw = {name: p.detach().clone() for name, p in params.items()}
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self.average[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(raw[name])

    # ------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.average is not None:
            # under every name of a shared (tied) parameter, as ``state_dict`` lists it, so that an overlay
            # replaces all of its copies
            canonical = {id(p): name for name, p in trainable(pl_module)}
            aliases = {
                name: canonical[id(p)]
                for name, p in pl_module.named_parameters(remove_duplicate=False)
                if id(p) in canonical
            }
            checkpoint[EMA_KEY] = {name: self.average[src].detach().cpu().clone() for name, src in aliases.items()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if EMA_KEY in checkpoint:
            names = {name for name, _ in trainable(pl_module)}  # aliases of tied parameters dropped
            self.average = {name: t.float().clone() for name, t in checkpoint[EMA_KEY].items() if name in names}
            # the callback runs first, so a checkpoint of step N always holds the update of step N
            self.updated_step = int(checkpoint.get("global_step", 0))
        else:
            log.warning(
                "the resumed checkpoint has no averaged weights (it was written with trainer.ema_decay=0): "
                "the average starts from its weights"
            )


def find_ema(trainer: L.Trainer | None) -> WeightEMA | None:
    """The run's :class:`WeightEMA` callback, if the run averages."""
    if trainer is None:
        return None
    return next((c for c in trainer.callbacks if isinstance(c, WeightEMA)), None)


@contextlib.contextmanager
def averaged_weights(trainer: L.Trainer | None, pl_module: L.LightningModule) -> Iterator[None]:
    """The averaged weights in ``pl_module`` for the block when the run averages; a no-op otherwise."""
    ema = find_ema(trainer)
    with ema.applied(pl_module) if ema is not None else contextlib.nullcontext():
        yield


def overlay_average(state: dict[str, torch.Tensor], payload: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """``state`` (a checkpoint's raw module weights) with the averaged ones put in where the checkpoint has
    them, cast to each raw tensor's dtype. Every averaged name must exist in ``state``."""
    average = payload.get(EMA_KEY)
    if not average:
        return state
    unknown = sorted(set(average) - set(state))
    if unknown:
        raise KeyError(f"{source}: averaged weights for parameters the checkpoint does not have: {unknown[:3]}")
    log.info("%s: using the averaged weights (%d tensors) of the checkpoint", source, len(average))
    return {**state, **{name: t.to(state[name].dtype) for name, t in average.items()}}
