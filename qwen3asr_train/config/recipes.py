"""``recipe.*`` of each stage (sft, gspo, aligner, eval, export) and ``evaluation.*`` (the periodic hook)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from qwen3asr_train.config.base import _as_list, _require, _require_target


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
    optimizer: dict[str, Any] = field(default_factory=lambda: {"_target_": "torch.optim.AdamW"})
    """The optimizer class as ``_target_`` (import path) plus extra keyword arguments; it is called with the
    parameter groups, ``lr`` and, where it takes them, ``betas``/``eps`` (and ``fused=True`` on CUDA), e.g.
    ``recipe.optim.optimizer._target_=torch.optim.SGD +recipe.optim.optimizer.momentum=0.9``."""
    scheduler: dict[str, Any] = field(default_factory=dict)
    """Empty: the built-in warm-up + ``schedule`` decay. Otherwise ``_target_`` of a scheduler class or factory,
    called with the optimizer and the other keys, e.g. ``transformers.get_cosine_schedule_with_warmup``."""

    def validate(self) -> None:
        _require_target(self.optimizer, "recipe.optim.optimizer")
        if self.scheduler:
            _require_target(self.scheduler, "recipe.optim.scheduler")
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
    streaming_prob: float = 0.0
    """Probability that a row with word times is cut at a random chunk boundary, its target the words ending by then."""
    streaming_chunk_seconds: float = 2.0
    """Chunk length of the streaming cut: the audio ends at k × this many seconds, before the row's end."""


