"""Shared training plumbing: Trainer, strategies, logger, atomic checkpoints, optimizer and schedule,
and fault handling (preemption signals, non-finite steps, safe checkpoint loading, resume checks).

Why here and not in each stage: the distributed strategy, precision, checkpointing, logging and the
behaviour on a cluster (SIGTERM, divergence, damaged files) must be identical for SFT, GSPO and the
aligner; a stage only brings its LightningModule. See docs/fault_handling.md.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qwen3asr_train.averaging import WeightEMA
from qwen3asr_train.config.schema import LoggerConfig, OptimConfig, RunConfig, TrainerConfig
from qwen3asr_train.data.packing import PACKED_KEY, packed_causal_mask
from qwen3asr_train.data.workers import node_cores, resolve_num_workers, resolve_prefetch_factor  # noqa: F401 (re-exported)
from qwen3asr_train.progress import IntervalMeans, logger_writes_after_this_batch, progress_callbacks

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and why."""


class NonFiniteError(RuntimeError):
    """Training diverged (non-finite loss, gradients or weights); the message names the step and utterances."""


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; the process exits with ``128 + signal``.

    Why a ``SystemExit``: unhandled, it ends the process with that status (143 for SIGTERM, what
    schedulers and ``set -e`` pipelines understand as "killed") without a traceback, and Hydra's error
    handler (which catches ``Exception``) lets it through.
    """

    def __init__(self, signum: int, checkpoint: Path | None, step: int) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.checkpoint = checkpoint
        self.step = step


CHECKPOINT_DIR = "checkpoints"
"""Run-directory folder of the Lightning checkpoints."""

_TMP_SUFFIX = re.compile(r"\.(tmp|old)-(\d+)$")


def load_checkpoint_file(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of one of our checkpoints; every failure names the file.

    Why ``weights_only``: a ``.ckpt`` is a pickle, and a pickle can run code while it is loaded. Ours
    hold plain data (tensors, numbers, strings, dicts), so anything that needs more is refused, never
    executed. ``mmap=True`` maps the tensors instead of reading them (cheap header checks).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes; an interrupted write?)")
    try:
        payload = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as exc:
        full = str(exc)
        text = full.strip().splitlines()[0] if full.strip() else type(exc).__name__
        if "weights only load failed" in full.lower() or "unsupported global" in full.lower():
            raise CheckpointError(
                f"{path}: refused: loading it needs arbitrary Python objects (weights_only=True), which no "
                f"checkpoint written by this project does; nothing in it was executed ({text})"
            ) from None
        raise CheckpointError(
            f"{path}: not a complete checkpoint ({size} bytes; truncated or corrupt?): {text}"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (a {type(payload).__name__}, not a dict)")
    return payload


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step stored in a Lightning checkpoint (memory-mapped: the tensors are not read)."""
    payload = load_checkpoint_file(path, mmap=True)
    if "global_step" not in payload:
        raise CheckpointError(f"{path}: no global_step (not a Lightning training checkpoint)")
    return int(payload["global_step"])


def newest_checkpoint(ckpt_dir: str | os.PathLike, skip: Iterable[str | os.PathLike] = ()) -> tuple[Path, int] | None:
    """The intact checkpoint with the highest global step in ``ckpt_dir`` (``last.ckpt`` wins ties), or None.

    Unreadable files are skipped with a warning that names them and says why.
    """
    ckpt_dir = Path(ckpt_dir)
    skipped = {Path(p).resolve() for p in skip}
    best: tuple[int, int, Path] | None = None
    files = sorted(p for p in ckpt_dir.glob("*.ckpt") if p.is_file()) if ckpt_dir.is_dir() else []
    for path in files:
        if path.resolve() in skipped:
            continue
        try:
            step = checkpoint_step(path)
        except CheckpointError as exc:
            log.warning("ignoring checkpoint %s", exc)
            continue
        key = (step, int(path.name == "last.ckpt"), path)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else (best[2], best[0])


