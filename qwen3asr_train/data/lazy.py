"""The lazy training path (``data.lazy=true``): manifests read row by row, bucketed by Lhotse over a bounded buffer.

Why: the eager path (:mod:`~qwen3asr_train.data.manifest` + :class:`~qwen3asr_train.data.sampler.DurationWindowSampler`)
reads and checks every row before the first step and keeps every row in memory; its bucket edges are
quantiles over the whole corpus. For a corpus of millions of rows that is minutes of start-up and gigabytes
per rank. Here:

* :class:`LazyRows` streams validated :class:`~qwen3asr_train.data.manifest.Utterance` records from our
  JSONL(.gz) manifests and from Lhotse cut manifests (``cuts.jsonl.gz``), one line at a time, applying the
  same row checks and the same ``data.on_bad_row`` policy when a row is *reached* (``error``: a
  :class:`~qwen3asr_train.data.manifest.ManifestError` naming file and line; ``skip``: counted, logged, and
  appended to ``rejects.jsonl``).
* :class:`LazyWindowSampler` feeds that stream to Lhotse's ``DynamicBucketer`` (the engine of its
  ``DynamicBucketingSampler``; bucket edges estimated
  from the first ``data.bucket_estimate_rows`` rows, a seeded shuffle inside a buffer of
  ``data.bucket_buffer_size`` rows, batches bounded by padded seconds ``count × longest ≤ max_batch_seconds``
  and ``count ≤ max_batch_size`` — Lhotse's ``TimeConstraint`` is the bound of our eager batcher, which
  also splits the rare Lhotse batch that overshoots it by its last row), then
  forms windows of ``accumulate`` micro-batches (the window collator's token normalisation needs whole
  windows) and deals them to ranks exactly as the eager sampler does.

DDP: every rank reads the same stream and computes the same global sequence of micro-batches (seeded by
``seed`` and the epoch); windows are dealt round-robin, so ranks see disjoint rows. With several ranks a
final round that cannot give every rank a full window is dropped (counted in :attr:`LazyWindowSampler.dropped`
and logged), as the eager sampler trims its plan.

Resume: the position is (epoch, micro-batches consumed by this rank), recorded by
:class:`~qwen3asr_train.data.datamodule.DataPositionTracker`, as on the eager path. Because the stream is
deterministic, ``load_state_dict`` + ``iter`` replays the epoch's plan (rows are parsed and bucketed, no
audio is decoded) and starts at the first window not yet consumed: the batches are exactly those of an
uninterrupted run. The replay costs time proportional to the position in the epoch.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qwen3asr_train.data.dataset import UtteranceDataset
from qwen3asr_train.data.manifest import (
    HEADER_CHECK_THREADS,
    ManifestError,
    RowChecks,
    SkipReport,
    Utterance,
    json_line,
    open_lines,
    parse_row,
)
from qwen3asr_train.data.sampler import Window, pack_by_duration

log = logging.getLogger(__name__)

LINE_BITS = 6
"""A row's stable number is ``(file << 40) | (line << LINE_BITS) | k``: ``k`` numbers the supervisions of one
Lhotse cut line (ours have one row per line). The number keys the row's augmentation draws."""
FILE_SHIFT = 40

CHUNK_ROWS = 256
"""Rows parsed (and header-checked in threads) together; what the stream holds beyond the bucketing buffer."""

RowFilter = Callable[[Utterance], ManifestError | None]
"""A later check on a parsed row (the token limit, known once the tokenizer exists); returns the error or None."""


