"""Original ("thinker") <-> transformers-native ("-hf") checkpoint layouts: configs and weight names.

Why: Qwen/Qwen3-ASR-{0.6B,1.7B} and Qwen3-ForcedAligner-0.6B ship in the original layout (nested
``thinker_config``, ``thinker.*`` weights) that qwen-asr, vLLM and the official SFT read; transformers 5.x
reads only the native layout and, given an original directory, silently returns a *random* model
(every weight missing, every ``thinker.*`` key unexpected). We convert explicitly and demand zero
missing and zero unexpected keys. Facts: docs/layouts.md.

Key renames (original -> native, applied in this order; the aligner's head is ``score``)::

    thinker.model.            -> model.language_model.
    thinker.lm_head.          -> lm_head.   (aligner: score.)
    thinker.                  -> model.
    model.audio_tower.proj1.  -> model.multi_modal_projector.linear_1.
    model.audio_tower.proj2.  -> model.multi_modal_projector.linear_2.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3ASREncoderConfig, Qwen3Config

from qwen3asr_train.languages import SUPPORTED_LANGUAGES


class CheckpointLayoutError(RuntimeError):
    """A checkpoint whose weights or config do not match the model they should build."""


_ORIGINAL_TO_NATIVE_ASR: tuple[tuple[str, str], ...] = (
    ("thinker.model.", "model.language_model."),
    ("thinker.lm_head.", "lm_head."),
    ("thinker.", "model."),
    ("model.audio_tower.proj1.", "model.multi_modal_projector.linear_1."),
    ("model.audio_tower.proj2.", "model.multi_modal_projector.linear_2."),
)
_ORIGINAL_TO_NATIVE_ALIGNER: tuple[tuple[str, str], ...] = tuple(
    (old, "score.") if old == "thinker.lm_head." else (old, new) for old, new in _ORIGINAL_TO_NATIVE_ASR
)
_NATIVE_TO_ORIGINAL: tuple[tuple[str, str], ...] = (
    ("model.multi_modal_projector.linear_1.", "thinker.audio_tower.proj1."),
    ("model.multi_modal_projector.linear_2.", "thinker.audio_tower.proj2."),
    ("model.language_model.", "thinker.model."),
    ("model.audio_tower.", "thinker.audio_tower."),
    ("lm_head.", "thinker.lm_head."),
    ("score.", "thinker.lm_head."),
)

MROPE_SECTION_FULL = (24, 20, 20)
"""The released checkpoints' interleaved M-RoPE split of head_dim/2 = 64 rotary pairs."""

_GENERIC_FIELDS = frozenset(
    {
        "transformers_version",
        "architectures",
        "dtype",
        "id2label",
        "label2id",
        "problem_type",
        "return_dict",
        "output_hidden_states",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
    }
)
"""PreTrainedConfig bookkeeping fields that are not part of a sub-model's architecture."""
_AUDIO_FIELDS = frozenset(f.name for f in dataclasses.fields(Qwen3ASREncoderConfig)) - _GENERIC_FIELDS
_TEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(Qwen3Config)) - _GENERIC_FIELDS - {"rope_parameters"}


def is_original_config(config: Mapping[str, Any]) -> bool:
    """True for the nested original layout (a ``thinker_config`` entry)."""
    return isinstance(config.get("thinker_config"), Mapping)


def is_aligner_config(config: Mapping[str, Any]) -> bool:
    """True for a forced-aligner config in either layout."""
    if is_original_config(config):
        thinker = config["thinker_config"]
        return "classify_num" in thinker or "forced_aligner" in str(thinker.get("model_type", ""))
    return "ForTokenClassification" in " ".join(config.get("architectures") or []) or "num_labels" in config


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for old, new in rules:
        if key.startswith(old):
            key = new + key[len(old) :]
    return key


def original_key_mapping(aligner: bool) -> dict[str, str]:
    """The renames as anchored regexes for ``from_pretrained(key_mapping=...)`` (mutually exclusive)."""
    return {
        r"^thinker\.model\.": "model.language_model.",
        r"^thinker\.lm_head\.": "score." if aligner else "lm_head.",
        r"^thinker\.audio_tower\.proj1\.": "model.multi_modal_projector.linear_1.",
        r"^thinker\.audio_tower\.proj2\.": "model.multi_modal_projector.linear_2.",
        r"^thinker\.audio_tower\.": "model.audio_tower.",
    }