@dataclass
class SFTConfig(SFTAugmentation):
    """Supervised fine-tuning on ``language X<asr_text>text<|im_end|>`` targets."""

    name: str = "sft"
    """Recipe name (selects the stage)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    ctc_weight: float = 0.0
    """Auxiliary CTC loss weight on the projector output (helps models trained from scratch; 0 = off)."""
    ctc_skip_punctuation: bool = False
    """Drop tokens that are only punctuation from the CTC targets (the decoder's CE still trains them): the
    encoder then learns words, not where a comma or question mark goes, which the audio barely shows."""
    ctc_fold_case: bool = False
    """CTC targets from the lower-cased transcript with a leading space ("Dog door?" -> " dog door?"; the
    decoder's CE still trains the cased text): the audio of "Dog" and "dog" is the same, but the byte-level
    tokenizer writes them with different pieces, so the encoder would otherwise learn two spellings per word."""
    label_smoothing: float = 0.0
    """ε of the decoder's token cross-entropy in training (PyTorch's definition: ``(1 - ε)`` on the target,
    ``ε / V`` on every vocabulary entry). Validation and the logged ``val/loss`` stay plain cross-entropy;
    ``train/loss`` is the smoothed objective. A standard regulariser of attention decoders trained from
    scratch (over-confident decoders loop and generalise worse); 0 = off, as upstream's recipe."""
    resume_from: str | None = None
    """Checkpoint to resume: ``auto`` (the newest intact checkpoint of this run directory, or a fresh start),
    ``last`` (this run directory's last.ckpt, falling back to the newest intact one), or a ``.ckpt`` path."""
    export_on_end: bool = True
    """Write a transformers-native export of the final weights to ``<run_dir>/export``."""
    ce_chunk_tokens: int = 512
    """Targets per chunk of the LM-head cross-entropy, each chunk recomputed in backward, so no full
    [targets × vocab] fp32 logits tensor exists (0: all targets at once). Same loss and gradients."""

    def validate(self) -> None:
        for key in (
            "forced_language_prob",
            "context_prob",
            "manifest_context_prob",
            "no_speech_prob",
            "streaming_prob",
        ):
            value = getattr(self, key)
            _require(0.0 <= value <= 1.0, f"recipe.{key}", "is a probability: must be in [0, 1]")
        _require(self.streaming_chunk_seconds > 0, "recipe.streaming_chunk_seconds", "must be positive")
        _require(self.ctc_weight >= 0.0, "recipe.ctc_weight", "must be >= 0")
        _require(0.0 <= self.label_smoothing < 1.0, "recipe.label_smoothing", "must be in [0, 1)")
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
    """Where to write (default: ``<training run>/exports/step-<N>``, beside, never inside, the end-of-run ``export/``)."""
    overwrite: bool = False
    """Replace an existing export folder (refused otherwise, so an export never silently replaces another)."""
    layout: str = "native"
    """``native`` (transformers ``-hf`` layout), ``original`` (thinker layout read by qwen-asr and vLLM) or ``both``."""
    dtype: str = "float32"
    """Dtype of the saved weights (float32 or bfloat16)."""
    ema: bool = True
    """Export the weight average when the checkpoint holds one (``trainer.ema_decay`` > 0); false: the raw
    weights training would continue from."""

    def validate(self) -> None:
        _require(self.layout in {"native", "original", "both"}, "recipe.layout", "must be native|original|both")
        _require(self.dtype in {"float32", "bfloat16"}, "recipe.dtype", "must be float32|bfloat16")


ALIGN_DECODE_METHODS: tuple[str, ...] = ("argmax", "monotonic", "centroid")
"""Forced-aligner slot decoders (``decode.align_decode``; ``eval/alignment.py: decode_slots``)."""


def chain_vote_shares_valid(accept: float, spread: float, votes: int) -> bool:
    """Whether chained-window votes' accept shares ``accept +- spread`` stay in (0, 1] with ``spread >= 0``
    (one chain uses ``accept`` alone). One rule for the config check and ``ChainSettings.check``."""
    return votes == 1 or (spread >= 0 and 0 < accept - spread and accept + spread <= 1)


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
    align_decode: str = "argmax"
    """Forced aligners: slot decoding, ``argmax`` (upstream's: argmax per slot, then its monotonic repair),
    ``monotonic`` (the most probable non-decreasing times under the slots' softmax) or ``centroid`` (``argmax``,
    then each slot at the probability-weighted mean of its bin and the two beside it; docs/aligner.md)."""
    align_refine_seconds: float = 0.0
    """Forced aligners: > 0 aligns a clip longer than this twice, the second time in pieces of at most this
    length cut at pauses between the first pass's words (no reference times; docs/aligner.md). 0 = one pass."""
    align_chain_seconds: float = 0.0
    """Forced aligners: > 0 aligns a clip longer than this as a chain of windows of this length, each started
    where the previous one's words ended (no reference times, any clip length; needs an aligner trained with
    ``recipe.span_prob`` > 0; docs/aligner.md). 0 = one pass."""
    align_chain_fill: float = 0.5
    """Chained windows: words given to a window = the clip's mean words per second x window x this."""
    align_chain_accept: float = 0.375
    """Chained windows: a window's words are accepted while they end in this first share of it (with votes,
    the middle of the votes' shares)."""
    align_chain_overlap: int = 1
    """Chained windows: the last this many accepted words are given again to the next window, which starts
    ``align_chain_back_seconds`` before the first of them (0: that much before the last accepted word's end).
    Re-given words let the chain recover from a late anchor (docs/aligner.md)."""
    align_chain_back_seconds: float = 0.15
    """Chained windows: how far before its anchor (above) the next window starts."""
    align_chain_snap: bool = True
    """Chained windows: a window that would open inside a pause of the audio opens just before its end."""
    align_chain_votes: int = 6
    """Chained windows: that many whole chains, their accept shares spread over
    ``align_chain_accept +- align_chain_accept_spread``; each word takes the median of its earliest group of
    chains (``align_chain_vote_tolerance_seconds``; docs/aligner.md). Costs that many times the compute of one
    chain; 1 = one chain."""
    align_chain_accept_spread: float = 0.125
    """Chained windows: half-width of the votes' accept shares."""
    align_chain_vote_tolerance_seconds: float = 0.2
    """Chained windows: a word's earliest group is the chains that start it at most this long after the
    earliest of them."""

    def validate(self) -> None:
        _require(self.num_beams >= 1, "decode.num_beams", "must be >= 1")
        _require(
            self.align_decode in ALIGN_DECODE_METHODS,
            "decode.align_decode",
            f"must be {'|'.join(ALIGN_DECODE_METHODS)}",
        )
        _require(self.align_refine_seconds >= 0, "decode.align_refine_seconds", "must be >= 0")
        _require(self.align_chain_seconds >= 0, "decode.align_chain_seconds", "must be >= 0")
        _require(0 < self.align_chain_fill <= 1, "decode.align_chain_fill", "must be in (0, 1]")
        _require(0 < self.align_chain_accept <= 1, "decode.align_chain_accept", "must be in (0, 1]")
        _require(self.align_chain_overlap >= 0, "decode.align_chain_overlap", "must be >= 0")
        _require(self.align_chain_back_seconds >= 0, "decode.align_chain_back_seconds", "must be >= 0")
        _require(self.align_chain_votes >= 1, "decode.align_chain_votes", "must be >= 1")
        _require(
            self.align_chain_vote_tolerance_seconds >= 0, "decode.align_chain_vote_tolerance_seconds", "must be >= 0"
        )
        _require(
            chain_vote_shares_valid(self.align_chain_accept, self.align_chain_accept_spread, self.align_chain_votes),
            "decode.align_chain_accept_spread",
            "with votes > 1, align_chain_accept +- align_chain_accept_spread must stay in (0, 1]",
        )
        _require(
            self.align_refine_seconds == 0 or self.align_chain_seconds == 0,
            "decode.align_chain_seconds",
            "and decode.align_refine_seconds are two long-clip passes: set one of them",
        )
        _require(self.tokens_per_second > 0, "decode.tokens_per_second", "must be positive")


@dataclass
class BiasingConfig:
    """Context-biasing evaluation (``eval/biasing.py``): every utterance decoded once per hot-word list size."""

    enabled: bool = False
    """Run it (``evaluation.biasing.enabled=true`` in training, ``recipe.biasing.enabled=true`` in ``recipe=eval``)."""
    sizes: list[int] = field(default_factory=lambda: [0, 10, 100, 1000])
    """Hot-word list sizes (true words + distractors); 0 = no list, the recall baseline."""
    hotwords_per_utterance: int = 2
    """True hot words per utterance: the rarest candidate words of its reference."""
    pool_manifests: list[str] = field(default_factory=list)
    """Extra manifests whose transcripts join the distractor pool (the evaluation sets' own words always do)."""
    max_utterances: int = 0
    """Biasing-decode at most this many utterances per set (0: all); each is decoded once per size."""
    seed: int = 0
    """Seed of the word choices and list orders (same seed, same lists)."""

    def validate(self) -> None:
        _require(bool(self.sizes), "biasing.sizes", "name at least one list size, e.g. [0,10,100]")
        _require(all(int(n) >= 0 for n in self.sizes), "biasing.sizes", "sizes must be >= 0")
        _require(len(set(self.sizes)) == len(self.sizes), "biasing.sizes", "sizes must be distinct")
        _require(self.hotwords_per_utterance >= 1, "biasing.hotwords_per_utterance", "must be >= 1")
        _require(self.max_utterances >= 0, "biasing.max_utterances", "must be >= 0 (0 = all)")


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
    biasing: BiasingConfig = field(default_factory=BiasingConfig)
    """Context-biasing evaluation of the sets (off by default): recall / false alarms / U-WER per list size."""

    def validate(self) -> None:
        _require(self.every_n_steps >= 0, "evaluation.every_n_steps", "must be >= 0")
        _require(self.monitor_mode in {"min", "max"}, "evaluation.monitor_mode", "must be min|max")


@dataclass
class StreamingConfig:
    """Streaming evaluation as upstream's streaming decoder runs it (``eval/streaming.py``)."""

    enabled: bool = False
    """Also decode every set in streaming mode and write ``streaming_summary.{md,json}`` beside the offline one."""
    chunk_seconds: float = 2.0
    """Audio arrives in chunks of this many seconds; after each, all audio so far is decoded again."""
    unfixed_chunks: int = 2
    """For the first N chunks the previous output is not used as a prefix (the model starts afresh)."""
    unfixed_tokens: int = 5
    """After that, the previous output minus its last K tokens is the prefix the model continues from."""

    def validate(self) -> None:
        _require(self.chunk_seconds > 0, "recipe.streaming.chunk_seconds", "must be positive")
        _require(self.unfixed_chunks >= 0, "recipe.streaming.unfixed_chunks", "must be >= 0")
        _require(self.unfixed_tokens >= 0, "recipe.streaming.unfixed_tokens", "must be >= 0")


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
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    """Streaming evaluation (off by default): chunked re-decoding with a rolled-back prefix, scored like offline."""
    biasing: BiasingConfig = field(default_factory=BiasingConfig)
    """Context-biasing evaluation (off by default): recall / false alarms / U-WER per hot-word list size + chart."""
    on_unit_mismatch: str = "resplit"
    """Aligner checkpoints: a row whose words differ from the aligner's word units (``resplit`` / ``skip`` /
    ``strict``, as ``recipe.on_unit_mismatch`` of the aligner stage); counted per language in
    ``unit_policy.json``."""

    def validate(self) -> None:
        _require(bool(self.sets), "recipe.sets", "name at least one manifest, e.g. +recipe.sets.test=test.jsonl")
        _require(
            self.on_unit_mismatch in {"resplit", "skip", "strict", "error"},
            "recipe.on_unit_mismatch",
            "must be resplit|skip|strict (error = strict)",
        )


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
    shared_prefix: bool = True
    """Prefill each prompt once and sample its G continuations from the repeated cache (log-prob passes too);
    false: the plain path (prompt repeated G times before ``generate``), kept for comparison (docs/gspo.md)."""
    fast_decode: bool = True
    """Shared-prefix sampling steps use our lean decode step (static key/value buffers, precomputed rotary
    tables, the layers' own modules; ``rl/fast_decode.py``) instead of the transformers forward (false)."""


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
    rollout_engine: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "qwen3asr_train.rl.rollout.HFGenerateEngine"}
    )
    """The rollout engine as ``_target_`` (+ keyword arguments); built with ``processor=``. It implements
    ``rl.rollout.RolloutEngine`` (``generate``, ``sync_weights``): transformers ``generate`` by default."""
    resume_from: str | None = None
    """Checkpoint to resume: ``auto`` (newest intact checkpoint, or a fresh start), ``last`` or a ``.ckpt`` path."""
    reuse_prompt_state: bool = True
    """Behaviour log-probs reuse the rollout's prefilled prompts (audio embeddings + prompt cache) instead of
    recomputing them: the weights are the same (no update in between). Needs an engine that returns them."""
    sampler_logprobs: bool = False
    """Take the behaviour log-probs from the sampler (``logits / temperature`` at each sampling step, as vLLM
    reports them; GSPO paper §5.4) instead of a recomputing pass; they differ from the recomputed ones by
    float round-off (~1e-6), far inside the 3e-4 clip. Needs an engine that reports them (shared prefix)."""
    sampler_logprobs_in_process: bool = True
    """Take the behaviour log-probs from the sampler whenever the engine computed them with the training model
    itself (same weights, precision and eval mode, in this process: the HF engine's shared-prefix path), without
    ``recipe.sampler_logprobs``: they are the numbers a recomputing pass gives, up to float round-off (docs/gspo.md).
    Engines that differ (a vLLM engine) are recomputed unless ``recipe.sampler_logprobs=true``."""
    export_on_end: bool = True
    """Write a transformers-native export to ``<run_dir>/export`` at the end."""

    def validate(self) -> None:
        _require_target(self.rollout_engine, "recipe.rollout_engine")
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
    span_prob: float = 0.0
    """Partial-transcript augmentation (training only): this share of the clips keeps only a random contiguous
    run of its words, the audio from just before the run (``span_lead_seconds``) to the clip's end, so the
    aligner learns to place the words it is given and ignore untranscribed speech around them: what
    chained-window alignment of long recordings (``decode.align_chain_seconds``) feeds it. 0 = off."""
    span_lead_seconds: float = 0.3
    """Most audio kept before a span's first word (drawn uniformly from 0 to this)."""
    span_late_prob: float = 0.0
    """This share of the spans that start at a later word open inside that word (up to ``span_lead_seconds``
    after its start; its start label is then the window's start), as a chain window does after an anchor
    placed one word late (docs/aligner.md). 0 = off."""
    span_window_seconds: float = 0.0
    """> 0: a span's audio is also cut to at most this many seconds (the chain window,
    ``decode.align_chain_seconds``), keeping the words that end inside it; clips longer than this (long-form
    items of ``concat_max_seconds``) are always cut so, and are batched by the window's length. 0 = off."""
    label_sigma_bins: float = 0.0
    """Gaussian soft targets over neighbouring time bins, std in bins (0 = one-hot CE, the paper's loss)."""
    label_subbin: bool = False
    """With ``label_sigma_bins`` > 0: centre each slot's Gaussian on the boundary's exact time in bins (e.g. 41.3)
    instead of its rounded class (41), so the model can learn where inside a bin a boundary lies and the
    ``centroid`` slot decoding can read it back (docs/aligner.md). Off: centred on the class."""
    audio_clock_weight: float = 0.0
    """Auxiliary audio-token clock loss (training only, export unchanged): the head at every ``<|audio_pad|>``
    position predicts that token's own time class; added as weight x its mean CE per audio token, so the
    total is ``mean slot CE + w x mean clock CE`` per step. 0 = off (the loss is exactly the slot loss)."""
    audio_clock_fraction: float = 1.0
    """Share of the audio tokens the clock loss labels (a random subset per step; bounds its cost on long inputs)."""
    audio_clock_layer: int = -1
    """Decoder layer whose output the clock loss reads (through the decoder's final norm and the aligner head;
    negative counts from the last). -1 = the decoder's output, as the slots. An earlier layer puts each audio
    token's time into the residual stream *before* the later layers' attention reads it (docs/aligner.md)."""
    attn_sup_weight: float = 0.0
    """Auxiliary attention-supervision loss (training only, export unchanged): at every slot, one decoder head's
    attention (``attn_sup_layer``, ``attn_sup_head``) is trained by cross-entropy to put its mass on the audio
    tokens at the slot's boundary time (a Gaussian of ``attn_sup_sigma_ms`` over the tokens' centres). Added as
    weight x its mean CE per slot. 0 = off (the loss is exactly the slot loss)."""
    attn_sup_layer: int = -1
    """Decoder layer whose attention is supervised (negative counts from the last)."""
    attn_sup_head: int = 0
    """Head of that layer whose attention is supervised; -1 = the mean of the layer's heads' attention."""
    attn_sup_sigma_ms: float = 80.0
    """Width (std, ms) of the attention target over the audio-token centres around the boundary time."""
    slot_prior_tau: float = 0.0
    """Logit adjustment of the slot loss (training only): the slot CE is computed on ``logits + tau x log p(c)``
    with ``p`` the slot labels' class frequencies in one training epoch (add-one smoothed), so the raw logits
    used at inference are corrected for the steep slot-time prior. 0 = off (the loss is exactly the slot loss)."""
    slot_hard_weight: float = 0.0
    """Hard-slot emphasis (training only): each slot's CE is weighted by ``1 + w x`` the expected distance in bins
    between its predicted distribution and its label (capped at 10 bins), rescaled to mean 1 per micro-batch
    (``losses.hard_slot_weights``). 0 = off (the loss is exactly the slot loss)."""
    concat_max_seconds: float = 0.0
    """Long-form training: also train on consecutive utterances concatenated up to this many seconds (0 = off)."""
    concat_gap_seconds: float = 0.0
    """Silence inserted between concatenated utterances."""
    concat_fraction: float = 1.0
    """Share of the joined long-form items kept (evenly spread; 1 = all): at 1 an epoch holds about as much
    audio in long items as in short clips; less leaves more of each step to the short clips."""
    on_unit_mismatch: str = "resplit"
    """A row whose words differ from the aligner's word units of its text: ``resplit`` (re-cut exactly when the
    units merge whole words, else skip), ``skip``, or ``strict`` (= ``error``: raise naming file and line).
    Counted per language in ``unit_policy.json``."""
    resume_from: str | None = None
    """Checkpoint to resume: ``auto`` (newest intact checkpoint, or a fresh start), ``last`` or a ``.ckpt`` path."""
    export_on_end: bool = True
    """Write a transformers-native export to ``<run_dir>/export`` at the end."""

    def validate(self) -> None:
        _require(0.0 < self.slot_prob <= 1.0, "recipe.slot_prob", "must be in (0, 1]")
        _require(
            self.concat_max_seconds >= 0 and self.concat_gap_seconds >= 0, "recipe.concat_max_seconds", "must be >= 0"
        )
        _require(0.0 < self.concat_fraction <= 1.0, "recipe.concat_fraction", "must be in (0, 1]")
        _require(
            self.on_unit_mismatch in {"resplit", "skip", "strict", "error"},
            "recipe.on_unit_mismatch",
            "must be resplit|skip|strict (error = strict)",
        )
        _require(self.label_sigma_bins >= 0, "recipe.label_sigma_bins", "must be >= 0")
        _require(
            not self.label_subbin or self.label_sigma_bins > 0,
            "recipe.label_subbin",
            "needs recipe.label_sigma_bins > 0 (one-hot targets have no centre to move)",
        )
        _require(self.time_shift_seconds >= 0, "recipe.time_shift_seconds", "must be >= 0")
        _require(0.0 <= self.span_prob <= 1.0, "recipe.span_prob", "must be in [0, 1]")
        _require(self.span_lead_seconds >= 0, "recipe.span_lead_seconds", "must be >= 0")
        _require(0.0 <= self.span_late_prob <= 1.0, "recipe.span_late_prob", "must be in [0, 1]")
        _require(self.span_window_seconds >= 0, "recipe.span_window_seconds", "must be >= 0")
        _require(
            self.span_window_seconds == 0 or self.slot_prior_tau == 0,
            "recipe.span_window_seconds",
            "cannot be combined with recipe.slot_prior_tau (the slot prior is counted on uncut items)",
        )
        _require(self.ctc_weight >= 0, "recipe.ctc_weight", "must be >= 0")
        _require(self.audio_clock_weight >= 0, "recipe.audio_clock_weight", "must be >= 0")
        _require(0.0 < self.audio_clock_fraction <= 1.0, "recipe.audio_clock_fraction", "must be in (0, 1]")
        _require(
            self.audio_clock_layer == -1 or self.audio_clock_weight > 0,
            "recipe.audio_clock_layer",
            "is read by the clock loss only: set recipe.audio_clock_weight > 0 too",
        )
        _require(self.attn_sup_weight >= 0, "recipe.attn_sup_weight", "must be >= 0")
        _require(self.attn_sup_head >= -1, "recipe.attn_sup_head", "must be a head index or -1 (mean of heads)")
        _require(self.attn_sup_sigma_ms > 0, "recipe.attn_sup_sigma_ms", "must be > 0")
        _require(self.slot_prior_tau >= 0, "recipe.slot_prior_tau", "must be >= 0")
        _require(self.slot_hard_weight >= 0, "recipe.slot_hard_weight", "must be >= 0")


@dataclass
class TranscribeConfig:
    """``recipe=transcribe``: run an export or a run directory on audio files, folders or manifests."""

    name: str = "transcribe"
    """Recipe name (selects the stage)."""
    model_path: str = MISSING
    """An exported model directory (either layout), a ``.ckpt`` file or a training run directory."""
    inputs: list[str] = field(default_factory=list)
    """Audio files, folders of audio files, or manifests (``recipe.inputs=[a.wav,dir/]``)."""
    text: str | None = None
    """Forced aligner, plain audio inputs: the transcript to align (manifests carry their own ``text``)."""
    language: str | None = None
    """Forced aligner, plain audio inputs: the transcript's language (name or ISO code)."""
    output_dir: str | None = None
    """Where ``transcripts.jsonl`` / ``alignments.jsonl`` (+ ``textgrids/``) go (default: the run directory)."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding options."""

    def validate(self) -> None:
        self.inputs = _as_list(self.inputs, "recipe.inputs")
        _require(bool(self.inputs), "recipe.inputs", "name audio files, folders or manifests, e.g. recipe.inputs=a.wav")
