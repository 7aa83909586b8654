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
