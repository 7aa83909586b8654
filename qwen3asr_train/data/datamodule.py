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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from transformers import Qwen3ASRProcessor

from qwen3asr_train.config.schema import DataConfig
from qwen3asr_train.data.collate import WindowCollator, candidate_words
from qwen3asr_train.data.dataset import UtteranceDataset, WindowDataset
from qwen3asr_train.data.lazy import LazyDataset, LazyRows, LazyWindowSampler
from qwen3asr_train.data.manifest import ManifestError, RowChecks, SkipReport, Utterance, read_manifests
from qwen3asr_train.data.sampler import DurationWindowSampler
from qwen3asr_train.data.workers import resolve_num_workers, resolve_prefetch_factor
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
    if cfg.lazy:
        raise ValueError(
            "data.lazy=true streams the manifests; this stage reads every row at start (lazy data is SFT-only: "
            "recipe=sft, see docs/data.md 'Large corpora'); set data.lazy=false"
        )
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


@dataclass
class TrainData:
    """A stage's training data, eager or lazy (``data.lazy``), behind one interface.

    ``utterances`` is every row on the eager path; on the lazy path only the first ``data.bucket_estimate_rows``
    rows (they train the tiny tokenizer, seed the distractor pool and stand for the data in the run plan), and
    ``lazy`` streams the rest while training runs.
    """

    utterances: list[Utterance]
    hf: Any = None
    lazy: LazyRows | None = None

    def plan_sources(self) -> dict[str, list[Utterance]]:
        """``spine.run_plan``'s sources: all rows, or (lazy) the head rows."""
        return {"train": self.utterances}

    def plan_extra(self) -> dict[str, Any]:
        """Extra run-plan entries: the lazy stream's files (path, size, mtime) and the Lhotse version that
        orders its batches (a resume with another version could not replay the same batches)."""
        if self.lazy is None:
            return {}
        import lhotse

        return {"lazy_data": {**self.lazy.fingerprint(), "lhotse": lhotse.__version__}}

    def apply_token_limit(self, processor: Qwen3ASRProcessor, cfg: DataConfig, report: SkipReport | None) -> None:
        """``data.max_text_tokens``: over all rows now (eager), or on each row as the stream reaches it (lazy)."""
        self.utterances = drop_long_targets(self.utterances, processor, cfg, report if self.lazy is None else None)
        if self.lazy is not None:
            self.lazy.row_filter = token_limit_filter(processor, cfg.max_text_tokens)

    def dataset(self, cfg: DataConfig, rejects_path: Path | None = None) -> UtteranceDataset:
        """The training dataset; rows skipped later (decoding, lazy rows: on rank 0) are appended to ``rejects_path``."""
        if self.lazy is not None:
            dataset: UtteranceDataset = LazyDataset(self.lazy, cfg.on_bad_row)
        else:
            dataset = UtteranceDataset(self.utterances, cfg.on_bad_row, self.hf, cfg.hf_train.audio_column)
        dataset.rejects_path = rejects_path
        return dataset


def load_train_data(cfg: DataConfig, seed: int, report: SkipReport | None = None) -> TrainData:
    """The stage's training data: :func:`load_train_utterances` (eager), or a :class:`LazyRows` stream
    (``data.lazy``) of which only the first ``data.bucket_estimate_rows`` rows are read now."""
    if not cfg.lazy:
        items, hf = load_train_utterances(cfg, report)
        return TrainData(items, hf)
    if cfg.hf_train.path:
        raise ValueError(
            "data.lazy=true reads JSONL manifests and Lhotse cut manifests; data.hf_train needs lazy=false"
        )
    rows = LazyRows(cfg.train, row_checks(cfg), cfg.on_bad_row, cfg.max_utterances, cfg.shuffle, seed)
    head = rows.head(cfg.bucket_estimate_rows)
    if not head:
        raise ManifestError(f"{cfg.train}: no usable rows", "empty_manifest")
    log.info("data.lazy: streaming %s; read the first %d rows at start", [str(p) for p in cfg.train], len(head))
    return TrainData(head, None, rows)


