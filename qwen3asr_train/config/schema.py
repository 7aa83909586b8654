"""Typed configuration schema: every field has a default and a one-line doc (the string under it).

Why dataclasses under Hydra: the YAML files in ``configs/`` only override values; the schema here is
the single place where a field exists, has a type and a default. Hydra composes the YAML on top of
these structured configs (each group's YAML lists ``base`` first in its defaults), so a mistyped
override fails at composition. Cross-field rules live in each section's ``validate()`` (run over the
whole tree by :func:`qwen3asr_train.config.load.to_typed`, not in ``__post_init__``: Hydra builds the
defaults before the overrides arrive) and raise :class:`ConfigError` naming the key and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration value or combination that cannot work; the message names the key."""


def _require(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {reason}")


def _as_list(value: Any, key: str) -> list[str]:
    """Accept ``data.train=a.jsonl`` as well as ``data.train=[a.jsonl,b.jsonl]``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{key}: expected a path or a list of paths, got {value!r}")


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
    """Recompute activations in backward (HF gradient checkpointing) to save memory."""
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


# ---------------------------------------------------------------------------------------------- data
@dataclass
class HFDatasetConfig:
    """A Hugging Face ``datasets`` source instead of (or next to) JSONL manifests."""

    path: str | None = None
    """``load_from_disk`` directory, or a dataset name for ``load_dataset`` (needs the hub unless cached)."""
    name: str | None = None
    """Dataset configuration name for ``load_dataset``."""
    split: str = "train"
    """Split to read."""
    audio_column: str = "audio"
    """Column holding the audio (an Audio feature, bytes or a path)."""
    text_column: str = "text"
    """Column holding the transcript."""
    language_column: str | None = "language"
    """Column holding the language name or code (None: use hf_dataset.language)."""
    language: str | None = None
    """Language for every row when there is no language column."""
    context_column: str | None = None
    """Optional column with biasing context for the system turn."""
    id_column: str | None = None
    """Optional utterance id column (default: the row index)."""


@dataclass
class DataConfig:
    """Manifests, language checks, batching by audio seconds."""

    train: Any = None
    """Training manifest(s): a JSONL(.gz) path or a list of them."""
    valid: Any = None
    """Validation manifest(s) for the validation loss (path or list)."""
    hf_train: HFDatasetConfig = field(default_factory=HFDatasetConfig)
    """Optional HF datasets training source (used when hf_train.path is set)."""
    extra_languages: list[str] = field(default_factory=list)
    """Language names added to the model's 30 (to teach a new language)."""
    allow_dialects: bool = True
    """Accept the 22 Chinese dialect names as labels (their target language is Chinese/Cantonese)."""
    max_batch_seconds: float = 120.0
    """Upper bound on the total audio seconds in one micro-batch (duration bucketing)."""
    max_batch_size: int = 64
    """Upper bound on the number of utterances in one micro-batch."""
    num_buckets: int = 8
    """Duration buckets: utterances of similar length are batched together to cut padding."""
    max_duration: float = 1200.0
    """Longest accepted utterance in seconds (Qwen3-ASR's limit is 1200 s)."""
    min_duration: float = 0.05
    """Shortest accepted utterance in seconds."""
    max_text_tokens: int = 4096
    """Longest accepted target in tokens."""
    on_bad_row: str = "error"
    """``error``: stop at the first bad manifest row (file:line in the message); ``skip``: drop it, count and log it."""
    num_workers: int = 2
    """DataLoader worker processes (0 = load in the main process)."""
    shuffle: bool = True
    """Reshuffle the batch order every epoch (from the run seed and the epoch number)."""
    trim_to_equal_batches: bool = True
    """In multi-process runs, drop the last few batches so every rank sees the same number of batches."""
    max_utterances: int = 0
    """Train on the first N rows that pass the checks (0 = all): debug runs and quick trials on a big corpus."""

    def validate(self) -> None:
        self.train = _as_list(self.train, "data.train")
        self.valid = _as_list(self.valid, "data.valid")
        _require(self.on_bad_row in {"error", "skip"}, "data.on_bad_row", "must be error|skip")
        _require(self.max_batch_seconds > 0, "data.max_batch_seconds", "must be positive")
        _require(self.max_batch_size > 0, "data.max_batch_size", "must be positive")
        _require(self.num_buckets >= 1, "data.num_buckets", "must be >= 1")
        _require(
            0 < self.max_duration <= 1200.0,
            "data.max_duration",
            "must be in (0, 1200]: Qwen3-ASR accepts at most 1200 s of audio",
        )
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")

    def sources(self) -> int:
        """Number of configured training sources."""
        return len(self.train) + (1 if self.hf_train.path else 0)


# ------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    """Lightning Trainer: hardware, strategy, precision, schedule length, checkpoints."""

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
    fsdp_sharding: str = "FULL_SHARD"
    """FSDP sharding strategy: FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD or NO_SHARD."""
    deepspeed_offload: bool = False
    """DeepSpeed: offload optimizer state (and ZeRO-3 parameters) to CPU memory."""

    def validate(self) -> None:
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
        _require(
            self.fsdp_sharding in {"FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"},
            "trainer.fsdp_sharding",
            "must be FULL_SHARD|SHARD_GRAD_OP|HYBRID_SHARD|NO_SHARD",
        )
        if self.strategy in {"fsdp", "deepspeed_zero2", "deepspeed_zero3"}:
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


# ------------------------------------------------------------------------------------------- recipes
@dataclass
class OptimConfig:
    """AdamW with linear warm-up then decay."""

    lr: float = 2e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up steps (overrides warmup_ratio when > 0)."""
    warmup_ratio: float = 0.02
    """Warm-up as a fraction of the run's optimizer steps."""
    schedule: str = "cosine"
    """Decay after warm-up: ``cosine``, ``linear`` or ``constant``."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of the peak learning rate."""

    def validate(self) -> None:
        _require(self.lr > 0, "recipe.optim.lr", "must be positive")
        _require(
            self.schedule in {"cosine", "linear", "constant"}, "recipe.optim.schedule", "must be cosine|linear|constant"
        )
        _require(0.0 <= self.warmup_ratio < 1.0, "recipe.optim.warmup_ratio", "must be in [0, 1)")
        _require(len(self.betas) == 2, "recipe.optim.betas", "needs two values")


@dataclass
class SFTAugmentation:
    """Per-row SFT augmentations (read by ``data/collate.py``'s ``SFTOptions``, which adds only the seed)."""

    forced_language_prob: float = 0.0
    """Probability that a row's ``language X<asr_text>`` moves into the prompt (not trained), as in forced-language inference."""
    context_prob: float = 0.0
    """Probability that a row without manifest context gets hot words (from its transcript + distractors) in the system turn."""
    manifest_context_prob: float = 1.0
    """Probability of using a row's own manifest ``context`` when it has one."""
    hotwords_max: int = 3
    """Most hot words taken from the transcript."""
    distractors_max: int = 5
    """Most distractor words taken from other transcripts."""
    no_speech_prob: float = 0.0
    """Probability that a row becomes a no-speech row (silence or noise of the same length; target ``language None<asr_text>``)."""


@dataclass
class SFTConfig(SFTAugmentation):
    """Supervised fine-tuning on ``language X<asr_text>text<|im_end|>`` targets."""

    name: str = "sft"
    """Recipe name (selects the stage)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    ctc_weight: float = 0.0
    """Auxiliary CTC loss weight on the projector output (helps models trained from scratch; 0 = off)."""
    resume_from: str | None = None
    """Checkpoint to resume: ``auto`` (the newest intact checkpoint of this run directory, or a fresh start),
    ``last`` (this run directory's last.ckpt, falling back to the newest intact one), or a ``.ckpt`` path."""
    export_on_end: bool = True
    """Write a transformers-native export of the final weights to ``<run_dir>/export``."""

    def validate(self) -> None:
        for key in ("forced_language_prob", "context_prob", "manifest_context_prob", "no_speech_prob"):
            value = getattr(self, key)
            _require(0.0 <= value <= 1.0, f"recipe.{key}", "is a probability: must be in [0, 1]")
        _require(self.ctc_weight >= 0.0, "recipe.ctc_weight", "must be >= 0")
        _require(
            self.hotwords_max >= 1 and self.distractors_max >= 0,
            "recipe.hotwords_max",
            "needs hotwords_max >= 1 and distractors_max >= 0",
        )


@dataclass
class ExportConfig:
    """Turn a training checkpoint into a self-contained model directory."""

    name: str = "export"
    """Recipe name (selects the stage)."""
    checkpoint: str = MISSING
    """A Lightning ``.ckpt`` file, or a run directory (its ``checkpoints/last.ckpt`` is used)."""
    output_dir: str | None = None
    """Where to write (default: ``<run_dir>/export``)."""
    layout: str = "native"
    """``native`` (transformers ``-hf`` layout), ``original`` (thinker layout read by qwen-asr and vLLM) or ``both``."""
    dtype: str = "float32"
    """Dtype of the saved weights (float32 or bfloat16)."""

    def validate(self) -> None:
        _require(self.layout in {"native", "original", "both"}, "recipe.layout", "must be native|original|both")
        _require(self.dtype in {"float32", "bfloat16"}, "recipe.dtype", "must be float32|bfloat16")


@dataclass
class DecodeConfig:
    """Decoding for evaluation (see ``eval/decode.py``)."""

    max_batch_seconds: float = 240.0
    """Padded audio seconds per decoding batch."""
    max_batch_size: int = 32
    """Utterances per decoding batch."""
    num_beams: int = 1
    """1 = greedy, > 1 = beam search."""
    tokens_per_second: float = 8.0
    """Generation budget per second of audio (bounds runaway loops)."""
    min_new_tokens: int = 16
    """Budget added to the duration bound."""
    max_new_tokens_cap: int = 4096
    """Hard upper bound on generated tokens."""
    forced_language: bool = False
    """Prefill ``language X<asr_text>`` with the reference language."""
    use_context: bool = True
    """Use the manifest's context in the system turn."""

    def validate(self) -> None:
        _require(self.num_beams >= 1, "decode.num_beams", "must be >= 1")
        _require(self.tokens_per_second > 0, "decode.tokens_per_second", "must be positive")


@dataclass
class EvalHookConfig:
    """Decode named validation sets during training and log WER/CER, LID accuracy, S/D/I (every stage)."""

    sets: dict[str, str] = field(default_factory=dict)
    """Set name -> manifest path, e.g. ``evaluation.sets.dev=dev.jsonl`` (empty: the hook is off)."""
    every_n_steps: int = 0
    """Decode every N optimizer steps (0: only at the end of training)."""
    at_end: bool = True
    """Also decode when training ends."""
    max_utterances: int = 0
    """Decode at most this many utterances per set (0: all)."""
    monitor: str | None = None
    """Metric key to track the best checkpoint by (e.g. ``val/dev/wer``); None: no best-checkpoint tracking."""
    monitor_mode: str = "min"
    """``min`` or ``max`` for ``monitor``."""
    samples_to_log: int = 3
    """Reference/hypothesis pairs logged per set (text logs; tables on wandb)."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding options."""

    def validate(self) -> None:
        _require(self.every_n_steps >= 0, "evaluation.every_n_steps", "must be >= 0")
        _require(self.monitor_mode in {"min", "max"}, "evaluation.monitor_mode", "must be min|max")


@dataclass
class EvalConfig:
    """``recipe=eval``: decode and score a checkpoint on one or more manifests."""

    name: str = "eval"
    """Recipe name (selects the stage)."""
    model_path: str = MISSING
    """An exported model directory (native or original layout), a ``.ckpt`` file or a training run directory."""
    sets: dict[str, str] = field(default_factory=dict)
    """Set name -> manifest path (``recipe.sets.test=test.jsonl``)."""
    output_dir: str | None = None
    """Where artifacts go (default: the run directory)."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding options."""

    def validate(self) -> None:
        _require(bool(self.sets), "recipe.sets", "name at least one manifest, e.g. recipe.sets.test=test.jsonl")


@dataclass
class MixSourceConfig:
    """One source of the GSPO data mix."""

    manifests: Any = None
    """Manifest path(s) of this source."""
    weight: float = 1.0
    """Sampling weight (normalised over sources): e.g. 35/35/30 for speech/multilingual/functional."""

    def validate(self) -> None:
        self.manifests = _as_list(self.manifests, "recipe.mix.<name>.manifests")
        _require(bool(self.manifests), "recipe.mix.<name>.manifests", "each mix source needs a manifest")
        _require(self.weight > 0, "recipe.mix.<name>.weight", "must be positive")


DEFAULT_REWARD_WEIGHTS: dict[str, float] = {
    "accuracy": 1.0,
    "language_id": 0.25,
    "no_speech": 1.0,
    "repetition": 1.0,
    "truncation": 1.0,
    "format": 0.5,
    "keyword_recall": 0.25,
}
"""GSPO reward weights (names in ``rl/rewards.py``'s registry); the only declaration, ``CompositeReward`` reads it."""


def _default_reward_weights() -> dict[str, float]:
    return dict(DEFAULT_REWARD_WEIGHTS)


@dataclass
class GSPOSampling:
    """How GSPO rollouts are sampled (read by ``rl/rollout.py``'s ``SamplingOptions``, which adds only the seed)."""

    group_size: int = 8
    """G: sampled transcripts per utterance."""
    temperature: float = 1.0
    """Sampling temperature (log-probs use logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    tokens_per_second: float = 8.0
    """``max_new_tokens`` per second of the longest clip in a rollout batch."""
    min_new_tokens: int = 16
    """Budget added to the duration bound."""
    forced_language_prob: float = 0.0
    """Probability that a rollout prompt forces the reference language."""
    context_prob: float = 0.0
    """Probability that a rollout prompt gets hot words from its transcript (rewarded by keyword_recall)."""


@dataclass
class GSPOConfig(GSPOSampling):
    """GSPO reinforcement learning with WER/CER rewards (equations and defaults: docs/stages.md)."""

    name: str = "gspo"
    """Recipe name (selects the stage)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_ratio=0.05, schedule="constant"))
    """Optimizer and schedule (lr 1e-6 constant after 5% warm-up, as in TRL/verl GSPO examples)."""
    rollout_batch_size: int = 8
    """Utterances per rollout batch on each rank (× G completions)."""
    steps_per_generation: int = 4
    """Minibatches (optimizer steps) each rollout batch is split into; > 1 makes updates off-policy (the paper: 4)."""
    num_iterations: int = 1
    """Passes over each rollout batch."""
    loss: str = "gspo"
    """``gspo`` (sequence ratio), ``gspo_token`` (GSPO-token) or ``grpo`` (token-level ratio, for ablation)."""
    eps_low: float = 3e-4
    """Lower clip range of the ratio (paper: 3e-4; GRPO typically 0.2)."""
    eps_high: float = 4e-4
    """Upper clip range (paper: 4e-4; GRPO typically 0.27)."""
    advantage_scale: str = "group"
    """``group`` ((r−mean)/std per group), ``batch`` (centred per group, std over the batch) or ``none``."""
    advantage_eps: float = 1e-4
    """Added to the std."""
    drop_zero_variance: bool = False
    """Skip groups whose rewards are all equal (their advantages are exactly 0 anyway)."""
    kl_beta: float = 0.0
    """KL-to-reference weight (k3 estimator); 0 = no reference model is loaded."""
    rewards: dict[str, float] = field(default_factory=_default_reward_weights)
    """Reward name (or dotted import path of a custom reward) -> weight."""
    mix: dict[str, Any] = field(default_factory=dict)
    """Named data sources ``{name: {manifests, weight}}`` (checked as :class:`MixSourceConfig`; empty: ``data.train``);
    e.g. ``+recipe.mix.speech.manifests=a.jsonl +recipe.mix.speech.weight=70``."""
    resume_from: str | None = None
    """Checkpoint to resume: ``auto`` (newest intact checkpoint, or a fresh start), ``last`` or a ``.ckpt`` path."""
    export_on_end: bool = True
    """Write a transformers-native export to ``<run_dir>/export`` at the end."""

    def validate(self) -> None:
        sources = {}
        for name, value in self.mix.items():
            if isinstance(value, MixSourceConfig):
                source = value
            else:
                unknown = set(value) - {"manifests", "weight"}
                _require(not unknown, f"recipe.mix.{name}", f"unknown keys {sorted(unknown)} (use manifests, weight)")
                source = MixSourceConfig(**value)
            source.validate()
            sources[name] = source
        self.mix = sources
        _require(self.group_size >= 2, "recipe.group_size", "needs >= 2 completions per utterance")
        _require(
            self.rollout_batch_size % self.steps_per_generation == 0,
            "recipe.steps_per_generation",
            "must divide recipe.rollout_batch_size because the members of a group stay in one minibatch",
        )
        _require(self.num_iterations >= 1, "recipe.num_iterations", "must be >= 1")
        _require(self.loss in {"gspo", "gspo_token", "grpo"}, "recipe.loss", "must be gspo|gspo_token|grpo")
        _require(
            self.advantage_scale in {"group", "batch", "none"}, "recipe.advantage_scale", "must be group|batch|none"
        )
        _require(0 < self.eps_low < 1 and self.eps_high > 0, "recipe.eps_low", "clip ranges must be in (0, 1)")
        _require(self.kl_beta >= 0, "recipe.kl_beta", "must be >= 0")
        _require(self.temperature > 0, "recipe.temperature", "must be positive")
        _require(bool(self.rewards), "recipe.rewards", "needs at least one reward")
        for key in ("forced_language_prob", "context_prob"):
            _require(0.0 <= getattr(self, key) <= 1.0, f"recipe.{key}", "is a probability")

    def steps_per_rollout(self) -> int:
        """Optimizer steps made from one rollout batch."""
        return self.steps_per_generation * self.num_iterations


