"""One model builder for every stage: checkpoint (native or original layout) or tiny, plus options.

Why one function: SFT, GSPO (policy and reference) and the aligner must load weights the same way,
with the same guarantee that every weight loaded, and the same freezing/LoRA/precision options.
"""

from __future__ import annotations

import importlib.util
import logging
import types
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.utils.checkpoint
from transformers import (
    Qwen3ASRConfig,
    Qwen3ASRForConditionalGeneration,
    Qwen3ASRForTokenClassification,
    Qwen3ASRProcessor,
)

from qwen3asr_train.config.schema import LoraConfig, ModelConfig
from qwen3asr_train.data.prompts import ALIGNER_CHAT_TEMPLATE, ASR_CHAT_TEMPLATE
from qwen3asr_train.model.convert import (
    CheckpointLayoutError,
    is_aligner_config,
    is_original_config,
    original_key_mapping,
    original_to_native_config,
    read_config_json,
)
from qwen3asr_train.model.processor import load_processor, warn_on_regex_mismatch
from qwen3asr_train.model.tiny import build_tiny

log = logging.getLogger(__name__)

AsrModel = Qwen3ASRForConditionalGeneration | Qwen3ASRForTokenClassification

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint_dir(path_or_id: str) -> Path:
    """A local directory as is; otherwise a hub id downloaded (or found in the local HF cache)."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointLayoutError(f"{path_or_id}: is a file, expected a model directory or a hub id")
    if path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") != 1:
        raise CheckpointLayoutError(
            f"{path_or_id}: no such directory (relative to {Path.cwd()}); a hub id looks like Org/Name"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id))
    except Exception as exc:  # network errors, unknown repo, offline mode without cache
        raise CheckpointLayoutError(
            f"{path_or_id}: not a local directory, and fetching it from the hub failed ({type(exc).__name__}: {exc})"
        ) from exc


def select_attention(requested: str) -> str:
    """``auto`` -> flash_attention_2 when the package is installed and a GPU is present, else sdpa."""
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ImportError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package "
                "(pip install qwen3asr_train[flash] on a machine with a CUDA toolchain)"
            )
        return requested
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return "flash_attention_2"
    return "sdpa"


def _load_strict(directory: Path, raw: dict, aligner: bool, dtype: torch.dtype, attn: str) -> AsrModel:
    """The checkpoint as stored (ASR or aligner class by its own config), every weight accounted for."""
    cls = Qwen3ASRForTokenClassification if aligner else Qwen3ASRForConditionalGeneration
    if is_original_config(raw):
        config = Qwen3ASRConfig(**original_to_native_config(raw, str(directory / "config.json")))
        model, info = cls.from_pretrained(
            directory,
            config=config,
            key_mapping=original_key_mapping(aligner),
            dtype=dtype,
            attn_implementation=attn,
            output_loading_info=True,
        )
        _raise_on_load_problems(directory, info)
        log.info("loaded original-layout checkpoint %s (converted to the native layout)", directory)
    else:
        model, info = cls.from_pretrained(directory, dtype=dtype, attn_implementation=attn, output_loading_info=True)
        _raise_on_load_problems(directory, info)
        log.info("loaded native checkpoint %s", directory)
    return model


def aligner_from_asr(
    asr: Qwen3ASRForConditionalGeneration, num_labels: int, classifier_dropout: float
) -> Qwen3ASRForTokenClassification:
    """A forced aligner whose encoder, projector and LLM are the ASR model's, with a fresh time-bin head.

    Why: the released aligner was initialised from the ASR model family; users re-training the aligner
    for a new language start from their ASR checkpoint. The head is untied and randomly initialised.
    """
    config = Qwen3ASRConfig.from_dict(asr.config.to_dict())
    config.num_labels = num_labels
    config.classifier_dropout = classifier_dropout
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    config.architectures = ["Qwen3ASRForTokenClassification"]
    config._attn_implementation = asr.config._attn_implementation
    aligner = Qwen3ASRForTokenClassification(config).to(next(asr.parameters()).dtype)
    aligner.model.load_state_dict(asr.model.state_dict(), strict=True)  # raises on any mismatch
    log.info("initialised a %d-class aligner head on the ASR backbone", num_labels)
    return aligner


def load_checkpoint(
    directory: Path,
    task: str,
    dtype: torch.dtype,
    attn_implementation: str,
    num_labels: int = 5000,
    classifier_dropout: float = 0.0,
    texts: Iterable[str] = (),
) -> tuple[AsrModel, Qwen3ASRProcessor]:
    """Load a native or original-layout checkpoint strictly (no missing, no unexpected weights).

    ``task=aligner`` on an ASR checkpoint builds an aligner on its backbone (:func:`aligner_from_asr`);
    ``task=asr`` on an aligner checkpoint is refused. The processor is always the Qwen3-ASR one, whatever
    the directory's files say (:func:`qwen3asr_train.model.processor.load_processor`); ``texts`` (the
    training transcripts) size the tokenizer-regex warning.
    """
    raw = read_config_json(directory)
    stored_aligner = is_aligner_config(raw)
    if task == "asr" and stored_aligner:
        raise CheckpointLayoutError(f"{directory}: model.task=asr but the checkpoint is a forced aligner")
    if is_original_config(raw):  # key checks before anything heavy; errors name config.json and the key
        original_to_native_config(raw, str(directory / "config.json"))
    processor = load_processor(directory, raw)
    warn_on_regex_mismatch(directory, raw, processor.tokenizer, list(texts))
    model = _load_strict(directory, raw, stored_aligner, dtype, attn_implementation)
    if task == "aligner":
        if not stored_aligner:
            model = aligner_from_asr(model, num_labels, classifier_dropout)
        else:
            model.config.classifier_dropout = classifier_dropout
            model.dropout.p = classifier_dropout
        processor.chat_template = ALIGNER_CHAT_TEMPLATE
    elif processor.chat_template is None:
        processor.chat_template = ASR_CHAT_TEMPLATE
    return model, processor


def _raise_on_load_problems(directory: Path, info: dict[str, object]) -> None:
    """transformers reports but tolerates missing/unexpected weights; we refuse them."""
    problems = {
        k: sorted(v)[:8] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if problems:
        counts = {k: len(info[k]) for k in problems}
        raise CheckpointLayoutError(
            f"{directory}: weights do not match the model {counts}, e.g. {problems}. Refusing to train on weights "
            f"that did not load."
        )


def set_trainable(model: AsrModel, cfg: ModelConfig) -> None:
    """Freeze the parts the config asks for (the LLM includes embeddings and the head)."""
    parts = {
        "model.audio_tower.": cfg.freeze_audio_encoder,
        "model.multi_modal_projector.": cfg.freeze_projector,
        "model.language_model.": cfg.freeze_llm or cfg.lora.enabled,
        "lm_head.": cfg.freeze_llm or cfg.lora.enabled,
    }
    for name, param in model.named_parameters():
        for prefix, frozen in parts.items():
            if name.startswith(prefix):
                param.requires_grad_(not frozen)


def apply_lora(model: AsrModel, lora: LoraConfig) -> AsrModel:
    """Wrap the LLM's linear layers with peft LoRA adapters (only adapters train in the LLM)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    lm = model.get_submodule("model.language_model")
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    inject_adapter_in_model(peft_cfg, lm)
    n = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
    if n == 0:
        raise ValueError(f"model.lora.target_modules={lora.target_modules} matched no module in the LLM")
    log.info("LoRA: %s adapter parameters", f"{n:,}")
    return model