def resolve_resume(recipe_resume: str | None, run_dir: str | os.PathLike) -> str | None:
    """The checkpoint a run resumes from, checked before anything is built.

    ``None``: a fresh run. ``auto``: the newest intact checkpoint of this run directory, or a fresh run
    when there is none (what a requeued job wants). ``last``: ``checkpoints/last.ckpt``, which must
    exist; if it is damaged, the newest intact checkpoint beside it is used, with a warning. A path:
    exactly that file (an error naming it when it cannot be used).
    """
    if recipe_resume is None:
        return None
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    if recipe_resume == "auto":
        found = newest_checkpoint(ckpt_dir)
        if found is None:
            log.info("recipe.resume_from=auto: no intact checkpoint in %s, starting fresh", ckpt_dir)
            return None
        log.info("recipe.resume_from=auto: resuming from %s (step %d)", found[0], found[1])
        return str(found[0])
    if recipe_resume == "last":
        path = ckpt_dir / "last.ckpt"
        if not path.exists():
            raise FileNotFoundError(
                f"recipe.resume_from=last: no checkpoint at {path} (resume_from=auto starts fresh when there is none)"
            )
        try:
            checkpoint_step(path)
            return str(path)
        except CheckpointError as exc:
            found = newest_checkpoint(ckpt_dir, skip=[path])
            if found is None:
                raise CheckpointError(
                    f"recipe.resume_from=last: {exc}; no other intact checkpoint in {ckpt_dir}"
                ) from None
            log.warning("recipe.resume_from=last: %s; falling back to %s (step %d)", exc, found[0], found[1])
            return str(found[0])
    path = Path(recipe_resume)
    if path.is_dir():  # a DeepSpeed checkpoint directory: its strategy reads it
        return str(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe.resume_from={recipe_resume!r}: no checkpoint at {path}")
    checkpoint_step(path)
    return str(path)


def remove_stale_temporaries(*directories: str | os.PathLike) -> list[Path]:
    """Delete ``*.tmp-<pid>`` / ``*.old-<pid>`` leftovers of processes that no longer run.

    Why: an interrupted atomic write leaves its temporary file (or export directory) behind. Only a
    process that is gone can no longer finish or rename it, so only those are removed.
    """
    removed = []
    for directory in directories:
        directory = Path(directory)
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            match = _TMP_SUFFIX.search(path.name)
            if match is None or _pid_alive(int(match.group(2))):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d stale temporary files: %s", len(removed), sorted(p.name for p in removed))
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_writable(*directories: str | os.PathLike) -> None:
    """Create each directory and write a probe file in it, so a read-only or full disk is found at start.

    Why a real write rather than ``os.access``: root passes ``os.access`` on read-only mounts, and quotas
    only show on a write.
    """
    for directory in directories:
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-") as handle:
                handle.write(b"ok")
                handle.flush()
        except OSError as exc:
            raise OSError(f"{directory}: not writable ({exc}); the run's checkpoints and logs go there") from None


def nonfinite_tensors(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[str]:
    """Names of floating-point tensors holding NaN or ±inf (one device sync for all of them)."""
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    items = [(k, v) for k, v in pairs if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    if not items:
        return []
    flags = torch.stack([torch.isfinite(v.detach()).all().cpu() for _, v in items])
    return [k for (k, _), ok in zip(items, flags.tolist(), strict=True) if not ok]


def assert_finite_weights(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], what: str) -> None:
    """Refuse to write ``what`` (a checkpoint or an export) from weights that hold NaN or inf."""
    bad = nonfinite_tensors(tensors)
    if bad:
        raise NonFiniteError(f"refusing to write {what}: {len(bad)} weight tensors are not finite, e.g. {bad[:3]}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<name>.tmp-<pid>`` next to the target, fsyncs it, then ``os.replace``s it into place;
    reads with ``weights_only=True`` and errors that name the file.

    Why: Lightning's local save goes through an fsspec transaction whose temporary file lives in the
    system temp directory and is *moved* (copied across filesystems) at commit, so a crash during the
    copy leaves a truncated checkpoint. A same-directory rename is atomic: the target is either the old
    complete file or the new complete file. Weights are checked to be finite before anything is written.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        target = Path(path)
        if "state_dict" in checkpoint:
            assert_finite_weights(checkpoint["state_dict"], f"checkpoint {target}")
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

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Always ``weights_only=True``, whatever the caller asks (see :func:`load_checkpoint_file`)."""
        if weights_only is False:
            raise CheckpointError(f"{path}: weights_only=False was requested; checkpoints are only read weights-only")
        return load_checkpoint_file(path)


class TorchRNGState(L.Callback):
    """Saves and restores torch's global RNG (sampling, dropout) with every checkpoint, in every stage,
    so a resumed run draws what the uninterrupted one would have."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""SIGTERM: what SLURM and Kubernetes send before killing a job; SIGUSR1: what ``sbatch --signal`` can send early."""


def data_fingerprint(durations: Sequence[float], ids: Sequence[str]) -> str:
    """A short hash of the training items in order (what a saved data position indexes into)."""
    digest = hashlib.sha1()
    for utt_id, seconds in zip(ids, durations, strict=True):
        digest.update(f"{utt_id}\t{seconds:.6f}\n".encode())
    return digest.hexdigest()[:16]


def plan_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: saved -> current`` for every leaf that differs (keys present on one side only included)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(plan_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_resume_plan(ckpt_path: str | None, plan: Mapping[str, Any], allow_changes: bool) -> None:
    """Refuse to resume a checkpoint whose data plan (what its saved data position means) or model differ.

    Why: the checkpoint stores "micro-batch k of epoch e" and the schedule position; with another
    manifest, batch size, accumulation, seed or model that points at different data or weights, and the
    run would continue silently as something else. ``trainer.resume_allow_changes=true`` turns the error
    into a warning (e.g. to fine-tune further on new data from a checkpoint on purpose).
    """
    if ckpt_path is None or Path(ckpt_path).is_dir():
        return
    saved = load_checkpoint_file(ckpt_path, mmap=True).get("run_plan")
    if saved is None:
        log.warning("%s: no run plan stored (an older checkpoint); the data plan cannot be checked", ckpt_path)
        return
    saved = {k: v for k, v in saved.items() if k != "world_size"}
    current = {k: v for k, v in plan.items() if k != "world_size"}
    diff = plan_differences(saved, current)
    if not diff:
        return
    message = f"{ckpt_path}: the run plan differs from the checkpoint's: " + "; ".join(diff)
    if allow_changes:
        log.warning("%s (resuming anyway: trainer.resume_allow_changes=true)", message)
        return
    raise CheckpointError(
        message + ". The saved data position would point at other data; resume with the same settings, start a new "
        "run directory, or set trainer.resume_allow_changes=true"
    )


class FaultTolerance(L.Callback):
    """Preemption signals, the non-finite step policy, and the run plan stored in every checkpoint.

    * **Preemption**: SIGTERM/SIGUSR1 only set a flag (a signal handler must not do work). At the next
      optimizer-step boundary where the stage can resume exactly (``at_checkpoint_boundary()`` on the
      LightningModule; GSPO: between rollout batches) the ranks agree on the flag (one all-reduce per
      step, multi-process runs only), ``last.ckpt`` is written and :class:`Preempted` is raised: exit
      status 128 + signal (143 for SIGTERM). Lightning's own SIGTERM handler (which ends ``fit`` normally,
      exit status 0, without a checkpoint) and its SLURM auto-requeue handler are replaced for the run.
    * **Non-finite steps**: before every optimizer step the loss of each micro-batch (kept as a device
      flag, no sync) and the total gradient norm are checked with one host sync. A non-finite step's
      update is skipped (gradients dropped: weights and optimizer state stay as they were), reported with
      the step and utterance ids; more than ``max_nonfinite_skips`` in a row stop the run with
      :class:`NonFiniteError`. While the last step was non-finite no checkpoint is written or rotated.
    """

    def __init__(
        self, max_nonfinite_skips: int = 3, plan: Mapping[str, Any] | None = None, allow_changes: bool = False
    ) -> None:
        self.max_nonfinite_skips = max_nonfinite_skips
        self.plan: dict[str, Any] = dict(plan or {})
        self.allow_changes = allow_changes
        self.resume_path: str | None = None
        self.stop_signal: int | None = None
        self.preempted: Preempted | None = None
        self.streak = 0
        self.skipped_steps: list[int] = []
        self._previous_handlers: dict[int, Any] = {}
        self._seen_step: int | None = None
        self._loss_ok: torch.Tensor | None = None
        self._ids: list[str] = []
        self._ids_step = -1

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum  # logged at the step boundary: logging inside a handler can deadlock

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in PREEMPTION_SIGNALS:
            previous = signal.signal(sig, self._on_signal)
            self._previous_handlers.setdefault(sig, previous)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.plan["world_size"] = trainer.world_size

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its SIGTERM handler just before training starts and restores the earlier
        # handlers at teardown; installing ours here replaces its handler for the run and leaves no trace
        self._install()
        if trainer.received_sigterm:  # arrived between Lightning's registration and now
            self.stop_signal = signal.SIGTERM
            trainer._signal_connector.received_sigterm = False
        self._seen_step = trainer.global_step

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _world(self, trainer: L.Trainer) -> bool:
        return dist.is_available() and dist.is_initialized() and trainer.world_size > 1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._seen_step:
            return  # inside an accumulation window: no optimizer step was taken
        self._seen_step = trainer.global_step
        if not getattr(pl_module, "at_checkpoint_boundary", lambda: True)():
            return
        stop = self.stop_signal or 0
        if self._world(trainer):
            flag = torch.tensor([stop], device=pl_module.device, dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = int(flag.item())
        if stop:
            self._preempt(trainer, stop)

    def _preempt(self, trainer: L.Trainer, signum: int) -> None:
        step = trainer.global_step
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        if trainer.is_global_zero:
            log.warning("%s received: writing a checkpoint at step %d and stopping", name, step)
        path = None
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, GuardedCheckpoint):
                path = callback.save_now(trainer)
        if trainer.is_global_zero:
            if path is not None:
                log.warning("preempted at step %d; resume with recipe.resume_from=auto (checkpoint %s)", step, path)
            else:
                log.error("preempted at step %d; no checkpoint written (see above); an earlier one resumes", step)
        # stop through the loop (it logs this step's metrics first); raised at validation start or train end
        self.preempted = Preempted(signum, path, step)
        trainer.should_stop = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.preempted is not None:  # Lightning validates when a run stops early; not on preemption
            raise self.preempted

    # ------------------------------------------------------------------ non-finite steps
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self._ids_step:
            self._ids_step = trainer.global_step
            self._ids = []
        if isinstance(batch, Mapping) and isinstance(batch.get("ids"), list):
            self._ids.extend(str(i) for i in batch["ids"])

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=pl_module.device)
        loss_ok = self._loss_ok if self._loss_ok is not None else torch.ones((), dtype=torch.bool)
        self._loss_ok = None
        # with a fp16 grad scaler, overflowing gradients are normal: the scaler skips those steps itself
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        ok = loss_ok.to(norm.device) & (
            torch.ones((), dtype=torch.bool, device=norm.device) if scaled else torch.isfinite(norm)
        )
        if self._world(trainer):
            flag = ok.to(torch.int64).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = flag[0].bool()
        if bool(ok):  # the one host sync per optimizer step
            self.streak = 0
            return
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
        self.streak += 1
        step = trainer.global_step
        self.skipped_steps.append(step)
        ids = self._ids or list(getattr(pl_module, "current_utterance_ids", lambda: [])())
        what = "loss" if not bool(loss_ok) else "gradient norm"
        message = (
            f"non-finite {what} at optimizer step {step} (gradient norm {float(norm):.4g}); update skipped "
            f"({self.streak} in a row, limit trainer.max_nonfinite_skips={self.max_nonfinite_skips}); "
            f"utterances of the step: {ids}"
        )
        log.error(message)
        if self.streak > self.max_nonfinite_skips:
            raise NonFiniteError(
                f"training diverged: {self.streak} non-finite steps in a row, the last at optimizer step {step}; "
                f"utterances of that step: {ids}. No checkpoint was written since the first of them "
                "(lower the learning rate, check these utterances, or resume from the last checkpoint)"
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.preempted is not None:
            raise self.preempted  # before the final checkpoint (already written) and end-of-run evaluation
        if self.streak > 0:
            raise NonFiniteError(
                f"training ended inside a run of {self.streak} non-finite steps (steps {self.skipped_steps[-self.streak :]}); "
                "no final checkpoint or export is written"
            )

    # ------------------------------------------------------------------ run plan
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_plan"] = json.loads(json.dumps(self.plan))  # plain data only (weights_only loads)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("run_plan") or {}
        if "world_size" in saved and saved["world_size"] != trainer.world_size:
            message = (
                f"the checkpoint was written by {saved['world_size']} processes and this run has {trainer.world_size}: "
                "its data position counts the batches of each rank"
            )
            if not self.allow_changes:
                raise CheckpointError(message + " (set trainer.resume_allow_changes=true to resume anyway)")
            log.warning(message)


class GuardedCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never writes (or rotates out older files for) a suspect state, and always
    writes ``last.ckpt`` when training ends.

    Why: Lightning saves on its step interval only, so the last steps of a run were lost for export; and
    it would write and rotate even after a divergence, deleting the last finite checkpoints.
    """

    def __init__(self, fault: FaultTolerance, **kwargs: Any) -> None:
        super().__init__(enable_version_counter=False, **kwargs)
        self.fault = fault
        self._refused_step: int | None = None
        self._flush_logs = False

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self.fault.streak > 0:
            self._refused_step = trainer.global_step
            if trainer.is_global_zero:
                log.error(
                    "not writing %s at step %d: the last update was non-finite; earlier checkpoints are kept",
                    filepath,
                    trainer.global_step,
                )
            return
        assert_finite_weights(trainer.lightning_module.named_parameters(), f"checkpoint {filepath}")
        super()._save_checkpoint(trainer, filepath)
        self._flush_logs = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Flush the loggers once the checkpointed step's metrics reached them (Lightning logs a step's
        metrics after the checkpoint hooks), so a killed run leaves on disk every row a resume keeps."""
        if self._flush_logs:
            self._flush_logs = False
            for logger in trainer.loggers:
                logger.save()

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self._refused_step == trainer.global_step:
            return  # its replacement was not written
        super()._remove_checkpoint(trainer, filepath)

    def save_now(self, trainer: L.Trainer) -> Path | None:
        """Write ``last.ckpt`` at the current step (unless refused); its path, or None."""
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved:
            return Path(self.last_model_path or self._last_checkpoint_saved)
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        saved = self._last_global_step_saved == trainer.global_step and self._refused_step != trainer.global_step
        return Path(self.last_model_path) if saved else None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.save_now(trainer)
        if path is not None and trainer.is_global_zero:
            log.info("final checkpoint: %s (step %d)", path, trainer.global_step)


def find_fault_tolerance(trainer: L.Trainer) -> FaultTolerance | None:
    """The run's :class:`FaultTolerance` callback (None for a Trainer not built by :func:`build_trainer`)."""
    return next((c for c in trainer.callbacks if isinstance(c, FaultTolerance)), None)


def stop_requested(trainer: L.Trainer) -> bool:
    """True once a preemption signal arrived (long hooks such as evaluation skip their work)."""
    fault = find_fault_tolerance(trainer)
    return fault is not None and fault.stop_signal is not None


def fit(trainer: L.Trainer, module: L.LightningModule, **kwargs: Any) -> None:
    """``trainer.fit`` from the resume checkpoint chosen at build time, read weights-only."""
    fault = find_fault_tolerance(trainer)
    ckpt_path = fault.resume_path if fault is not None else None
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=True, **kwargs)


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

        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets instead of a second fp32 copy
        # (4 bytes per parameter less; the optimizer reads the same values)
        return DDPStrategy(
            find_unused_parameters=False, gradient_as_bucket_view=True, checkpoint_io=AtomicCheckpointIO()
        )
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
    extra_callbacks: Sequence[L.Callback] = (),
    automatic_optimization: bool = True,
    validation: bool = True,
    resume_from: str | None = None,
    plan: Mapping[str, Any] | None = None,
) -> L.Trainer:
    """The Lightning Trainer for a run: strategy, precision, guarded atomic checkpoints every N steps and
    at the end, fault handling (:class:`FaultTolerance`), logger.

    ``resume_from``: the checkpoint :func:`fit` resumes from (already resolved); ``plan``: what the data
    position of a checkpoint means (stored in every checkpoint, compared on resume).
    """
    t = cfg.trainer
    run_dir = Path(cfg.run_dir)
    fault = FaultTolerance(t.max_nonfinite_skips, plan, t.resume_allow_changes)
    fault.resume_path = resume_from
    checkpoint = GuardedCheckpoint(
        fault,
        dirpath=run_dir / CHECKPOINT_DIR,
        filename="step-{step:08d}",  # no "=": names can be passed in Hydra overrides unquoted
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_last=True,
        save_top_k=t.save_top_k,
        monitor="step",
        mode="max",
        save_on_train_epoch_end=True,
    )
    progress = progress_callbacks(t.enable_progress_bar, every_n_steps=0, every_seconds=30.0)
    configured = [instantiate(dict(spec)) for spec in t.callbacks.values()]  # trainer.callbacks.<name>._target_
    callbacks: list[L.Callback] = [fault, checkpoint, TorchRNGState(), *progress, *configured, *extra_callbacks]
    if t.ema_decay > 0:  # first: its update of a step is in place before that step's checkpoints and evaluations
        callbacks.insert(0, WeightEMA(t.ema_decay, t.ema_start_step))
    logger = build_logger(
        cfg.logger, run_dir, checkpoint_step(resume_from) if resume_from and not Path(resume_from).is_dir() else None
    )
    plugins: list[Any] = [AtomicCheckpointIO()] if t.strategy == "auto" else []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # our handler checkpoints and exits 143 on SIGTERM/SIGUSR1; requeueing is the job script's (recipes/slurm)
        plugins.append(SLURMEnvironment(auto_requeue=False))
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
        enable_model_summary=False,  # its table reports FLOPs 0; build_model logs parameter counts
    )


def prepare_run_dir(cfg: RunConfig, resume_from: str | None) -> str | None:
    """Start-of-run checks, before data or model are touched: the run and checkpoint directories are
    writable, stale temporaries of dead processes are removed, and the resume checkpoint is resolved
    (``auto`` / ``last`` / a path; a missing or damaged one fails here, not after the model is built)."""
    run_dir = Path(cfg.run_dir)
    check_writable(run_dir, run_dir / CHECKPOINT_DIR)
    remove_stale_temporaries(run_dir, run_dir / CHECKPOINT_DIR)
    return resolve_resume(resume_from, run_dir)


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
    """The configured optimizer (AdamW by default; ``recipe.optim.optimizer._target_``) over the trainable
    parameters + a per-step schedule (the built-in warm-up/decay, or ``recipe.optim.scheduler._target_``)."""
    spec = dict(cfg.optimizer)
    optimizer_class = get_class(spec.pop("_target_"))
    accepted = inspect.signature(optimizer_class).parameters
    kwargs: dict[str, Any] = {"lr": cfg.lr}
    if "betas" in accepted:
        kwargs["betas"] = tuple(cfg.betas)
    if "eps" in accepted:
        kwargs["eps"] = cfg.eps
    params = [p for p in module.parameters() if p.requires_grad]
    if "fused" in accepted and params and all(p.is_cuda and p.is_floating_point() for p in params):
        kwargs["fused"] = True  # one kernel for the whole update on CUDA
    optimizer = optimizer_class(parameter_groups(module, cfg.weight_decay), **{**kwargs, **spec})
    if cfg.scheduler:
        scheduler = instantiate(dict(cfg.scheduler), optimizer=optimizer)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total_steps, cfg))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def all_reduce_sums(module: L.LightningModule, sums: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Sum a dict of floats (or 0-d tensors, read here with one device sync) over ranks (one all-reduce);
    unchanged in a single process."""
    values = torch.stack(
        [torch.as_tensor(v).detach().to(device=module.device, dtype=torch.float64).reshape(()) for v in sums.values()]
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized() and module.trainer.world_size > 1:
        torch.distributed.all_reduce(values)
    return dict(zip(sums, values.tolist(), strict=True))


class SummedValidation:
    """Validation loss as a LightningModule mixin: ``forward_sums`` summed over the whole validation set (all
    ranks), logged as ``val/loss`` = sum of ``VAL_SUM`` / sum of ``VAL_COUNT``.

    Why a mixin: SFT (token CE / target tokens) and the aligner (slot CE / slots) validate the same way; the
    normalisation matches training's (a sum over units divided by the units), not a mean of batch means.
    """

    VAL_SUM = "ce_sum"
    VAL_COUNT = "n_tokens"

    def on_validation_epoch_start(self) -> None:
        self._val = {"sum": 0.0, "count": 0.0}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        sums = self.forward_sums(batch)  # type: ignore[attr-defined]
        self._val["sum"] += float(sums[self.VAL_SUM])
        self._val["count"] += float(sums[self.VAL_COUNT])

    def on_validation_epoch_end(self) -> None:
        t = all_reduce_sums(self, self._val)  # type: ignore[arg-type]
        if t["count"] > 0:
            self.log("val/loss", t["sum"] / t["count"], rank_zero_only=True)  # type: ignore[attr-defined]


def backbone_hidden(model: torch.nn.Module, batch: Mapping[str, Any]) -> Any:
    """The audio+text backbone (no head) on a collated batch: every stage's loss starts from these hidden
    states and computes its head only where it has labels.

    A packed batch (``data/packing.py``) gets per-clip positions and attention boundaries: with
    flash-attention, no mask and the segment boundaries as varlen arguments (``cu_seq_lens``, the padding-free
    kernel); otherwise the exact block-diagonal causal 4-D mask (bool for sdpa, additive for eager).
    """
    inputs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "input_features": batch["input_features"],
        "input_features_mask": batch["input_features_mask"],
        "use_cache": False,
    }
    if PACKED_KEY not in batch:
        return model.model(attention_mask=batch["attention_mask"], **inputs)
    attn = model.model.language_model.config._attn_implementation
    inputs["position_ids"] = batch["position_ids"]
    if attn is not None and attn.startswith("flash_attention"):
        cu = batch["cu_seq_lens"].to(device=batch["input_ids"].device, dtype=torch.int32)
        longest = int(batch["max_seq_len"])
        varlen = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        return model.model(attention_mask=None, **inputs, **varlen)
    mask = packed_causal_mask(batch["segment_ids"])  # (R, 1, P, P) bool
    if attn == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min
        )
    elif attn != "sdpa":
        raise ValueError(f"packed batches need attention sdpa, eager or flash_attention_2, not {attn!r}")
    return model.model(attention_mask=mask, **inputs)


def local_ranks(cfg: TrainerConfig) -> int:
    """Training processes per node for a trainer config, before the Trainer exists: ``trainer.devices`` when it
    is a count, else the CUDA devices (``auto`` on a GPU machine), else 1."""
    if isinstance(cfg.devices, int) or (isinstance(cfg.devices, str) and cfg.devices.isdigit()):
        return max(int(cfg.devices), 1)
    if isinstance(cfg.devices, list | tuple):
        return max(len(cfg.devices), 1)
    if cfg.accelerator != "cpu" and torch.cuda.is_available():
        return max(torch.cuda.device_count(), 1)
    return 1


PEAK_TFLOPS_BF16 = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
"""Dense bf16 tensor-core peak (TFLOP/s, datasheet, no sparsity) by a substring of the CUDA device name; the
first match wins (so "H100 PCIe" before "H100"). ``trainer.peak_tflops`` overrides it."""


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for MFU: the override when > 0, else the table entry of a CUDA device's
    name, else None (CPU, or an unknown card: MFU is then not logged)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return _peak_by_name(torch.cuda.get_device_name(device))


@functools.cache
def _peak_by_name(name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS_BF16:
        if key.lower() in name.lower():
            return tflops * 1e12
    log.warning("no peak FLOP/s known for %r: set trainer.peak_tflops to log train/mfu", name)  # once per name
    return None


class ModelFlops:
    """Model FLOPs of one training micro-batch (forward + backward), for MFU.

    ``6 · N_decoder · real decoder tokens`` (decoder layers and final norm; the embedding lookup is free)
    ``+ 6 · N_head · labelled positions`` (the head runs only where there are labels)
    ``+ 6 · N_encoder · audio tokens`` (encoder layers, the conv front-end's output projection, the projector)
    ``+ 3 · conv FLOPs per 1-s chunk · chunks`` (the three stride-2 convolutions run on every 100-frame chunk,
    padded or not; weights shared across positions, so counted from their output sizes, not their parameters).

    Attention score FLOPs (``12 · layers · width · context`` per token) are left out, as in the 6·N convention:
    ASR rows are short (a few hundred tokens), where they add a few percent. Padding is not model work, so it is
    not counted: padded batches show a lower MFU. Recomputation under gradient checkpointing is not counted
    either (the convention of MFU, as opposed to hardware FLOPs utilisation).
    """

    def __init__(self, decoder: int, head: int, encoder: int, conv_per_chunk: float) -> None:
        self.decoder = decoder
        self.head = head
        self.encoder = encoder
        self.conv_per_chunk = conv_per_chunk

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelFlops:
        """Parameter counts by part and the conv front-end's forward FLOPs per chunk, from the model itself."""
        lm = model.get_submodule("model.language_model")
        embed = lm.get_input_embeddings()
        decoder = sum(p.numel() for p in lm.parameters()) - sum(p.numel() for p in embed.parameters())
        head_module = model.get_submodule("lm_head" if hasattr(model, "lm_head") else "score")
        head = sum(p.numel() for p in head_module.parameters())
        tower = model.get_submodule("model.audio_tower")
        convs = [tower.conv2d1, tower.conv2d2, tower.conv2d3]
        encoder = sum(p.numel() for p in tower.parameters()) - sum(p.numel() for c in convs for p in c.parameters())
        encoder += sum(p.numel() for p in model.get_submodule("model.multi_modal_projector").parameters())
        conv = 0.0
        height, width = tower.config.num_mel_bins, 2 * tower.config.n_window  # one chunk: (mel bins, frames)
        for c in convs:
            height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1  # k=3, s=2, p=1
            conv += 2.0 * c.in_channels * c.kernel_size[0] * c.kernel_size[1] * c.out_channels * height * width
        return cls(decoder, head, encoder, conv)

    def __call__(self, real_tokens: float, labelled: float, audio_tokens: float, audio_chunks: float) -> float:
        """Forward + backward model FLOPs of a micro-batch with these counts."""
        return (
            6.0 * self.decoder * real_tokens
            + 6.0 * self.head * labelled
            + 6.0 * self.encoder * audio_tokens
            + 3.0 * self.conv_per_chunk * audio_chunks
        )

    def of_batch(self, batch: Mapping[str, Any]) -> float:
        """:meth:`__call__` with a collated batch's counts (plain ints from the collator: no device sync)."""
        return self(
            float(batch["num_real_tokens"]),
            float(batch["num_target_tokens"]),
            float(batch["num_audio_tokens"]),
            float(batch["num_audio_chunks"]),
        )


def throughput_metrics(
    t: Mapping[str, float], elapsed: float, trainer: L.Trainer, peak_tflops: float = 0.0
) -> dict[str, float]:
    """The metrics every stage logs per window from its :class:`StepNormaliser` totals (summed over ranks;
    ``real``/``seq``: real and all decoder positions, ``audio``: audio seconds, ``skipped``: unreadable clips,
    optional ``model_flops``: :class:`ModelFlops` of the window's micro-batches).

    ``elapsed`` is the wall time of one whole optimizer step (:meth:`StepNormaliser.totals`): rates are
    whole-step rates. ``train/mfu`` = model FLOP/s / (peak FLOP/s of one device × devices), logged when the
    peak is known (a CUDA device in :data:`PEAK_TFLOPS_BF16`, or ``trainer.peak_tflops``).
    """
    real_fraction = t["real"] / max(t["seq"], 1.0)
    metrics = {
        "train/tokens_per_s": t["real"] / elapsed,
        "train/audio_s_per_s": t["audio"] / elapsed,
        "train/real_token_fraction": real_fraction,
        "train/padding_fraction": 1.0 - real_fraction,
        "train/step_seconds": elapsed,
        "train/skipped_audio": t["skipped"],
        "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
    }
    if "model_flops" in t:
        flops_per_s = t["model_flops"] / elapsed
        metrics["train/model_tflops_per_s"] = flops_per_s / 1e12
        peak = peak_flops(trainer.strategy.root_device, peak_tflops)
        if peak:
            metrics["train/mfu"] = flops_per_s / (peak * max(trainer.world_size, 1))
    return metrics


class StepNormaliser:
    """Loss scale and statistics for one optimizer step made of a window of micro-batches.

    Why: a stage's loss is a *sum* over labelled units (target tokens, timestamp slots) divided by the
    number of units in the whole optimizer step, across micro-batches and ranks. Batches carry
    ``window_target_tokens`` (the window's unit count on this rank, from the window collator); the global
    count needs one all-reduce per window. Lightning divides each micro-batch loss by the accumulation
    count and DDP averages gradients over ranks, so :meth:`scale` returns ``k × world / N_global``.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.interval = IntervalMeans()
        self.clock = clock
        self._key: tuple[int, int] | None = None
        self._global = 1
        self.sums: dict[str, float | torch.Tensor] = {}
        self.started = 0.0
        self._last_end: float | None = None

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
            self.started = self.clock()
            self._global = int(all_reduce_sums(module, {"n": float(batch["window_target_tokens"])})["n"])
        return module.trainer.accumulate_grad_batches * module.trainer.world_size / max(self._global, 1)

    def add(self, **values: float | torch.Tensor) -> None:
        """Accumulate statistics of this micro-batch: plain numbers, or tensors kept on their device and read
        once per window in :meth:`totals` (no device-to-host sync per micro-batch)."""
        for key, value in values.items():
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value

    def window_done(self, batch: dict, trainer: L.Trainer) -> bool:
        """True at the last micro-batch of a window (or of the epoch)."""
        return (batch["position"][1] + 1) % max(batch["window_size"], 1) == 0 or bool(trainer.is_last_batch)

    def log(self, module: L.LightningModule, metrics: Mapping[str, float]) -> None:
        """Log a window's metrics as means over the logging interval (what ``metrics.csv`` then holds), not the
        values of the one step Lightning happens to write."""
        means = self.interval.add(metrics)
        module.log_dict(means, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        if logger_writes_after_this_batch(module.trainer):
            self.interval.reset()

    def totals(self, module: L.LightningModule) -> tuple[dict[str, float], float]:
        """Window statistics summed over ranks, and the wall seconds of one whole optimizer step.

        The seconds are measured between consecutive calls (each made at a window's last micro-batch), so they
        cover everything a step costs: forwards, backwards, the optimizer step and data loading (and any
        evaluation run in between). Timing from the window's first forward to its last one, as before, left
        out the last backward and the optimizer step and read 2-3x too fast. The first window has no previous
        call and is timed from its first micro-batch.
        """
        now = self.clock()
        elapsed = now - (self._last_end if self._last_end is not None else self.started)
        self._last_end = now
        return all_reduce_sums(module, self.sums), max(elapsed, 1e-9)