def token_limit_filter(processor: Qwen3ASRProcessor, max_tokens: int) -> Callable[[Utterance], ManifestError | None]:
    """The ``data.max_text_tokens`` check for one row (the lazy stream applies it as rows are reached)."""

    def check(utt: Utterance) -> ManifestError | None:
        n = len(processor.tokenizer.encode(utt.text, add_special_tokens=False))
        if n > max_tokens:
            return ManifestError(
                f"{utt.source}: text has {n} tokens > data.max_text_tokens={max_tokens}", "text_too_long"
            )
        return None

    return check


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

    def __init__(self, loader: DataLoader, sampler: DurationWindowSampler | LazyWindowSampler) -> None:
        self.loader = loader
        self.sampler = sampler  # Lightning calls sampler.set_epoch at each epoch start
        self.batch_sampler = None  # Lightning inspects it; batching happens in ``sampler``

    def __iter__(self) -> Iterator[dict]:
        for window_batches in self.loader:
            yield from window_batches

    def __len__(self) -> int:
        """Micro-batches of this rank's epoch; a TypeError on the lazy path (Lightning then counts steps only)."""
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

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Lazy stream checkpoints: the resumed epoch continues from the saved position, even after its last batch.

        Why: Lightning prefetches one batch, so with a loader of unknown length it learns that a batch was the
        epoch's last before training on it and stores ``is_last_batch=True``. Resumed from a checkpoint taken
        right after that batch, Lightning (2.x) counts the epoch as finished *and* keeps the flag, so it also
        ends the next epoch before its first batch: a whole epoch is skipped (caught by
        ``tests/test_lazy_data.py``). Clearing the flag makes Lightning re-enter the saved epoch; the lazy
        sampler has nothing left of it past the saved position, so the epoch ends there, as in the
        uninterrupted run. Without the flag Lightning also takes a last *partial* window for an unfinished
        accumulation and would not count its optimizer step in the logging step (``_batches_that_stepped``),
        so that count gets the step Lightning would have added (checkpoint saved at a training batch's end:
        ``completed == processed - 1``). Loaders of known length (the eager path) are left alone.
        """
        fit = checkpoint.get("loops", {}).get("fit_loop", {})
        loaders = fit.get("state_dict", {}).get("combined_loader") or []
        progress = fit.get("epoch_loop.batch_progress")
        lazy = any(isinstance(s, dict) and s.get("stream") == "lazy" for s in loaders)
        if not lazy or progress is None or not progress.get("is_last_batch"):
            return
        progress["is_last_batch"] = False
        saved_on_batch_end = progress["total"]["completed"] == progress["total"]["processed"] - 1
        if saved_on_batch_end and progress["current"]["ready"] % trainer.accumulate_grad_batches:
            loop_state = fit.get("epoch_loop.state_dict", {})
            loop_state["_batches_that_stepped"] = loop_state.get("_batches_that_stepped", 0) + 1


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
        sampler: DurationWindowSampler | LazyWindowSampler
        if isinstance(dataset, LazyDataset):
            # every rank reads every row; one writes the rows it skips
            dataset.rows.rejects_path = dataset.rejects_path if rank == 0 else None
            sampler = LazyWindowSampler(
                dataset.rows,
                max_seconds=self.cfg.max_batch_seconds,
                max_batch_size=self.cfg.max_batch_size,
                window=window,
                num_buckets=self.cfg.num_buckets,
                shuffle=shuffle,
                seed=self.seed,
                rank=rank,
                world_size=world,
                buffer_size=self.cfg.bucket_buffer_size,
                estimate_rows=self.cfg.bucket_estimate_rows,
            )
        else:
            sampler = self._eager_sampler(dataset, window, shuffle, rank, world)
        workers = resolve_num_workers(self.cfg.num_workers, trainer.num_devices if trainer is not None else 1)
        loader = DataLoader(
            WindowDataset(dataset),
            sampler=sampler,
            batch_size=None,
            collate_fn=WindowCollator(collator),
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=resolve_prefetch_factor(self.cfg.prefetch_factor, workers),
        )
        return WindowedLoader(loader, sampler)

    def _eager_sampler(
        self, dataset: UtteranceDataset, window: int, shuffle: bool, rank: int, world: int
    ) -> DurationWindowSampler:
        return DurationWindowSampler(
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

    def micro_batches_per_epoch(self) -> int:
        """Training micro-batches in one epoch over all ranks (sizes the learning-rate schedule).

        Raises:
            TypeError: on the lazy path, where the epoch's length is unknown until it has been read (the
                stage then sizes the schedule from ``trainer.max_steps``).
        """
        if isinstance(self.train_set, LazyDataset):
            raise TypeError(
                "data.lazy=true: the epoch's length is unknown until it has been read (set trainer.max_steps)"
            )
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
