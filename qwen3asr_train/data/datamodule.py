"""Lightning data wiring: manifests -> datasets -> window sampler -> loaders, resumable mid-epoch.

The training loader yields micro-batches (Lightning accumulates ``accumulate_grad_batches`` of them),
but is fed whole accumulation windows by :class:`~qwen3asr_train.data.sampler.DurationWindowSampler`
so each micro-batch knows its window's target-token count. :class:`DataPositionTracker` records which
micro-batch the *training step* consumed (Lightning prefetches one batch ahead, so counting batches
handed out would be off by one); Lightning saves that position through the loader's
``state_dict`` and restores it before iterating on resume.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from transformers import Qwen3ASRProcessor

from qwen3asr_train.config.schema import DataConfig
from qwen3asr_train.data.collate import WindowCollator, candidate_words
from qwen3asr_train.data.dataset import UtteranceDataset, WindowDataset
from qwen3asr_train.data.manifest import ManifestError, RowChecks, SkipReport, Utterance, read_manifests
from qwen3asr_train.data.sampler import DurationWindowSampler
from qwen3asr_train.languages import LanguageTable

log = logging.getLogger(__name__)


def row_checks(cfg: DataConfig) -> RowChecks:
    """Manifest checks from the data config (token limits are applied later, once a tokenizer exists)."""
    return RowChecks(
        languages=LanguageTable(cfg.extra_languages, cfg.allow_dialects),
        max_duration=cfg.max_duration,
        min_duration=cfg.min_duration,
    )


def load_train_utterances(cfg: DataConfig, report: SkipReport | None = None) -> tuple[list[Utterance], Any]:
    """All training utterances (manifests + optional HF dataset) and the HF dataset object (or None).

    ``report`` collects the rows the skip policy dropped (the stage writes them to ``rejects.jsonl``).
    """
    checks = row_checks(cfg)
    report = report if report is not None else SkipReport()
    local = SkipReport()
    items = read_manifests(cfg.train, checks, cfg.on_bad_row, local) if cfg.train else []
    hf = None
    if cfg.hf_train.path:
        from qwen3asr_train.data.dataset import load_hf_source

        hf_items, hf = load_hf_source(cfg.hf_train, checks, cfg.on_bad_row, local)
        items.extend(hf_items)
    report.extend(local, "train")
    if 0 < cfg.max_utterances < len(items):
        log.info(
            "data.max_utterances=%d: training on the first %d of %d rows",
            cfg.max_utterances,
            cfg.max_utterances,
            len(items),
        )
        items = items[: cfg.max_utterances]
    return items, hf


def drop_long_targets(
    items: Sequence[Utterance], processor: Qwen3ASRProcessor, cfg: DataConfig, report: SkipReport | None = None
) -> list[Utterance]:
    """Apply ``data.max_text_tokens`` with the row policy (needs the tokenizer, so it runs after model build)."""
    kept, local = [], SkipReport()
    for utt in items:
        n = len(processor.tokenizer.encode(utt.text, add_special_tokens=False))
        if n > cfg.max_text_tokens:
            message = f"{utt.source}: text has {n} tokens > data.max_text_tokens={cfg.max_text_tokens}"
            if cfg.on_bad_row == "error":
                raise ManifestError(message, "text_too_long")
            local.add("text_too_long", message, utt.source)
            continue
        kept.append(utt)
    local.log("token-length check")
    if report is not None:
        report.extend(local, "train")
    return kept


class WindowedLoader:
    """Flattens a DataLoader of windows into micro-batches; stateful for Lightning's mid-epoch resume."""

    def __init__(self, loader: DataLoader, sampler: DurationWindowSampler) -> None:
        self.loader = loader
        self.sampler = sampler  # Lightning calls sampler.set_epoch at each epoch start
        self.batch_sampler = None  # Lightning inspects it; batching happens in ``sampler``

    def __iter__(self) -> Iterator[dict]:
        for window_batches in self.loader:
            yield from window_batches

    def __len__(self) -> int:
        return self.sampler.num_micro_batches()

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class DataPositionTracker(L.Callback):
    """Marks each micro-batch as consumed when its training step starts (see the module docstring)."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, WindowedLoader):
            epoch, micro = batch["position"]
            loader.sampler.mark_consumed(epoch, micro)


def distractor_pool(train: Sequence[Utterance], seed: int, limit: int = 20000) -> list[str]:
    """Hot-word distractors for context biasing: candidate words of the training transcripts."""
    pool: list[str] = []
    for utt in train:
        pool.extend(candidate_words(utt.text, utt.language))
    random.Random(seed).shuffle(pool)
    return list(dict.fromkeys(pool))[:limit]


class ASRDataModule(L.LightningDataModule):
    """Windowed training loader and plain validation loader around any micro-batch collator.

    ``train_collator`` / ``valid_collator`` map ``(samples, epoch)`` to a micro-batch dict with
    ``num_target_tokens`` (the units the loss is normalised by); SFT and the aligner bring their own.
    """

    def __init__(
        self,
        cfg: DataConfig,
        train_set: UtteranceDataset,
        train_collator: Callable[..., dict],
        accumulate: int,
        seed: int,
        valid_set: UtteranceDataset | None = None,
        valid_collator: Callable[..., dict] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_set = train_set
        self.train_collator = train_collator
        self.valid_set = valid_set
        self.valid_collator = valid_collator or train_collator
        self.accumulate = accumulate
        self.seed = seed

    def _loader(
        self, dataset: UtteranceDataset, collator: Callable[..., dict], window: int, shuffle: bool
    ) -> WindowedLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = DurationWindowSampler(
            dataset.durations(),
            max_seconds=self.cfg.max_batch_seconds,
            max_batch_size=self.cfg.max_batch_size,
            window=window,
            num_buckets=self.cfg.num_buckets,
            shuffle=shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )
        loader = DataLoader(
            WindowDataset(dataset),
            sampler=sampler,
            batch_size=None,
            collate_fn=WindowCollator(collator),
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            prefetch_factor=2 if self.cfg.num_workers > 0 else None,
        )
        return WindowedLoader(loader, sampler)

    def micro_batches_per_epoch(self) -> int:
        """Training micro-batches in one epoch over all ranks (sizes the learning-rate schedule)."""
        sampler = DurationWindowSampler(
            self.train_set.durations(),
            self.cfg.max_batch_seconds,
            self.cfg.max_batch_size,
            num_buckets=self.cfg.num_buckets,
            seed=self.seed,
        )
        return len(sampler.micro_batches(0))

    def train_dataloader(self) -> WindowedLoader:
        return self._loader(self.train_set, self.train_collator, self.accumulate, self.cfg.shuffle)

    def val_dataloader(self) -> WindowedLoader | list:
        if self.valid_set is None:
            return []
        return self._loader(self.valid_set, self.valid_collator, 1, False)
