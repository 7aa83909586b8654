"""``data.*``: manifests and HF datasets, row checks, batching."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwen3asr_train.config.base import _as_list, _require


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
class AugmentConfig:
    """Training-audio augmentation (``data/transforms.py``); every transform is off by default.

    Draws depend only on (seed, epoch, dataset index), so a resumed run repeats them. Validation and
    evaluation batches are never augmented.
    """

    stages: list[str] = field(default_factory=lambda: ["sft", "aligner"])
    """Stages whose training batches are augmented (a stage not listed trains on clean audio)."""
    noise_prob: float = 0.0
    """Probability that a row gets additive noise from ``noise_manifests`` (MUSAN-style)."""
    noise_manifests: Any = None
    """Noise manifest(s): JSONL rows with ``audio`` (+ ``offset``/``duration``); e.g. ``qwen3asr-data segment --no-speech``."""
    snr_db: list[float] = field(default_factory=lambda: [5.0, 20.0])
    """Signal-to-noise range in dB; each noisy row draws its SNR uniformly from it."""
    speed_prob: float = 0.0
    """Probability that a row is speed-perturbed (tempo and pitch, as Kaldi's 3-way perturbation); word times follow."""
    speed_factors: list[float] = field(default_factory=lambda: [0.9, 1.1])
    """Speed factors drawn from uniformly (1.1 = 10% faster, shorter audio)."""
    volume_prob: float = 0.0
    """Probability that a row's volume is changed."""
    volume_db: list[float] = field(default_factory=lambda: [-6.0, 6.0])
    """Gain range in dB, drawn uniformly."""
    spec_augment_prob: float = 0.0
    """Probability that a row's log-mel features get SpecAugment masks (after feature extraction)."""
    freq_masks: int = 2
    """Frequency masks per augmented row."""
    freq_mask_width: int = 27
    """Largest frequency-mask width in mel bins (SpecAugment's F)."""
    time_masks: int = 2
    """Time masks per augmented row."""
    time_mask_width: int = 40
    """Largest time-mask width in frames of 10 ms (SpecAugment's T)."""
    time_mask_max_fraction: float = 0.2
    """A time mask covers at most this fraction of the row's valid frames (SpecAugment's p)."""

    def validate(self) -> None:
        self.noise_manifests = _as_list(self.noise_manifests, "data.augment.noise_manifests")
        self.stages = list(self.stages)
        known = {"sft", "aligner"}  # the stages whose collators apply it (GSPO rollouts use clean audio)
        _require(set(self.stages) <= known, "data.augment.stages", f"must be a subset of {sorted(known)}")
        for key in ("noise_prob", "speed_prob", "volume_prob", "spec_augment_prob"):
            _require(0.0 <= getattr(self, key) <= 1.0, f"data.augment.{key}", "must be in [0, 1]")
        for key in ("snr_db", "volume_db"):
            pair = list(getattr(self, key))
            _require(
                len(pair) == 2 and pair[0] <= pair[1], f"data.augment.{key}", "must be [low, high] with low <= high"
            )
        _require(
            bool(self.speed_factors) and all(f > 0 for f in self.speed_factors),
            "data.augment.speed_factors",
            "must be a non-empty list of positive factors",
        )
        _require(
            self.noise_prob == 0 or bool(self.noise_manifests),
            "data.augment.noise_manifests",
            "is required when data.augment.noise_prob > 0",
        )
        _require(
            min(self.freq_masks, self.freq_mask_width, self.time_masks, self.time_mask_width) >= 0,
            "data.augment",
            "mask counts and widths must be >= 0",
        )
        _require(0.0 < self.time_mask_max_fraction <= 1.0, "data.augment.time_mask_max_fraction", "must be in (0, 1]")

    def active(self, stage: str) -> bool:
        """Whether any transform runs in ``stage``."""
        probs = (self.noise_prob, self.speed_prob, self.volume_prob, self.spec_augment_prob)
        return stage in self.stages and any(p > 0 for p in probs)


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
    num_buckets: int = 32
    """Duration buckets: utterances of similar length are batched together to cut padding (32: ≈96% of decoder
    tokens real on a 1-30 s mix at 120 s per batch; 8 gave 87%; tests/test_packing.py measures it)."""
    max_duration: float = 1200.0
    """Longest accepted utterance in seconds (Qwen3-ASR's limit is 1200 s)."""
    min_duration: float = 0.05
    """Shortest accepted utterance in seconds."""
    max_text_tokens: int = 4096
    """Longest accepted target in tokens."""
    on_bad_row: str = "error"
    """``error``: stop at the first bad manifest row (file:line in the message); ``skip``: drop it, count and log it."""
    num_workers: Any = "auto"
    """DataLoader worker processes per rank: an integer (0 = load in the main process) or ``auto`` =
    min(8, cores per local rank - 1) (``data/workers.py``; docs/gpu_training.md)."""
    prefetch_factor: Any = "auto"
    """Windows each worker prepares ahead: an integer >= 1, or ``auto`` = max(2, ceil(8 / workers))."""
    shuffle: bool = True
    """Reshuffle the batch order every epoch (from the run seed and the epoch number)."""
    trim_to_equal_batches: bool = True
    """In multi-process runs, drop the last few batches so every rank sees the same number of batches."""
    max_utterances: int = 0
    """Train on the first N rows that pass the checks (0 = all): debug runs and quick trials on a big corpus."""
    lazy: bool = False
    """Read training manifests (ours or Lhotse cut manifests) row by row as training needs them, with Lhotse's
    dynamic duration bucketing over a bounded buffer: start time and memory do not grow with the corpus
    (``docs/data.md``, "Large corpora"). Needs ``trainer.max_steps``; SFT only."""
    bucket_buffer_size: int = 20000
    """Lazy path: rows held in the bucketing buffer (memory, and how far the order is shuffled)."""
    bucket_estimate_rows: int = 10000
    """Lazy path: the first N rows estimate the duration bucket edges (and feed the tokenizer and plan)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training-audio augmentation: noise, speed, volume, SpecAugment (all off by default)."""
    packing: bool = False
    """Pack several utterances per row (per-utterance positions and attention boundaries, no padding tokens;
    exact: same loss and gradients as the padded batch). See docs/gpu_training.md."""
    packing_max_tokens: int = 0
    """Token budget of one packed row (0: the whole micro-batch in one row, 100% real tokens)."""

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
        _require(
            self.num_workers == "auto" or (isinstance(self.num_workers, int) and self.num_workers >= 0),
            "data.num_workers",
            "must be an integer >= 0 or auto",
        )
        _require(
            self.prefetch_factor == "auto" or (isinstance(self.prefetch_factor, int) and self.prefetch_factor >= 1),
            "data.prefetch_factor",
            "must be an integer >= 1 or auto",
        )

    def sources(self) -> int:
        """Number of configured training sources."""
        return len(self.train) + (1 if self.hf_train.path else 0)
