"""Shared training plumbing: Trainer, strategies, logger, atomic checkpoints, optimizer and schedule.

Why here and not in each stage: the distributed strategy, precision, checkpointing and logging must
be identical for SFT, GSPO and the aligner; a stage only brings its LightningModule.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qwen3asr_train.config.schema import LoggerConfig, OptimConfig, RunConfig, TrainerConfig

log = logging.getLogger(__name__)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step stored in a Lightning checkpoint (memory-mapped: the tensors are not read)."""
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<name>.tmp-<pid>`` next to the target, fsyncs it, then ``os.replace``s it into place.

    Why: Lightning's local save goes through an fsspec transaction whose temporary file lives in the
    system temp directory and is *moved* (copied across filesystems) at commit, so a crash during the
    copy leaves a truncated checkpoint. A same-directory rename is atomic: the target is either the old
    complete file or the new complete file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()


class TorchRNGState(L.Callback):
    """Saves and restores torch's global RNG (sampling, dropout) with every checkpoint, in every stage,
    so a resumed run draws what the uninterrupted one would have."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


def _wrap_layers(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """Audio-encoder and decoder layer classes (FSDP/activation-checkpointing units; never the embeddings,
    so the tied embedding and head stay in the root unit)."""
    names = set(getattr(model, "_no_split_modules", None) or []) | {"Qwen3ASRAudioEncoderLayer", "Qwen3DecoderLayer"}
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def build_strategy(cfg: TrainerConfig, model: torch.nn.Module) -> Any:
    """Lightning strategy object for ``trainer.strategy``."""
    if cfg.strategy == "auto":
        return "auto"
    if cfg.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False, checkpoint_io=AtomicCheckpointIO())
    if cfg.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        layers = _wrap_layers(model)
        return FSDPStrategy(
            auto_wrap_policy=layers,
            sharding_strategy=cfg.fsdp_sharding,
            state_dict_type="full",
            checkpoint_io=AtomicCheckpointIO(),
        )
    from lightning.pytorch.strategies import DeepSpeedStrategy

    stage = 2 if cfg.strategy == "deepspeed_zero2" else 3
    return DeepSpeedStrategy(
        stage=stage,
        offload_optimizer=cfg.deepspeed_offload,
        offload_parameters=cfg.deepspeed_offload and stage == 3,
    )


class _AppendingCSVWriter(ExperimentWriter):
    """Keeps the rows of an earlier (interrupted) run below the resume step instead of deleting the file."""

    def __init__(self, log_dir: str, keep_below_step: int) -> None:
        self._keep_below_step = keep_below_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and int(r["step"]) < self._keep_below_step]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(fields)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that, when a run resumes from step k, keeps the earlier run's rows for steps < k."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is None and self._resume_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingCSVWriter(self.log_dir, self._resume_step)
        return super().experiment


def build_logger(cfg: LoggerConfig, run_dir: Path, resume_step: int | None = None) -> Any:
    """csv (default, offline), tensorboard, wandb (offline unless asked) or none."""
    name = cfg.run_name or run_dir.name
    if cfg.name == "none":
        return False
    if cfg.name == "csv":
        return ResumableCSVLogger(save_dir=str(run_dir), name="logs", version="", resume_step=resume_step)
    if cfg.name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name="logs", version="")
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
    return WandbLogger(
        project=cfg.project, name=name, save_dir=str(run_dir), offline=cfg.wandb_mode == "offline", mode=cfg.wandb_mode
    )


def build_trainer(
    cfg: RunConfig,
    model: torch.nn.Module,
    extra_callbacks: list[L.Callback] = (),
    automatic_optimization: bool = True,
    validation: bool = True,
    resume_from: str | None = None,
) -> L.Trainer:
    """The Lightning Trainer for a run: strategy, precision, atomic checkpoints every N steps, logger."""
    t = cfg.trainer
    run_dir = Path(cfg.run_dir)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step={step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_last=True,
        save_top_k=t.save_top_k,
        monitor="step",
        mode="max",
        save_on_train_epoch_end=True,
    )
    callbacks: list[L.Callback] = [checkpoint, TorchRNGState(), *extra_callbacks]
    logger = build_logger(cfg.logger, run_dir, checkpoint_step(resume_from) if resume_from else None)
    plugins = [AtomicCheckpointIO()] if t.strategy == "auto" else []
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t, model),
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=t.max_epochs if t.max_steps <= 0 else None,
        accumulate_grad_batches=t.accumulate_grad_batches if automatic_optimization else 1,
        gradient_clip_val=(t.gradient_clip_val or None) if automatic_optimization else None,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if t.val_check_interval else 1,
        num_sanity_val_steps=0,
        limit_val_batches=None if validation else 0,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        plugins=plugins,
    )


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms, 1-D)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr: linear warm-up, then cosine/linear decay to ``min_lr_ratio`` (or constant)."""
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_optimizer(module: L.LightningModule, cfg: OptimConfig, total_steps: int) -> dict[str, Any]:
    """AdamW over trainable parameters + per-step LambdaLR (for ``configure_optimizers``)."""
    optimizer = torch.optim.AdamW(
        parameter_groups(module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total_steps, cfg))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def all_reduce_sums(module: L.LightningModule, sums: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over ranks (one all-reduce); unchanged in a single process."""
    values = torch.tensor(list(sums.values()), device=module.device, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and module.trainer.world_size > 1:
        torch.distributed.all_reduce(values)
    return dict(zip(sums, values.tolist(), strict=True))


class StepNormaliser:
    """Loss scale and statistics for one optimizer step made of a window of micro-batches.

    Why: a stage's loss is a *sum* over labelled units (target tokens, timestamp slots) divided by the
    number of units in the whole optimizer step, across micro-batches and ranks. Batches carry
    ``window_target_tokens`` (the window's unit count on this rank, from the window collator); the global
    count needs one all-reduce per window. Lightning divides each micro-batch loss by the accumulation
    count and DDP averages gradients over ranks, so :meth:`scale` returns ``k × world / N_global``.
    """

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._global = 1
        self.sums: dict[str, float] = {}
        self.started = 0.0

    @staticmethod
    def _window_start(batch: dict) -> tuple[int, int]:
        epoch, micro = batch["position"]
        return epoch, micro - micro % max(batch["window_size"], 1)

    def observe(self, module: L.LightningModule, batch: dict) -> float:
        """Start a window at its first micro-batch; return this micro-batch's loss scale."""
        key = self._window_start(batch)
        if key != self._key:
            self._key = key
            self.sums = {}
            self.started = time.perf_counter()
            self._global = int(all_reduce_sums(module, {"n": float(batch["window_target_tokens"])})["n"])
        return module.trainer.accumulate_grad_batches * module.trainer.world_size / max(self._global, 1)

    def add(self, **values: float) -> None:
        """Accumulate statistics of this micro-batch (plain floats)."""
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def window_done(self, batch: dict, trainer: L.Trainer) -> bool:
        """True at the last micro-batch of a window (or of the epoch)."""
        return (batch["position"][1] + 1) % max(batch["window_size"], 1) == 0 or bool(trainer.is_last_batch)

    def totals(self, module: L.LightningModule) -> tuple[dict[str, float], float]:
        """Window statistics summed over ranks, and the seconds the window took."""
        return all_reduce_sums(module, self.sums), max(time.perf_counter() - self.started, 1e-9)