class LazyRows:
    """A re-iterable stream of ``(number, Utterance)`` over manifests, checked as each row is reached.

    ``max_rows`` (``data.max_utterances``) stops after that many usable rows. With ``shuffle_files`` and
    several manifests, the order of the files is drawn per epoch (from ``seed`` and the epoch): the
    manifests act as shards, the bucketing buffer shuffles inside them.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        checks: RowChecks,
        policy: str = "error",
        max_rows: int = 0,
        shuffle_files: bool = False,
        seed: int = 0,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("data.lazy needs data.train manifests")
        for path in self.paths:
            if not path.is_file():
                raise ManifestError(f"{path}: manifest not found", "manifest_missing")
        if policy not in {"error", "skip"}:
            raise ValueError(f"on_bad_row must be error|skip, got {policy!r}")
        self.checks = checks
        self.policy = policy
        self.max_rows = max_rows
        self.shuffle_files = shuffle_files
        self.seed = seed
        self.epoch = 0
        self.row_filter: RowFilter | None = None
        self.rejects_path: Path | None = None
        """Where skipped rows are appended (``<run_dir>/rejects.jsonl``; set on rank 0 only). None: log only."""
        self.report = SkipReport()
        """Rows skipped in the latest complete pass (counts are per pass; a replay counts again)."""
        self._reported: set[str] = set()
        self._head: tuple[int, list[Utterance]] | None = None

    def file_order(self, epoch: int) -> list[int]:
        """Indices into ``paths`` in the order epoch ``epoch`` reads them (configuration order under
        ``max_rows``, so "the first N rows" are the same rows every epoch)."""
        order = list(range(len(self.paths)))
        if self.shuffle_files and len(order) > 1 and self.max_rows <= 0:
            random.Random(f"lazy-files/{self.seed}/{epoch}").shuffle(order)
        return order

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, Utterance]]:
        return self.iterate(self.epoch)

    def iterate(self, epoch: int, record: bool = True) -> Iterator[tuple[int, Utterance]]:
        """Rows of ``epoch``; ``record=False`` (the bucket-edge estimate) neither logs nor writes skips."""
        report = SkipReport()
        kept = 0
        for file_no in self.file_order(epoch):
            for number, utt in self._file_rows(file_no, report, record):
                yield number, utt
                kept += 1
                if 0 < self.max_rows <= kept:
                    self._close(report, record)
                    return
        self._close(report, record)
        if kept == 0:
            raise ManifestError(f"{[str(p) for p in self.paths]}: no usable rows", "empty_manifest")

    def _close(self, report: SkipReport, record: bool) -> None:
        if record:
            report.log(f"lazy pass of epoch {self.epoch} over {len(self.paths)} manifest(s)")
            self.report = report

    def _file_rows(self, file_no: int, report: SkipReport, record: bool) -> Iterator[tuple[int, Utterance]]:
        """One manifest's rows in order. Lines are parsed in chunks of :data:`CHUNK_ROWS`, with the audio
        header reads of a chunk in threads (as the eager reader does; on shared storage they wait on the
        network), so memory holds one chunk, not the file."""
        path = self.paths[file_no]
        pool = ThreadPoolExecutor(HEADER_CHECK_THREADS) if self.checks.check_audio else None

        def parse(item: tuple[int, bytes]) -> list[Utterance] | ManifestError:
            line_no, raw = item
            try:
                return self._parse(raw, f"{path}:{line_no}", path, line_no)
            except ManifestError as exc:
                return exc

        try:
            lines = ((n, raw) for n, raw in enumerate(open_lines(path), start=1) if raw.strip())
            while chunk := list(itertools.islice(lines, CHUNK_ROWS)):
                results = pool.map(parse, chunk) if pool is not None else map(parse, chunk)
                for (line_no, _), result in zip(chunk, results, strict=True):
                    where = f"{path}:{line_no}"
                    try:
                        if isinstance(result, ManifestError):
                            raise result
                        for k, utt in enumerate(result):
                            if self.row_filter is not None and (error := self.row_filter(utt)) is not None:
                                raise error
                            yield (file_no << FILE_SHIFT) | (line_no << LINE_BITS) | (k % (1 << LINE_BITS)), utt
                    except ManifestError as exc:
                        if self.policy == "error":
                            raise
                        if record:
                            report.add(exc.reason, str(exc), where)
                            self._write_reject(exc, where)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _parse(self, raw: bytes, where: str, path: Path, line_no: int) -> list[Utterance]:
        """The utterances of one line: one for our rows, one per supervision for a Lhotse cut."""
        row = json_line(raw, where, line_no)
        from qwen3asr_train.tools.lhotse_io import cut_rows, is_cut_row

        if not is_cut_row(row):
            return [parse_row(row, where, path.parent, self.checks, line_no)]
        rows = cut_rows(row)
        if isinstance(rows, tuple):
            reason, message = rows
            raise ManifestError(f"{where}: {message}", reason)
        return [parse_row(r, where, path.parent, self.checks, line_no) for r in rows]

    def _write_reject(self, exc: ManifestError, where: str) -> None:
        """Append a skipped row to ``rejects.jsonl`` once per run (replays and later epochs meet it again)."""
        if self.rejects_path is None or where in self._reported:
            return
        self._reported.add(where)
        file, _, line = where.rpartition(":")
        row = {"file": file, "line": int(line), "reason": exc.reason, "message": str(exc), "what": "train"}
        with open(self.rejects_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def head(self, n: int) -> list[Utterance]:
        """The first ``n`` usable rows of the unshuffled file order (bucket edges, tokenizer texts, the plan).

        Kept after the first call (the stage and the sampler both ask; reading them twice doubled the start);
        the cached rows predate a later ``row_filter``, which only the bucket-edge estimate then sees."""
        if self._head is not None and self._head[0] == n:
            return list(self._head[1])
        out = []
        for _, utt in self.iterate_unshuffled():
            out.append(utt)
            if len(out) >= n:
                break
        self._head = (n, out)
        return list(out)

    def iterate_unshuffled(self) -> Iterator[tuple[int, Utterance]]:
        """Rows in configuration order, without recording skips (they are recorded when training reaches them)."""
        for file_no in range(len(self.paths)):
            yield from self._file_rows(file_no, SkipReport(), record=False)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the stream for a resume check without reading it: the files' paths, sizes and mtimes."""
        return {
            "files": [
                {"path": str(p.absolute()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                for p in self.paths
            ],
            "max_rows": self.max_rows,
        }


class LazyDataset(UtteranceDataset):
    """Decoding for the lazy path: windows carry their rows (:attr:`Window.items`), so there is no row table."""

    def __init__(self, rows: LazyRows, on_bad_audio: str = "error") -> None:
        super().__init__([], on_bad_audio)
        self.rows = rows

    def __len__(self) -> int:
        raise TypeError("a lazy dataset has no length before a full pass over its manifests")

    def durations(self) -> list[float]:
        raise TypeError("a lazy dataset does not hold its rows' durations (data.lazy=true)")


def _cut(number: int, utt: Utterance) -> Any:
    """A data-less Lhotse cut standing for one row: Lhotse's sampler needs only ``id`` and ``duration``."""
    from lhotse.cut import MonoCut

    return MonoCut(id=utt.id, start=0.0, duration=utt.duration, channel=0, custom={"row": (number, utt)})


class _CutStream:
    """Lhotse reads this as a lazy ``CutSet`` source: every ``iter`` re-reads the rows of one epoch."""

    def __init__(self, rows: LazyRows, epoch: int) -> None:
        self.rows = rows
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        return (_cut(n, u) for n, u in self.rows.iterate(self.epoch))


class LazyWindowSampler:
    """Windows of micro-batches for one rank from a :class:`LazyRows` stream (see the module docstring).

    The interface is :class:`~qwen3asr_train.data.sampler.DurationWindowSampler`'s (``set_epoch``, ``iter``,
    ``mark_consumed``, ``state_dict``/``load_state_dict``) minus ``len``: the epoch's length is unknown
    until it has been read.
    """

    def __init__(
        self,
        rows: LazyRows,
        max_seconds: float,
        max_batch_size: int,
        window: int = 1,
        num_buckets: int = 8,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_size: int = 20000,
        estimate_rows: int = 10000,
    ) -> None:
        if buffer_size < 1 or estimate_rows < 1:
            raise ValueError("data.bucket_buffer_size and data.bucket_estimate_rows must be >= 1")
        if window < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad window={window} / rank={rank} / world_size={world_size}")
        self.rows = rows
        self.max_seconds = max_seconds
        self.max_batch_size = max_batch_size
        self.window = window
        self.num_buckets = num_buckets
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.buffer_size = buffer_size
        self.estimate_rows = estimate_rows
        self.epoch = 0
        self.dropped: dict[int, int] = {}
        """Micro-batches dropped at the end of each finished epoch so every rank had full windows (world > 1)."""
        self._consumed: dict[str, int] = {"epoch": 0, "micro": 0}
        self._resume_from: tuple[int, int] | None = None
        self._bins: list[float] | None = None

    # ------------------------------------------------------------------ planning
    def duration_bins(self) -> list[float]:
        """Bucket edges from the first ``estimate_rows`` rows (Lhotse's estimate: equal total seconds per bucket)."""
        if self._bins is None:
            from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets

            head = self.rows.head(self.estimate_rows)
            if not head:
                raise ManifestError(f"{[str(p) for p in self.rows.paths]}: no usable rows", "empty_manifest")
            buckets = min(self.num_buckets, len(head))
            cuts = [_cut(0, u) for u in head]
            self._bins = sorted({float(b) for b in estimate_duration_buckets(cuts, buckets)}) if buckets > 1 else []
            log.info(
                "lazy data: %d bucket edges %s estimated from the first %d rows",
                len(self._bins),
                [round(b, 2) for b in self._bins],
                len(head),
            )
        return self._bins

    def micro_batches(self, epoch: int) -> Iterator[tuple[tuple[int, ...], tuple[Utterance, ...]]]:
        """All ranks' micro-batches of ``epoch`` in training order, as ``(row numbers, rows)`` (deterministic).

        Lhotse's ``DynamicBucketer`` (the engine of its ``DynamicBucketingSampler``) with both of its random
        generators seeded from (seed, epoch). The bucket-selection generator must be given: without it,
        Lhotse 1.33 tests ``if bucket`` on a ``queue.Queue`` (always true) at the end of the stream, can pick
        an empty bucket and stop the epoch with rows still buffered (found by the coverage test here)."""
        import warnings

        from lhotse.dataset.sampling.dynamic_bucketing import DynamicBucketer

        with warnings.catch_warnings():
            # Lhotse warns when its guess of the buffer's bucket sizes is small; our batches are still bounded
            warnings.filterwarnings("ignore", message=".*buffer_size.*", category=UserWarning)
            bucketer = DynamicBucketer(
                _CutStream(self.rows, epoch),
                duration_bins=self.duration_bins(),
                world_size=1,  # one global stream; windows are dealt to ranks below
                max_duration=self.max_seconds,
                max_cuts=self.max_batch_size,
                drop_last=False,
                buffer_size=self.buffer_size,
                shuffle=self.shuffle,
                rng=random.Random(f"lazy-batches/{self.seed}/{epoch}"),
                bucket_rng=random.Random(f"lazy-buckets/{self.seed}/{epoch}"),
            )
        for batch in bucketer:
            rows = [cut.custom["row"] for cut in batch]
            # Lhotse closes a batch *after* adding the row that crosses the limit (a longer row raises
            # count × longest past max_seconds); our bound is strict, so such a batch is split in order
            durations = [u.duration for _, u in rows]
            for part in pack_by_duration(range(len(rows)), durations, self.max_seconds, self.max_batch_size):
                yield tuple(rows[i][0] for i in part), tuple(rows[i][1] for i in part)

    def windows(self, epoch: int) -> Iterator[Window]:
        """This rank's windows of ``epoch``, produced as the stream is read."""
        round_: list[list[tuple[tuple[int, ...], tuple[Utterance, ...]]]] = []
        current: list[tuple[tuple[int, ...], tuple[Utterance, ...]]] = []
        first = 0
        for micro in self.micro_batches(epoch):
            current.append(micro)
            if len(current) < self.window:
                continue
            round_.append(current)
            current = []
            if len(round_) == self.world_size:
                window = self._window(epoch, first, round_[self.rank])
                first += len(window.micro_batches)
                round_ = []
                yield window
        leftover = sum(len(w) for w in round_) + len(current)
        if self.world_size == 1:
            if current:
                yield self._window(epoch, first, current)
            leftover = 0
        self.dropped[epoch] = leftover
        if leftover and self.rank == 0:
            log.info("epoch %d: dropped %d micro-batches so every rank has full windows", epoch, leftover)

    @staticmethod
    def _window(epoch: int, first: int, micro: list[tuple[tuple[int, ...], tuple[Utterance, ...]]]) -> Window:
        return Window(epoch, first, tuple(m[0] for m in micro), tuple(m[1] for m in micro))

    # ------------------------------------------------------------------ iteration
    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch
        self.rows.set_epoch(epoch)

    def __iter__(self) -> Iterator[Window]:
        consumed = 0
        if self._resume_from is not None and self._resume_from[0] == self.epoch:
            consumed = self._resume_from[1]
        self._resume_from = None
        for window in self.windows(self.epoch):
            end = window.first_micro + len(window.micro_batches)
            if end <= consumed:
                continue  # replayed, already trained on
            if window.first_micro < consumed:
                log.warning("resume point %d is inside a window; that window restarts from its start", consumed)
            consumed = 0
            yield window

    def num_micro_batches(self) -> int:
        """Not known before the epoch is read: the lazy path needs ``trainer.max_steps``."""
        raise TypeError("data.lazy=true: the epoch's length is unknown until it has been read (set trainer.max_steps)")

    # ------------------------------------------------------------------ resume
    def mark_consumed(self, epoch: int, micro_index: int) -> None:
        """Record that micro-batch ``micro_index`` of ``epoch`` has been trained on."""
        self._consumed = {"epoch": epoch, "micro": micro_index + 1}

    def state_dict(self) -> dict[str, Any]:
        """Position within the epoch, for mid-epoch resume (the eager sampler's keys, and ``stream: lazy``, which
        :meth:`~qwen3asr_train.data.datamodule.DataPositionTracker.on_load_checkpoint` looks for)."""
        return {**self._consumed, "stream": "lazy"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration of ``state['epoch']`` start after the consumed micro-batches."""
        self._consumed = {"epoch": int(state["epoch"]), "micro": int(state["micro"])}
        self._resume_from = (int(state["epoch"]), int(state["micro"]))
