"""``recipe=export``: a training checkpoint -> a self-contained model directory.

Reads the run directory the checkpoint belongs to (``model_init/`` holds the starting config and
processor, ``run.json`` the resolved config), rebuilds the architecture, loads the checkpoint's
weights strictly, merges LoRA adapters into the base weights, and writes the native layout, the
original thinker layout, or both (``recipe.layout``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification

from qwen3asr_train.config.schema import ExportConfig, LoraConfig, RunConfig
from qwen3asr_train.model.builder import AsrModel, apply_lora, merge_lora, zero_padded_audio_frames
from qwen3asr_train.model.convert import CheckpointLayoutError, check_keys, read_config_json
from qwen3asr_train.model.export import save_native, save_original
from qwen3asr_train.model.processor import load_processor
from qwen3asr_train.training import (
    CHECKPOINT_DIR,
    CheckpointError,
    assert_finite_weights,
    checkpoint_step,
    load_checkpoint_file,
    newest_checkpoint,
)

log = logging.getLogger(__name__)


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``(checkpoint file or DeepSpeed dir, run directory)`` for a ``.ckpt`` path or a run directory.

    A run directory gives its newest intact checkpoint by global step (``last.ckpt`` normally, which
    training writes at its final step); a damaged ``last.ckpt`` is skipped with a warning naming it.
    """
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_DIR).is_dir():
        found = newest_checkpoint(path / CHECKPOINT_DIR)
        if found is None:
            raise CheckpointError(f"recipe.checkpoint={path}: no intact checkpoint in {path / CHECKPOINT_DIR}")
        last = path / CHECKPOINT_DIR / "last.ckpt"
        if found[0] != last:
            log.warning("%s: exporting %s (step %d) instead of last.ckpt", path, found[0].name, found[1])
        return found[0], path
    if path.exists():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        return path, run_dir
    raise FileNotFoundError(f"recipe.checkpoint={path}: neither a checkpoint nor a run directory with checkpoints/")


def load_module_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The LightningModule state dict of a checkpoint (a file, or a DeepSpeed checkpoint directory).

    Files are read with ``weights_only=True``: a checkpoint that needs arbitrary objects is refused
    (:class:`~qwen3asr_train.training.CheckpointError` naming the file), never executed.
    """
    if ckpt.is_dir():
        from lightning.pytorch.utilities.deepspeed import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    payload = load_checkpoint_file(ckpt)
    if "state_dict" not in payload:
        raise CheckpointError(f"{ckpt}: no state_dict (not a Lightning training checkpoint)")
    return payload["state_dict"]


def rebuild_from_run(ckpt: Path, run_dir: Path) -> tuple[AsrModel, Any, dict[str, Any]]:
    """Rebuild the trained model (weights from ``ckpt``) and its processor from the run directory."""
    init_dir = run_dir / "model_init"
    if not (init_dir / "config.json").exists():
        raise CheckpointLayoutError(f"{run_dir}: no model_init/config.json (was this written by qwen3asr_train?)")
    run_cfg = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    config = Qwen3ASRConfig.from_pretrained(init_dir)
    processor = load_processor(init_dir, read_config_json(init_dir))
    aligner = int(getattr(config, "num_labels", 0) or 0) > 2 and "TokenClassification" in str(config.architectures)
    cls = Qwen3ASRForTokenClassification if aligner else Qwen3ASRForConditionalGeneration
    model = cls(config)
    state = {k.removeprefix("model."): v for k, v in load_module_state(ckpt).items() if k.startswith("model.")}
    if any("lora_" in k for k in state):
        apply_lora(model, LoraConfig(**run_cfg.get("model", {}).get("lora", {})))
    expected = set(model.state_dict())
    tied = bool(config.tie_word_embeddings) and not aligner
    check_keys(expected, set(state), str(ckpt), {"lm_head.weight"} if tied else None)
    model.load_state_dict(state, strict=not tied)
    if tied:
        model.tie_weights()
    n = merge_lora(model)
    if n:
        log.info("merged %d LoRA layers into the base weights", n)
    zero_padded_audio_frames(model)  # evaluation from a checkpoint encodes batches as the training run did
    model.eval()
    return model, processor, run_cfg


def run(cfg: RunConfig) -> dict[str, str]:
    """Export ``recipe.checkpoint`` (see the module docstring)."""
    recipe: ExportConfig = cfg.recipe
    ckpt, run_dir = find_checkpoint(recipe.checkpoint)
    step = checkpoint_step(ckpt) if ckpt.is_file() else None  # a damaged or unsafe file fails here, named
    model, processor, run_cfg = rebuild_from_run(ckpt, run_dir)
    assert_finite_weights(model.named_parameters(), f"an export of {ckpt}")
    run_cfg = {**run_cfg, "exported_from": {"global_step": step, "checkpoint": str(ckpt)}}
    log.info("exporting %s (global step %s)", ckpt, step)
    out = Path(recipe.output_dir) if recipe.output_dir else run_dir / "export"
    dtype = torch.bfloat16 if recipe.dtype == "bfloat16" else torch.float32
    written = {}
    if recipe.layout in {"native", "both"}:
        written["native"] = str(
            save_native(model, processor, out / "native" if recipe.layout == "both" else out, dtype, run_cfg)
        )
    if recipe.layout in {"original", "both"}:
        written["original"] = str(
            save_original(model, processor, out / "original" if recipe.layout == "both" else out, dtype, run_cfg)
        )
    for key, value in written.items():
        log.info("exported %s layout: %s", key, value)
    return written
