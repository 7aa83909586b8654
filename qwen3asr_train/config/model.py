"""``model.*``: which checkpoint to start from, its sizes when built in-process, what trains (LoRA, freezing)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen3asr_train.config.base import _require


# --------------------------------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    """Sizes of a model built in-process with random weights (tests, demo, from-scratch runs)."""

    audio_d_model: int = 16
    """Audio encoder width."""
    audio_layers: int = 1
    """Audio encoder transformer layers."""
    audio_heads: int = 2
    """Audio encoder attention heads."""
    audio_ffn: int = 32
    """Audio encoder feed-forward width."""
    downsample_hidden_size: int = 4
    """Channels of the three stride-2 convolutions."""
    text_hidden: int = 16
    """LLM hidden size (the projector's output_dim)."""
    text_layers: int = 2
    """LLM decoder layers."""
    text_heads: int = 2
    """LLM attention heads."""
    text_kv_heads: int = 1
    """LLM key/value heads (GQA)."""
    text_head_dim: int = 8
    """LLM attention head size."""
    text_ffn: int = 32
    """LLM MLP width."""
    vocab_size: int = 384
    """Byte-level BPE vocabulary trained locally (plus the special tokens)."""
    tokenizer_corpus: str = "train"
    """Texts the BPE is trained on: ``train`` (the training manifests) or ``builtin`` (a fixed sentence list)."""
    init: str = "he_conv"
    """``default`` (HF init) or ``he_conv``: He-normal conv init so audio is not drowned by positions (see docs)."""

    def validate(self) -> None:
        _require(self.tokenizer_corpus in {"train", "builtin"}, "model.tiny.tokenizer_corpus", "must be train|builtin")
        _require(self.init in {"default", "he_conv"}, "model.tiny.init", "must be default|he_conv")
        _require(
            self.text_heads % self.text_kv_heads == 0,
            "model.tiny.text_kv_heads",
            "must divide model.tiny.text_heads (grouped-query attention)",
        )
        _require(self.audio_d_model % self.audio_heads == 0, "model.tiny.audio_heads", "must divide audio_d_model")


@dataclass
class LoraConfig:
    """LoRA adapters through peft (merged into the weights at export)."""

    enabled: bool = False
    """Train LoRA adapters instead of the full LLM weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names (inside the LLM) that get adapters."""


@dataclass
class ModelConfig:
    """Which checkpoint to start from and which parts train."""

    source: str = "pretrained"
    """``pretrained`` (model.path: a native or original-layout directory, or a hub id) or ``tiny`` (built in-process)."""
    path: str | None = None
    """Local directory or hub id of the checkpoint (``source=pretrained``)."""
    task: str = "asr"
    """``asr`` (Qwen3ASRForConditionalGeneration) or ``aligner`` (Qwen3ASRForTokenClassification)."""
    dtype: str = "float32"
    """Dtype the weights are loaded in. Keep float32 for fp32 master weights under bf16-mixed."""
    attn_implementation: str = "auto"
    """``auto`` (flash_attention_2 when installed and on GPU, else sdpa), ``sdpa``, ``eager`` or ``flash_attention_2``."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory: every decoder and encoder layer (HF gradient
    checkpointing) and the whole audio encoder as one unit, so its convolution front-end (which HF does not
    checkpoint, ≈25 MB per audio-second at 0.6B widths) keeps no activations either. On in the GPU model
    configs (qwen3_asr_0.6b / 1.7b); see docs/gpu_training.md."""
    compile: bool = False
    """``torch.compile`` every decoder and encoder layer (in place: checkpoints and exports are unchanged).
    Off by default; an error names the cause when it cannot be applied."""
    compile_backend: str = "inductor"
    """``torch.compile`` backend (``inductor``; ``eager`` / ``aot_eager`` to debug tracing without codegen)."""
    freeze_audio_encoder: bool = False
    """Keep the audio encoder (conv stack + transformer) fixed."""
    freeze_projector: bool = False
    """Keep the audio→text projector fixed."""
    freeze_llm: bool = False
    """Keep the LLM (embeddings, decoder, head) fixed."""
    num_labels: int = 5000
    """Aligner: time-bin classes of a *fresh* head (tiny models, or an aligner initialised from an ASR
    checkpoint); a forced-aligner checkpoint keeps its own. 5000 × 80 ms = 400 s, as released."""
    classifier_dropout: float = 0.0
    """Aligner: dropout before the classification head (transformers defaults to 0.1 when unset)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA options (applied to the LLM)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Sizes for ``source=tiny``."""

    def validate(self) -> None:
        _require(self.source in {"pretrained", "tiny"}, "model.source", "must be pretrained|tiny")
        _require(
            self.source != "pretrained" or bool(self.path),
            "model.path",
            "is required when model.source=pretrained (a checkpoint directory or hub id); use model=tiny for "
            "a model built in-process",
        )
        _require(self.task in {"asr", "aligner"}, "model.task", "must be asr|aligner")
        _require(self.num_labels >= 2, "model.num_labels", "an aligner head needs at least 2 time bins")
        _require(0.0 <= self.classifier_dropout < 1.0, "model.classifier_dropout", "must be in [0, 1)")
        _require(self.dtype in {"float32", "bfloat16", "float16"}, "model.dtype", "must be float32|bfloat16|float16")
        _require(
            self.attn_implementation in {"auto", "sdpa", "eager", "flash_attention_2"},
            "model.attn_implementation",
            "must be auto|sdpa|eager|flash_attention_2",
        )
        _require(
            not (self.lora.enabled and self.freeze_llm),
            "model.lora.enabled",
            "LoRA trains adapters inside the LLM, so it cannot be combined with model.freeze_llm=true",
        )
        _require(
            not (self.freeze_audio_encoder and self.freeze_projector and self.freeze_llm and not self.lora.enabled),
            "model.freeze_*",
            "every part is frozen: nothing would train",
        )
