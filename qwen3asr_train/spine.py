"""The run steps every training stage composes: start, plan, model, finish.

Why one place: SFT, GSPO and the aligner must prepare run directories, record what they ran, check a resume
against the plan it continues, save the starting model, and export at the end in exactly the same way.
Before this module the stages imported these steps from each other and the export-at-end existed in three
drifting copies. A stage file now reads top to bottom as: :func:`start_run` → read data → :func:`run_plan`
+ ``check_resume_plan`` → :func:`build_run_model` → build the data module / loader and the Trainer →
``fit`` → :func:`finish_run`. Stages never import each other (``tests/test_structure.py``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from omegaconf import OmegaConf

from qwen3asr_train.averaging import averaged_weights
from qwen3asr_train.config.schema import RunConfig
from qwen3asr_train.data.manifest import SkipReport, Utterance
from qwen3asr_train.eval.plots import write_run_plots
from qwen3asr_train.model.builder import AsrModel, build_model
from qwen3asr_train.model.export import save_model_init, save_native
from qwen3asr_train.training import CHECKPOINT_DIR, assert_finite_weights, data_fingerprint, prepare_run_dir

log = logging.getLogger(__name__)

MODEL_INIT_DIR = "model_init"
"""Run-directory folder with the starting model's config and processor (export rebuilds from it)."""
REJECTS_FILE = "rejects.jsonl"
"""Run-directory file listing every manifest row the skip policy dropped (file, line, reason)."""
RECORD_FILE = "run_record.json"
"""Run-directory file with the code version, package versions, host, world size and start/end times."""
EXPORT_DIR = "export"
"""Run-directory folder of the end-of-run export (native layout)."""

_MODEL_PLAN_IGNORES = {"dtype", "attn_implementation", "gradient_checkpointing"}
_RECORDED_PACKAGES = ("torch", "transformers", "lightning", "tokenizers", "hydra-core", "deepspeed", "peft")


# ------------------------------------------------------------------------------------------------- start
def start_run(cfg: RunConfig, resume_from: str | None) -> str | None:
    """Checks and records before any data or model is touched; returns the resolved resume checkpoint.

    The run and checkpoint directories must be writable, stale temporaries of dead processes go, the resume
    checkpoint (``auto``/``last``/path) is resolved, the global seed is set, and the resolved config and the
    run record are written.
    """
    resume = prepare_run_dir(cfg, resume_from)
    L.seed_everything(cfg.seed, workers=True)
    save_run_config(cfg, Path(cfg.run_dir))
    write_run_record(Path(cfg.run_dir), resumed_from=resume)
    return resume


