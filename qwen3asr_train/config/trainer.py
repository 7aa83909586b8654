"""``trainer.*`` and ``logger.*``: hardware, strategy, precision, run length, checkpoints, metric loggers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwen3asr_train.config.base import _require, _require_target


# ------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    """Lightning Trainer: hardware, strategy, precision, schedule length, checkpoints."""

    callbacks: dict[str, Any] = field(default_factory=dict)
    """Extra Lightning callbacks, name -> ``{_target_: import.path, ...kwargs}``, e.g.
    ``+trainer.callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging +trainer.callbacks.swa.swa_lrs=1e-4``."""

    strategy: str = "auto"
    """``auto`` (single device), ``ddp``, ``fsdp``, ``deepspeed_zero2`` or ``deepspeed_zero3``."""
    accelerator: str = "auto"
    """``cpu``, ``gpu`` or ``auto``."""
    devices: Any = "auto"
    """Devices per node (an int, or ``auto``)."""
    num_nodes: int = 1
    """Number of machines."""
    precision: str = "32-true"
    """``32-true``, ``bf16-mixed`` (fp32 master weights, bf16 compute), ``16-mixed``, or ``bf16-true``."""
    allow_low_precision_weights: bool = False
    """Required for ``bf16-true``: pure bf16 weights lose small updates to rounding (see docs/decisions.md)."""
    max_steps: int = -1
    """Optimizer steps to train (-1: use max_epochs)."""
    max_epochs: int | None = None
    """Epochs to train when max_steps is -1."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step; the loss is normalised over the target tokens of all of them."""
    gradient_clip_val: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    log_every_n_steps: int = 10
    """Logging interval in optimizer steps."""
    val_check_interval: int | None = None
    """Run validation every N optimizer steps (None: at the end of every epoch)."""
    checkpoint_every_n_steps: int = 500
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""
    save_top_k: int = 2
    """How many step checkpoints to keep (``last.ckpt`` is always kept)."""
    max_nonfinite_skips: int = 3
    """Non-finite steps (loss or gradient norm) skipped in a row before the run stops; 0 = stop at the first."""
    resume_allow_changes: bool = False
    """Resume although the checkpoint's data plan (manifests, batching, seed, ranks) or model differ (warned)."""
    deterministic: bool = False
    """Ask torch for deterministic kernels."""
    enable_progress_bar: bool = True
    """Show the progress bar."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for ``train/mfu`` (0: the dense bf16 datasheet value looked up by the CUDA
    device's name, ``training.PEAK_TFLOPS_BF16``; MFU is not logged on CPU or for an unknown card)."""
    fsdp_sharding: str = "FULL_SHARD"
    """FSDP sharding strategy: FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD or NO_SHARD."""
    deepspeed_offload: bool = False
    """DeepSpeed: offload optimizer state (and ZeRO-3 parameters) to CPU memory."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights with this decay per optimizer step (0: off;
    e.g. 0.998 averages over ~500 steps). Evaluation and exports use the average (docs/stages.md)."""
    ema_start_step: int = 0
    """Before this optimizer step the average just follows the weights."""

    def validate(self) -> None:
        for name, spec in self.callbacks.items():
            _require_target(spec, f"trainer.callbacks.{name}")
        strategies = {"auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
        _require(self.strategy in strategies, "trainer.strategy", f"must be one of {sorted(strategies)}")
        _require(self.accelerator in {"cpu", "gpu", "auto"}, "trainer.accelerator", "must be cpu|gpu|auto")
        precisions = {"32-true", "bf16-mixed", "16-mixed", "bf16-true"}
        _require(self.precision in precisions, "trainer.precision", f"must be one of {sorted(precisions)}")
        _require(
            self.precision != "bf16-true" or self.allow_low_precision_weights,
            "trainer.precision",
            "bf16-true keeps no fp32 master weights, so small updates are lost to rounding (the upstream recipe "
            "left 72% of the weights unchanged this way); use bf16-mixed, or set "
            "trainer.allow_low_precision_weights=true to accept that for the memory saving",
        )
        _require(self.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", "must be >= 1")
        _require(self.gradient_clip_val >= 0, "trainer.gradient_clip_val", "must be >= 0")
        _require(self.checkpoint_every_n_steps >= 1, "trainer.checkpoint_every_n_steps", "must be >= 1")
        _require(self.max_nonfinite_skips >= 0, "trainer.max_nonfinite_skips", "must be >= 0")
        _require(self.peak_tflops >= 0, "trainer.peak_tflops", "must be >= 0 (0: looked up by device name)")
        _require(
            self.fsdp_sharding in {"FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"},
            "trainer.fsdp_sharding",
            "must be FULL_SHARD|SHARD_GRAD_OP|HYBRID_SHARD|NO_SHARD",
        )
        _require(0.0 <= self.ema_decay < 1.0, "trainer.ema_decay", "must be in [0, 1) (0: no average)")
        _require(self.ema_start_step >= 0, "trainer.ema_start_step", "must be >= 0")
        if self.strategy in {"fsdp", "deepspeed_zero2", "deepspeed_zero3"}:
            _require(
                self.ema_decay == 0.0,
                "trainer.ema_decay",
                f"the weight average is not supported with {self.strategy} yet: no rank holds whole weights to "
                "average; use ddp, or set trainer.ema_decay=0",
            )
            _require(
                self.accelerator != "cpu",
                "trainer.strategy",
                f"{self.strategy} needs GPUs (Lightning refuses it on CPU); use trainer=ddp for CPU runs",
            )


# -------------------------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    """Where metrics go."""

    name: str = "csv"
    """``csv`` (default, never touches the network), ``tensorboard``, ``wandb`` or ``none``."""
    project: str = "qwen3asr_train"
    """Project name (wandb)."""
    run_name: str | None = None
    """Run name (default: the run directory's name)."""
    wandb_mode: str = "offline"
    """wandb mode: ``offline`` (default; sync later with ``wandb sync``), ``online`` or ``disabled``."""

    def validate(self) -> None:
        _require(
            self.name in {"csv", "tensorboard", "wandb", "none"}, "logger.name", "must be csv|tensorboard|wandb|none"
        )
        _require(
            self.wandb_mode in {"offline", "online", "disabled"}, "logger.wandb_mode", "must be offline|online|disabled"
        )
