"""Training checkpoints back into models: find the checkpoint of a run, read it safely, rebuild the model.

Why its own module: export, evaluation and transcription all turn a ``.ckpt`` (or a run directory) into a
model the same way; before, the evaluation stage imported these from the export stage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification

from qwen3asr_train.averaging import EMA_KEY, overlay_average
from qwen3asr_train.config.schema import LoraConfig, ModelConfig
from qwen3asr_train.model.builder import AsrModel, apply_lora, build_model, merge_lora, zero_padded_audio_frames
from qwen3asr_train.model.convert import CheckpointLayoutError, check_keys, is_aligner_config, read_config_json
from qwen3asr_train.model.processor import load_processor
from qwen3asr_train.training import CHECKPOINT_DIR, CheckpointError, load_checkpoint_file, newest_checkpoint

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


def load_module_state(ckpt: Path, averaged: bool = True) -> dict[str, torch.Tensor]:
    """The LightningModule state dict of a checkpoint (a file, or a DeepSpeed checkpoint directory).

    ``averaged``: where the run kept a weight average (``trainer.ema_decay``), its tensors replace the raw
    ones (``qwen3asr_train.averaging``); False gives the raw weights training continues from.
    Files are read with ``weights_only=True``: a checkpoint that needs arbitrary objects is refused
    (:class:`~qwen3asr_train.training.CheckpointError` naming the file), never executed.
    """
    if ckpt.is_dir():
        from lightning.pytorch.utilities.deepspeed import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    payload = load_checkpoint_file(ckpt)
    if "state_dict" not in payload:
        raise CheckpointError(f"{ckpt}: no state_dict (not a Lightning training checkpoint)")
    if averaged:
        return overlay_average(payload["state_dict"], payload, str(ckpt))
    if EMA_KEY in payload:
        log.info("%s: using the raw weights (the checkpoint also holds a weight average)", ckpt)
    return payload["state_dict"]


def rebuild_from_run(ckpt: Path, run_dir: Path, averaged: bool = True) -> tuple[AsrModel, Any, dict[str, Any]]:
    """Rebuild the trained model (weights from ``ckpt``, averaged where the run kept an average and
    ``averaged`` is true) and its processor from the run directory."""
    init_dir = run_dir / "model_init"
    if not (init_dir / "config.json").exists():
        raise CheckpointLayoutError(f"{run_dir}: no model_init/config.json (was this written by qwen3asr_train?)")
    run_cfg = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    config = Qwen3ASRConfig.from_pretrained(init_dir)
    processor = load_processor(init_dir, read_config_json(init_dir))
    aligner = int(getattr(config, "num_labels", 0) or 0) > 2 and "TokenClassification" in str(config.architectures)
    cls = Qwen3ASRForTokenClassification if aligner else Qwen3ASRForConditionalGeneration
    model = cls(config)
    state = {
        k.removeprefix("model."): v for k, v in load_module_state(ckpt, averaged).items() if k.startswith("model.")
    }
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


def load_for_inference(path: str | Path, model_cfg: ModelConfig | None = None) -> tuple[AsrModel, Any]:
    """A model (eval mode) + processor from an exported directory (either layout), a ``.ckpt`` or a run
    directory (its newest intact checkpoint); ``model_cfg`` supplies dtype and attention."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        base = model_cfg or ModelConfig()
        cfg = ModelConfig(
            source="pretrained",
            path=str(path),
            task="aligner" if is_aligner_config(read_config_json(path)) else "asr",
            dtype=base.dtype,
            attn_implementation=base.attn_implementation,
        )
        model, processor = build_model(cfg)
    else:
        model, processor, _ = rebuild_from_run(*find_checkpoint(path))
    model.eval()
    return model, processor