def original_to_native_state_dict(state: Mapping[str, torch.Tensor], aligner: bool) -> dict[str, torch.Tensor]:
    """Rename original ``thinker.*`` weights to native names (see the module docstring)."""
    rules = _ORIGINAL_TO_NATIVE_ALIGNER if aligner else _ORIGINAL_TO_NATIVE_ASR
    return {_rename(k, rules): v for k, v in state.items()}


def native_to_original_state_dict(state: Mapping[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Rename native weights to the original layout, always writing ``thinker.lm_head.weight``.

    qwen-asr and vLLM expect the head to be present; a tied model gets a copy of the embeddings.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for old, repl in _NATIVE_TO_ORIGINAL:
            if key.startswith(old):
                new = repl + key[len(old) :]
                break
        else:
            raise CheckpointLayoutError(f"no original-layout name for weight {key!r}")
        out[new] = value
    if "thinker.lm_head.weight" not in out:
        if not tied:
            raise CheckpointLayoutError("untied model without an lm_head/score weight")
        out["thinker.lm_head.weight"] = out["thinker.model.embed_tokens.weight"].clone()
    return out


def _need(section: Mapping[str, Any], key: str, where: str, kind: type = dict) -> Any:
    """``section[key]``, which must exist and be of ``kind``; the error names the file and the key path."""
    if key not in section:
        raise CheckpointLayoutError(f"{where}: missing key {key!r}")
    value = section[key]
    if kind is dict and not isinstance(value, Mapping) or kind is int and not isinstance(value, int):
        raise CheckpointLayoutError(f"{where}: key {key!r} should be a {kind.__name__}, got {value!r}")
    return value


def original_to_native_config(config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Flatten an original config into keyword arguments for ``Qwen3ASRConfig`` (``source`` names the file
    in errors)."""
    if not is_original_config(config):
        raise CheckpointLayoutError(f"{source}: not an original-layout config (no thinker_config)")
    thinker = config["thinker_config"]
    audio_src = _need(thinker, "audio_config", f"{source}: thinker_config")
    text_src = _need(thinker, "text_config", f"{source}: thinker_config")
    for key in ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "output_dim", "n_window"):
        _need(audio_src, key, f"{source}: thinker_config.audio_config", int)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        _need(text_src, key, f"{source}: thinker_config.text_config", int)
    _need(thinker, "audio_token_id", f"{source}: thinker_config", int)
    audio = {k: v for k, v in audio_src.items() if k in _AUDIO_FIELDS}
    audio["model_type"] = "qwen3_asr_encoder"
    audio["max_position_embeddings"] = 13  # one 100-frame chunk -> 13 positions (original: 1500-row table)
    text = {k: v for k, v in text_src.items() if k in _TEXT_FIELDS}
    text["model_type"] = "qwen3"
    rope = dict(text_src.get("rope_scaling") or {})
    text["rope_parameters"] = {
        "rope_type": rope.get("rope_type", rope.get("type", "default")),
        "rope_theta": float(text_src.get("rope_theta", 1000000.0)),
    }
    aligner = is_aligner_config(config)
    out: dict[str, Any] = {
        "audio_config": audio,
        "text_config": text,
        "audio_token_id": thinker["audio_token_id"],
        "initializer_range": thinker.get("initializer_range", 0.02),
    }
    if aligner:
        out["num_labels"] = _need(thinker, "classify_num", f"{source}: thinker_config", int)
        out["classifier_dropout"] = 0.0
        out["tie_word_embeddings"] = False
        text["tie_word_embeddings"] = False
        out["architectures"] = ["Qwen3ASRForTokenClassification"]
        if "timestamp_token_id" in config:
            out["timestamp_token_id"] = config["timestamp_token_id"]
    else:
        out["tie_word_embeddings"] = bool(text_src.get("tie_word_embeddings", True))
        out["architectures"] = ["Qwen3ASRForConditionalGeneration"]
    for key in ("pad_token_id", "eos_token_id"):
        if key in config:
            out[key] = config[key]
    return out


def _mrope_section(head_dim: int) -> list[int]:
    """Scale the released 24/20/20 split to ``head_dim // 2`` rotary pairs (numerically irrelevant:
    the three position rows are identical for audio+text prompts, but upstream asserts the sum)."""
    pairs = head_dim // 2
    first = round(MROPE_SECTION_FULL[0] * pairs / 64)
    second = round(MROPE_SECTION_FULL[1] * pairs / 64)
    return [first, second, pairs - first - second]


def native_to_original_config(
    native: Mapping[str, Any],
    token_ids: Mapping[str, int],
    num_labels: int | None = None,
    timestamp_segment_time: int = 80,
) -> dict[str, Any]:
    """Build the nested original config (what qwen-asr 0.0.6 and vLLM read) from a native config dict.

    ``token_ids`` needs ``audio_start``, ``audio_end`` and ``user`` (``pad`` optional); ``num_labels`` is set for an
    aligner (the head's class count) and ``None`` for an ASR model. The aligner keeps
    ``model_type=qwen3_forced_aligner`` and ``classify_num`` in ``thinker_config`` and
    ``timestamp_token_id`` / ``timestamp_segment_time`` at the top level (upstream's own config classes
    lose the aligner type when they save; we write it explicitly).
    """
    aligner = num_labels is not None
    audio = {k: v for k, v in native["audio_config"].items() if k in _AUDIO_FIELDS - {"max_position_embeddings"}}
    audio.update({"model_type": "qwen3_asr_audio_encoder", "max_source_positions": 1500, "conv_chunksize": 500})
    text_native = dict(native["text_config"])
    rope = text_native.get("rope_parameters") or {"rope_type": "default", "rope_theta": 1000000.0}
    text = {k: v for k, v in text_native.items() if k in _TEXT_FIELDS}
    text.update(
        {
            "model_type": "qwen3_asr_text",
            "rope_theta": rope.get("rope_theta", 1000000.0),
            "rope_scaling": {
                "rope_type": rope.get("rope_type", "default"),
                "type": rope.get("rope_type", "default"),
                "mrope_section": _mrope_section(int(text["head_dim"])),
                "interleaved": True,
                "mrope_interleaved": True,
            },
        }
    )
    thinker: dict[str, Any] = {
        "model_type": "qwen3_forced_aligner" if aligner else "qwen3_asr_thinker",
        "audio_config": audio,
        "text_config": text,
        "audio_token_id": native["audio_token_id"],
        "audio_start_token_id": token_ids["audio_start"],
        "audio_end_token_id": token_ids["audio_end"],
        "user_token_id": token_ids["user"],
        "initializer_range": native.get("initializer_range", 0.02),
    }
    if "pad" in token_ids:
        # qwen-asr generates with the thinker's own generation config, built from thinker_config: without a pad
        # id, transformers 4.57 warns "Setting pad_token_id to eos_token_id" on every transcribe call.
        thinker["pad_token_id"] = token_ids["pad"]
    out: dict[str, Any] = {
        "architectures": ["Qwen3ASRForConditionalGeneration"],
        "model_type": "qwen3_asr",
        "thinker_config": thinker,
        "support_languages": list(SUPPORTED_LANGUAGES),
    }
    if aligner:
        thinker["classify_num"] = int(num_labels)
        text["tie_word_embeddings"] = False
        out["timestamp_token_id"] = native["timestamp_token_id"]
        out["timestamp_segment_time"] = timestamp_segment_time
    return out


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """Read ``config.json`` with a clear error naming the directory."""
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointLayoutError(f"{path}: no config.json (is this a model directory?)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointLayoutError(f"{path}: invalid JSON ({exc})") from None


def check_keys(expected: set[str], got: set[str], where: str, allowed_missing: set[str] | None = None) -> None:
    """Raise unless ``got`` covers ``expected`` exactly (``allowed_missing``: e.g. a tied head)."""
    missing = sorted(expected - got - (allowed_missing or set()))
    unexpected = sorted(got - expected)
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        raise CheckpointLayoutError(
            f"{where}: weights do not match the model — {len(missing)} missing [{show(missing)}], "
            f"{len(unexpected)} unexpected [{show(unexpected)}]. Refusing to train on weights that did not load."
        )
