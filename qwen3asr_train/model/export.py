"""Write self-contained model directories: transformers-native and the original thinker layout.

Why both: ``Qwen3ASRForConditionalGeneration.from_pretrained`` reads the native layout; qwen-asr, vLLM
and the official SFT read only the original one (docs/layouts.md). Each
directory carries weights, config, generation config, tokenizer, feature-extractor and chat-template
files, so it loads with no project code. Writes go to a temporary sibling directory that is renamed
into place at the end, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict, Unpack

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import GenerationConfig, Qwen3ASRProcessor

from qwen3asr_train.data.prompts import ASR_CHAT_TEMPLATE, AUDIO_END, AUDIO_PAD, AUDIO_START, ENDOFTEXT, IM_END
from qwen3asr_train.model.builder import AsrModel
from qwen3asr_train.model.convert import native_to_original_config, native_to_original_state_dict

log = logging.getLogger(__name__)

LEGACY_FEATURE_EXTRACTOR = {
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "hop_length": 160,
    "chunk_length": 30,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "dither": 0.0,
    "return_attention_mask": True,
    "processor_class": "Qwen3ASRProcessor",
}
"""``preprocessor_config.json`` as qwen-asr 0.0.6 (transformers 4.57) reads it: the Whisper extractor
with 128 mel bins; qwen-asr calls it with ``padding=True, truncation=False``."""


class _AtomicDir:
    """Write into ``<dst>.tmp-<pid>`` and rename to ``dst`` on success (the old ``dst`` is replaced)."""

    def __init__(self, dst: Path) -> None:
        self.dst = dst
        self.tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.dst.exists():
            old = self.dst.with_name(f"{self.dst.name}.old-{os.getpid()}")
            self.dst.rename(old)
            self.tmp.rename(self.dst)
            shutil.rmtree(old)
        else:
            self.tmp.rename(self.dst)


def generation_config_for(processor: Qwen3ASRProcessor) -> GenerationConfig:
    """Greedy decoding that stops at ``<|im_end|>`` or ``<|endoftext|>`` (ids read from the tokenizer)."""
    tok = processor.tokenizer
    end_ids = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]
    return GenerationConfig(eos_token_id=end_ids, pad_token_id=end_ids[1], do_sample=False, max_new_tokens=512)


def _plain_model(model: AsrModel) -> AsrModel:
    """The model without live LoRA adapters: a merged copy when adapters are present (the export must load
    as a plain checkpoint), the model itself otherwise."""
    if not any("lora_" in name for name, _ in model.named_parameters()):
        return model
    import copy

    from qwen3asr_train.model.builder import merge_lora

    merged = copy.deepcopy(model)
    log.info("export: merged %d LoRA layers into a copy of the weights", merge_lora(merged))
    return merged


def native_state_dict(model: AsrModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights under their native names as the module holds them, tied head omitted (as transformers saves).

    Why not ``save_pretrained``: transformers 5.x remembers the ``key_mapping`` a model was loaded with and
    *reverses* it on save, so a model loaded from the original layout would be written with ``thinker.*``
    names under a native config, which plain transformers then loads as random weights without an error.
    """
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if bool(model.config.tie_word_embeddings) and hasattr(model, "lm_head"):
        state.pop("lm_head.weight", None)
    return state


class SaveOptions(TypedDict, total=False):
    """Options of :func:`save_native` and :func:`save_original`."""

    dtype: torch.dtype
    """Weights dtype on disk (default float32)."""
    run_config: Mapping[str, Any] | None
    """Written as ``qwen3asr_train_run.json`` (what produced the weights, and from which step)."""