def merge_lora(model: torch.nn.Module) -> int:
    """Fold every peft LoRA layer into its base linear layer and put the base layer back; returns the count."""
    merged = 0
    for name, module in list(model.named_modules()):
        if hasattr(module, "merge") and hasattr(module, "get_base_layer"):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
            merged += 1
    return merged


def _zero_padding_frames(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the audio encoder: mel frames outside ``input_features_mask`` become 0."""
    features = kwargs.get("input_features", args[0] if args else None)
    mask = kwargs.get("input_features_mask", args[1] if len(args) > 1 else None)
    if features is None or mask is None:
        return args, kwargs
    zeroed = features * mask[:, None, :].to(features.dtype)
    if "input_features" in kwargs:
        kwargs = {**kwargs, "input_features": zeroed}
    else:
        args = (zeroed, *args[1:])
    return args, kwargs


def zero_padded_audio_frames(model: AsrModel) -> None:
    """Make the audio encoder see zeros, not log-mel of silence, in the padded frames of a batch.

    Why: upstream qwen-asr (and vLLM) encode each clip from its valid frames and pad the last 1-s chunk
    with zeros before the convolutions; transformers 5.x convolves the batch's padded mel as it is, and a
    clip shorter than its batch-mates gets the log-mel of digital silence there (the extractor pads the
    waveform), so the last audio tokens of a padded row depended on the batch (1.6e-2 in the logits of a
    tiny model). Zeroing the padded frames makes every row equal to upstream's per-clip encoding (7e-8).
    The weights are unchanged, so exports need nothing; see docs/layouts.md.
    """
    tower = model.get_submodule("model.audio_tower")
    if not getattr(tower, "_qwen3asr_train_zero_pad", False):
        tower.register_forward_pre_hook(_zero_padding_frames, with_kwargs=True)
        tower._qwen3asr_train_zero_pad = True


def _checkpointed_tower_forward(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
    """The audio encoder's own forward, run under non-reentrant activation checkpointing while training."""
    forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return forward(self, *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def checkpoint_audio_tower(model: AsrModel) -> None:
    """Checkpoint the whole audio encoder as one unit, its convolution front-end included.

    Why: HF gradient checkpointing covers the encoder's transformer layers, not the three 480-channel
    stride-2 convolutions before them, whose feature maps are ≈25 MB per audio-second at 0.6B widths — three
    quarters of the activations left once the layers are checkpointed. Wrapping the encoder's forward keeps
    only its input (the mel features, 51 KB per second) until backward, which recomputes the encoder once
    (its layers stay checkpointed inside, so the recompute holds one layer at a time plus the conv maps,
    transiently, when nothing else of the step is alive). The weights and the forward's result are unchanged
    (tests/test_memory_features.py); the padded-frame zeroing pre-hook still runs first.
    """
    tower = model.get_submodule("model.audio_tower")
    if not getattr(tower, "_qwen3asr_train_checkpointed", False):
        tower.forward = types.MethodType(_checkpointed_tower_forward, tower)
        tower._qwen3asr_train_checkpointed = True


def compile_layers(model: AsrModel, backend: str = "inductor") -> int:
    """``torch.compile`` each decoder and encoder layer in place (``Module.compile``: parameter names, state
    dicts and exports are unchanged); returns the number compiled.

    Why per layer: the layers are the repeated, shape-stable compute; the rest (the audio placeholder
    scatter, variable numbers of clips) would force recompiles or graph breaks. Dynamic shapes are on because
    every micro-batch has another length. Raises a RuntimeError naming the cause when torch cannot compile
    here (an unsupported Python or platform, a missing backend).
    """
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError(
            "model.compile=true: torch.compile is not supported with this Python/torch build "
            f"(torch {torch.__version__}); set model.compile=false"
        )
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise RuntimeError(
            f"model.compile_backend={backend!r} is not a torch.compile backend here "
            f"(available: {sorted(torch._dynamo.list_backends(exclude_tags=()))})"
        )
    names = {"Qwen3ASRAudioEncoderLayer", "Qwen3DecoderLayer"}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError("model.compile=true: no encoder or decoder layers found to compile")
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    log.info("torch.compile (%s): %d layers", backend, len(layers))
    return len(layers)


def build_model(cfg: ModelConfig, texts: Iterable[str] = (), seed: int = 0) -> tuple[AsrModel, Qwen3ASRProcessor]:
    """Build the model and processor described by ``cfg`` (``texts`` train the tiny BPE)."""
    attn = select_attention(cfg.attn_implementation)
    if cfg.source == "tiny":
        aligner = cfg.task == "aligner"
        model, processor = build_tiny(
            cfg.tiny,
            texts,
            seed=seed,
            num_labels=cfg.num_labels if aligner else 0,
            classifier_dropout=cfg.classifier_dropout,
        )
        model.config._attn_implementation = attn
        model.to(DTYPES[cfg.dtype])
    else:
        assert cfg.path is not None
        model, processor = load_checkpoint(
            resolve_checkpoint_dir(cfg.path),
            cfg.task,
            DTYPES[cfg.dtype],
            attn,
            cfg.num_labels,
            cfg.classifier_dropout,
            texts,
        )
        model.train()  # from_pretrained returns eval mode; stages train (dropout on) and evaluate in eval mode
    zero_padded_audio_frames(model)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        checkpoint_audio_tower(model)
    if cfg.compile:
        compile_layers(model, cfg.compile_backend)
    set_trainable(model, cfg)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %s of %s (attention: %s)", f"{trainable:,}", f"{total:,}", attn)
    return model, processor