@dataclass
class AlignerConfig:
    """Forced-aligner training: non-shifted cross-entropy over 80 ms time bins at ``<timestamp>`` slots."""

    name: str = "aligner"
    """Recipe name (selects the stage)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    slot_prob: float = 0.5
    """Dynamic slot insertion: each word gets its start/end slots with this probability (>= 1 word per sample)."""
    ctc_weight: float = 0.0
    """Auxiliary CTC of the word tokens on the projected audio states, through the input embeddings
    (training only, no extra weights; helps aligners trained from scratch). Normalised like the slot CE."""
    time_shift_seconds: float = 0.0
    """Augmentation: move each training clip by U(-s, s) seconds, fresh per epoch (silence prepended or
    leading audio trimmed, never into the first word; word times follow). 0 = off."""
    label_sigma_bins: float = 0.0
    """Gaussian soft targets over neighbouring time bins, std in bins (0 = one-hot CE, the paper's loss)."""
    concat_max_seconds: float = 0.0
    """Long-form training: also train on consecutive utterances concatenated up to this many seconds (0 = off)."""
    concat_gap_seconds: float = 0.0
    """Silence inserted between concatenated utterances."""
    on_unit_mismatch: str = "error"
    """A manifest whose words differ from the aligner's word units of its text: ``error`` or ``skip`` (counted)."""
    resume_from: str | None = None
    """Checkpoint to resume: ``auto`` (newest intact checkpoint, or a fresh start), ``last`` or a ``.ckpt`` path."""
    export_on_end: bool = True
    """Write a transformers-native export to ``<run_dir>/export`` at the end."""

    def validate(self) -> None:
        _require(0.0 < self.slot_prob <= 1.0, "recipe.slot_prob", "must be in (0, 1]")
        _require(
            self.concat_max_seconds >= 0 and self.concat_gap_seconds >= 0, "recipe.concat_max_seconds", "must be >= 0"
        )
        _require(self.on_unit_mismatch in {"error", "skip"}, "recipe.on_unit_mismatch", "must be error|skip")
        _require(self.label_sigma_bins >= 0, "recipe.label_sigma_bins", "must be >= 0")
        _require(self.time_shift_seconds >= 0, "recipe.time_shift_seconds", "must be >= 0")
        _require(self.ctc_weight >= 0, "recipe.ctc_weight", "must be >= 0")


RECIPE_SCHEMAS: dict[str, type] = {
    "sft": SFTConfig,
    "export": ExportConfig,
    "eval": EvalConfig,
    "gspo": GSPOConfig,
    "aligner": AlignerConfig,
}
"""Recipe name -> its schema."""

TRAINING_RECIPES: frozenset[str] = frozenset({"sft", "gspo", "aligner"})
"""Recipes that train (they need data and a run length)."""


@dataclass
class RunConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model to build."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources and batching."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Metric logger."""
    recipe: Any = None
    """Stage settings (schema chosen by ``recipe.name``)."""
    evaluation: EvalHookConfig = field(default_factory=EvalHookConfig)
    """Periodic decoding of validation sets during training."""
    seed: int = 1234
    """Seed for weights, shuffling and augmentation choices."""
    run_dir: str = "outputs/run"
    """Directory for checkpoints, logs, the resolved config and exports (set by Hydra to its run dir)."""

    def validate(self) -> None:
        _require(self.recipe is not None, "recipe", "choose a recipe, e.g. recipe=sft")
        if self.recipe.name in TRAINING_RECIPES:
            _require(
                self.trainer.max_steps > 0 or (self.trainer.max_epochs or 0) > 0,
                "trainer.max_steps",
                "set trainer.max_steps (> 0) or trainer.max_epochs (> 0): the run needs a length",
            )
            has_mix = bool(getattr(self.recipe, "mix", None))
            _require(
                self.data.sources() > 0 or has_mix,
                "data.train",
                "no training data: set data.train=<manifest.jsonl> (or data.hf_train.path)",
            )
        if self.recipe.name == "aligner":
            _require(
                self.model.task == "aligner",
                "model.task",
                "recipe=aligner trains Qwen3ASRForTokenClassification: set model.task=aligner",
            )
        if self.recipe.name in {"sft", "gspo"}:
            _require(self.model.task == "asr", "model.task", f"recipe={self.recipe.name} trains an ASR model")
        if self.recipe.name == "gspo":
            _require(
                self.trainer.accumulate_grad_batches == 1,
                "trainer.accumulate_grad_batches",
                "GSPO optimises manually: each minibatch of a rollout is one optimizer step",
            )
            _require(
                self.trainer.checkpoint_every_n_steps % self.recipe.steps_per_rollout() == 0,
                "trainer.checkpoint_every_n_steps",
                "must be a multiple of recipe.steps_per_generation × "
                "recipe.num_iterations so checkpoints fall between rollout batches",
            )
