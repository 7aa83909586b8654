"""``recipe=export``: a training checkpoint -> a self-contained model directory.

Reads the run directory the checkpoint belongs to (``model_init/`` holds the starting config and
processor, ``run.json`` the resolved config), rebuilds the architecture, loads the checkpoint's
weights strictly, merges LoRA adapters into the base weights, and writes the native layout, the
original thinker layout, or both (``recipe.layout``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qwen3asr_train.checkpoints import find_checkpoint, rebuild_from_run
from qwen3asr_train.config.schema import ExportConfig, RunConfig
from qwen3asr_train.model.export import save_native, save_original
from qwen3asr_train.training import assert_finite_weights, checkpoint_step

log = logging.getLogger(__name__)


def run(cfg: RunConfig) -> dict[str, str]:
    """Export ``recipe.checkpoint`` (see the module docstring)."""
    recipe: ExportConfig = cfg.recipe
    ckpt, run_dir = find_checkpoint(recipe.checkpoint)
    step = checkpoint_step(ckpt) if ckpt.is_file() else None  # a damaged or unsafe file fails here, named
    model, processor, run_cfg = rebuild_from_run(ckpt, run_dir, averaged=recipe.ema)
    assert_finite_weights(model.named_parameters(), f"an export of {ckpt}")
    run_cfg = {**run_cfg, "exported_from": {"global_step": step, "checkpoint": str(ckpt)}}
    log.info("exporting %s (global step %s)", ckpt, step)
    out = Path(recipe.output_dir) if recipe.output_dir else run_dir / "exports" / f"step-{step or 0:08d}"
    if recipe.layout == "both":
        targets = {"native": out / "native", "original": out / "original"}
    else:
        targets = {recipe.layout: out}
    taken = [str(t) for t in targets.values() if t.exists() and any(t.iterdir())]
    if taken and not recipe.overwrite:
        raise FileExistsError(
            f"recipe.output_dir: {', '.join(taken)} already holds an export; choose another "
            f"recipe.output_dir or set recipe.overwrite=true"
        )
    dtype = torch.bfloat16 if recipe.dtype == "bfloat16" else torch.float32
    savers = {"native": save_native, "original": save_original}
    written = {k: str(savers[k](model, processor, t, dtype=dtype, run_config=run_cfg)) for k, t in targets.items()}
    for key, value in written.items():
        log.info("exported %s layout: %s", key, value)
    return written