def save_native(
    model: AsrModel, processor: Qwen3ASRProcessor, out_dir: str | Path, **options: Unpack[SaveOptions]
) -> Path:
    """Save the native layout (weights, config, generation config, processor) atomically."""
    out = Path(out_dir)
    model = _plain_model(model)
    dtype = options.get("dtype", torch.float32)
    with _AtomicDir(out) as tmp:
        save_file(native_state_dict(model, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)
        config.dtype = dtype
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        if hasattr(model, "generate"):
            generation_config_for(processor).save_pretrained(tmp)
        if processor.chat_template is None and hasattr(model, "generate"):
            processor.chat_template = ASR_CHAT_TEMPLATE
        processor.save_pretrained(tmp)
        _write_run_config(tmp, options.get("run_config"))
    log.info("wrote native checkpoint to %s", out)
    return out


def save_original(
    model: AsrModel, processor: Qwen3ASRProcessor, out_dir: str | Path, **options: Unpack[SaveOptions]
) -> Path:
    """Save the original thinker layout that qwen-asr 0.0.6 and vLLM load, atomically.

    The head is written explicitly (a copy of the embeddings when tied), the config is nested with the
    aligner type kept, and ``transformers_version`` is this library's (5.x): qwen-asr's tokenizer loader
    swaps in a Mistral pre-tokenizer regex for local directories whose config claims 4.57.3–4.x, which
    would change token ids between training and inference. The processor files are the ones the released
    repositories carry and transformers 4.57 reads (:func:`write_legacy_processor_files`).
    """
    out = Path(out_dir)
    model = _plain_model(model)
    dtype = options.get("dtype", torch.float32)
    tok = processor.tokenizer
    native_cfg = model.config.to_dict()
    token_ids = {
        "audio_start": tok.convert_tokens_to_ids(AUDIO_START),
        "audio_end": tok.convert_tokens_to_ids(AUDIO_END),
        "user": tok.encode("user", add_special_tokens=False)[0],
        "pad": tok.convert_tokens_to_ids(ENDOFTEXT),
    }
    aligner = not hasattr(model, "generate")
    config = native_to_original_config(
        native_cfg,
        token_ids,
        num_labels=int(model.config.num_labels) if aligner else None,
        timestamp_segment_time=int(getattr(processor, "timestamp_segment_time", 80)),
    )
    config["transformers_version"] = native_cfg.get("transformers_version")
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tied = bool(model.config.tie_word_embeddings) and hasattr(model, "lm_head")
    original = native_to_original_state_dict(native_state_dict(model, dtype), tied=tied)
    with _AtomicDir(out) as tmp:
        save_file(original, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if hasattr(model, "generate"):
            generation_config_for(processor).save_pretrained(tmp)
        write_legacy_processor_files(processor, tmp)
        _write_run_config(tmp, options.get("run_config"))
    log.info("wrote original-layout checkpoint to %s", out)
    return out


def _added_token_entry(token: AddedToken) -> dict[str, Any]:
    return {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
        "special": token.special,
    }


def write_legacy_processor_files(processor: Qwen3ASRProcessor, directory: Path) -> None:
    """The processor as transformers 4.57 (qwen-asr 0.0.6) reads it and the released repositories ship it.

    - ``tokenizer.json`` plus the slow-tokenizer files ``vocab.json``/``merges.txt``, ``added_tokens.json``
      and ``special_tokens_map.json``;
    - ``tokenizer_config.json`` with the audio tokens under ``extra_special_tokens`` (4.57 sets tokenizer
      attributes only from that key; transformers 5.x writes ``model_specific_special_tokens`` instead, and
      qwen-asr then fails with "Qwen2TokenizerFast has no attribute audio_token");
    - ``preprocessor_config.json`` describing the Whisper extractor qwen-asr builds, and
      ``chat_template.json``; no ``processor_config.json`` (5.x nests the feature extractor there, 4.57
      would read it as processor arguments).
    """
    tok = processor.tokenizer
    backend = json.loads(tok.backend_tokenizer.to_str())
    (directory / "tokenizer.json").write_text(tok.backend_tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    bpe = backend["model"]
    if bpe.get("type") != "BPE":
        raise ValueError(f"expected a byte-level BPE tokenizer, got model type {bpe.get('type')!r}")
    (directory / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False) + "\n", encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    decoder = {int(i): t for i, t in tok.added_tokens_decoder.items()}
    (directory / "added_tokens.json").write_text(
        json.dumps({t.content: i for i, t in sorted(decoder.items())}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    audio = {"audio_token": AUDIO_PAD, "audio_bos_token": AUDIO_START, "audio_eos_token": AUDIO_END}
    for key, token in audio.items():
        declared = getattr(tok, key, None)
        if declared not in (None, token):
            raise ValueError(f"tokenizer.{key}={declared!r}, expected {token!r}")

    def plain(token: str | None) -> dict[str, Any] | None:
        if token is None:
            return None
        return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    special_map: dict[str, Any] = {**audio, "eos_token": plain(tok.eos_token), "pad_token": plain(tok.pad_token)}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    config: dict[str, Any] = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added_token_entry(t) for i, t in sorted(decoder.items())},
        **audio,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": tok.eos_token,
        "errors": "replace",
        "extra_special_tokens": audio,
        "model_max_length": 131072,
        "pad_token": tok.pad_token,
        "processor_class": "Qwen3ASRProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (directory / "preprocessor_config.json").write_text(json.dumps(LEGACY_FEATURE_EXTRACTOR, indent=2) + "\n")
    template = processor.chat_template or ASR_CHAT_TEMPLATE
    (directory / "chat_template.json").write_text(
        json.dumps({"chat_template": template}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _write_run_config(directory: Path, run_config: Mapping[str, Any] | None) -> None:
    if run_config is not None:
        (directory / "qwen3asr_train_run.json").write_text(
            json.dumps(run_config, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
        )


def save_model_init(model: AsrModel, processor: Qwen3ASRProcessor, init_dir: Path, from_scratch: bool) -> None:
    """``<run_dir>/model_init``: what export rebuilds the architecture from (config + processor), plus the
    initial weights of a model built from scratch (random weights exist nowhere else; "before training"
    evaluations load them). LoRA adapters are merged first (at init they are zero, so the weights are the
    base weights) so the directory loads as a plain model.
    """
    if not from_scratch:
        model.config.save_pretrained(init_dir)
        processor.save_pretrained(init_dir)
        return
    if any("lora_" in name for name, _ in model.named_parameters()):
        import copy

        from qwen3asr_train.model.builder import merge_lora

        model = copy.deepcopy(model)
        merge_lora(model)
    save_native(model, processor, init_dir)