def save_run_config(cfg: RunConfig, run_dir: Path) -> None:
    """The resolved config, as YAML (``run.yaml``) and JSON (read by export)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    node = OmegaConf.structured(cfg)
    OmegaConf.save(node, run_dir / "run.yaml", resolve=True)
    (run_dir / "run.json").write_text(json.dumps(OmegaConf.to_container(node, resolve=True), indent=2) + "\n")


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_record(resumed_from: str | None = None) -> dict[str, Any]:
    """What produced a run: commit (and whether the tree had changes), versions, host, argv, start time (the
    world size and end time are added by :func:`close_run_record`)."""
    commit = _git("rev-parse", "HEAD")
    return {
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "qwen3asr_train": _version("qwen3asr_train"),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _RECORDED_PACKAGES},
        "host": socket.gethostname(),
        "argv": list(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ended": None,
        "resumed_from": resumed_from,
    }


def write_run_record(run_dir: Path, resumed_from: str | None = None) -> Path:
    """``<run_dir>/run_record.json``; a resumed run appends its record to the list of earlier attempts."""
    path = run_dir / RECORD_FILE
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) != 0:
        return path
    records = json.loads(path.read_text()) if path.is_file() else []
    records.append(run_record(resumed_from))
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


def close_run_record(run_dir: Path, **outcome: Any) -> None:
    """Stamp the end time (and what the run wrote) into the newest record."""
    path = run_dir / RECORD_FILE
    if not path.is_file():
        return
    records = json.loads(path.read_text())
    records[-1].update(ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **outcome)
    path.write_text(json.dumps(records, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------- plan
def run_plan(cfg: RunConfig, sources: dict[str, list[Utterance]], **extra: Any) -> dict[str, Any]:
    """What a checkpoint's data position and weights mean: the data (fingerprints), batching, seed, model.

    Stored in every checkpoint and compared on resume (:func:`~qwen3asr_train.training.check_resume_plan`).
    """
    model = OmegaConf.to_container(OmegaConf.structured(cfg.model), resolve=True)
    d = cfg.data
    return {
        "stage": cfg.recipe.name,
        "seed": cfg.seed,
        "model": {k: v for k, v in model.items() if k not in _MODEL_PLAN_IGNORES},
        "data": {
            name: {
                "utterances": len(items),
                "fingerprint": data_fingerprint([u.duration for u in items], [u.id for u in items]),
            }
            for name, items in sources.items()
        },
        "batching": {
            "max_batch_seconds": d.max_batch_seconds,
            "max_batch_size": d.max_batch_size,
            "num_buckets": d.num_buckets,
            "shuffle": d.shuffle,
            "max_text_tokens": d.max_text_tokens,
            "accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
        },
        **extra,
    }


def write_rejects(report: SkipReport, run_dir: Path) -> Path:
    """``<run_dir>/rejects.jsonl``: every row dropped at start (rows dropped while decoding are appended)."""
    path = report.write(run_dir / REJECTS_FILE)
    if report.total:
        log.warning("%d manifest rows skipped (%s); every one is listed in %s", report.total, dict(report.counts), path)
    return path


def total_optimizer_steps(cfg: RunConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the run (for the schedule): max_steps, or epochs × steps per epoch."""
    if cfg.trainer.max_steps > 0:
        return cfg.trainer.max_steps
    per_epoch = -(-micro_batches_per_epoch // cfg.trainer.accumulate_grad_batches)
    return max(1, per_epoch * int(cfg.trainer.max_epochs or 1))


# ------------------------------------------------------------------------------------------------- model
def build_run_model(cfg: RunConfig, texts: Iterable[str]) -> tuple[AsrModel, Any]:
    """The stage's model and processor, with ``<run_dir>/model_init`` written (export rebuilds from it)."""
    model, processor = build_model(cfg.model, texts=texts, seed=cfg.seed)
    save_model_init(model, processor, Path(cfg.run_dir) / MODEL_INIT_DIR, from_scratch=cfg.model.source == "tiny")
    return model, processor


# ------------------------------------------------------------------------------------------------ finish
def export_run_config(run_dir: Path, step: int, checkpoint: str | None) -> dict[str, Any]:
    """The run config written into an export, with the step (and checkpoint) its weights come from."""
    config = json.loads((run_dir / "run.json").read_text())
    config["exported_from"] = {"global_step": int(step), "checkpoint": checkpoint}
    return config


def export_final(model: AsrModel, processor: Any, step: int, run_dir: Path) -> Path:
    """The native export of the weights training ended with (finite, and labelled with their step)."""
    assert_finite_weights(model.named_parameters(), f"the export in {run_dir / EXPORT_DIR}")
    last = run_dir / CHECKPOINT_DIR / "last.ckpt"
    config = export_run_config(run_dir, step, str(last) if last.exists() else None)
    out = save_native(model, processor, run_dir / EXPORT_DIR, run_config=config)
    log.info("exported the weights of step %d to %s", step, out)
    return out


def finish_run(
    cfg: RunConfig, trainer: L.Trainer, model: AsrModel, processor: Any, export_on_end: bool
) -> dict[str, Any]:
    """After ``fit`` returned normally: export on rank 0 (or say how to export sharded weights), wait for
    every rank, close the run record, and list what was written. Preemption and divergence never get here
    (they raise out of ``fit``), so an interrupted run never exports."""
    run_dir = Path(cfg.run_dir)
    written: dict[str, Any] = {"run_dir": str(run_dir), "checkpoints": str(run_dir / CHECKPOINT_DIR)}
    sharded = cfg.trainer.strategy not in {"auto", "ddp"}
    if trainer.is_global_zero and export_on_end:
        if sharded:
            log.info(
                "weights are sharded under %s: export with recipe=export recipe.checkpoint=%s",
                cfg.trainer.strategy,
                run_dir,
            )
        else:
            with averaged_weights(trainer, trainer.lightning_module):  # the weight average, when kept
                written["export"] = str(export_final(model, processor, trainer.global_step, run_dir))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if trainer.is_global_zero:
        try:  # pictures must never fail a finished run
            written.update({name: str(path) for name, path in write_run_plots(run_dir).items()})
        except Exception:  # noqa: BLE001 - logged with its traceback, the run's results are already written
            log.exception("could not draw the run's plots")
        close_run_record(
            run_dir, global_step=int(trainer.global_step), world_size=int(trainer.world_size), written=written
        )
        log.info("run directory: %s", run_dir)
        for key, value in written.items():
            log.info("  %s: %s", key, value)
    return written
