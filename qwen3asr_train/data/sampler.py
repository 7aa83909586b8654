"""Duration-bucketed, distributed, resumable batching in accumulation windows.

Why windows: the SFT loss is normalised over the target tokens of *all* micro-batches that make one
optimizer step (see ``stages/sft.py``). The sampler therefore hands the DataLoader whole windows of
``accumulate`` micro-batches, so the collator can count the window's tokens before any of its
micro-batches is trained on.

Each epoch (seeded by ``seed`` and the epoch number, so every rank computes the same plan):

1. group utterances into ``num_buckets`` duration buckets (edges at duration quantiles);
2. shuffle inside each bucket and fill micro-batches greedily while ``count × longest ≤ max_seconds``
   (the padded audio seconds, which is what bounds memory) and ``count ≤ max_batch_size``;
3. shuffle the micro-batch order, group consecutive micro-batches into windows;
4. deal windows to ranks round-robin. With several ranks the plan is trimmed to full windows and an
   equal count per rank (the dropped micro-batches are counted and logged); alone, the last window may
   be partial (the loss normalisation counts only the micro-batches it has).

Resuming: ``state_dict`` records how many micro-batches of the current epoch were consumed (updated by
:class:`~qwen3asr_train.data.datamodule.DataPositionTracker` as training steps run, not when batches
are prefetched); ``load_state_dict`` makes the next ``iter`` start from there.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """One optimizer step's worth of micro-batches (indices into the dataset)."""

    epoch: int
    first_micro: int
    """Index of the first micro-batch of this window within this rank's epoch."""
    micro_batches: tuple[tuple[int, ...], ...]
    items: tuple[tuple[Any, ...], ...] | None = None
    """The micro-batches' utterances themselves, parallel to ``micro_batches`` (the lazy path, which has no
    random access to rows: :mod:`qwen3asr_train.data.lazy`); ``None``: look indices up in the dataset."""


def pack_by_duration(
    order: Iterable[int], durations: Sequence[float], max_seconds: float, max_size: int
) -> list[list[int]]:
    """Cut indices, in the given order, into batches of at most ``max_seconds`` *padded* seconds (count ×
    longest) and ``max_size`` items, greedily. The one batcher: training packs each shuffled bucket with it,
    evaluation packs the duration-sorted set."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0.0
    for idx in order:
        new_longest = max(longest, durations[idx])
        if current and ((len(current) + 1) * new_longest > max_seconds or len(current) >= max_size):
            batches.append(current)
            current, new_longest = [], durations[idx]
        current.append(idx)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


class DurationWindowSampler:
    """Yields :class:`Window` objects for one rank (see the module docstring)."""

    def __init__(
        self,
        durations: Sequence[float],
        max_seconds: float,
        max_batch_size: int,
        window: int = 1,
        num_buckets: int = 8,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not durations:
            raise ValueError("no utterances to sample from")
        self.durations = list(durations)
        self.max_seconds = max_seconds
        self.max_batch_size = max_batch_size
        self.window = window
        self.num_buckets = num_buckets
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._consumed: dict[str, int] = {"epoch": 0, "micro": 0}
        self._resume_from: tuple[int, int] | None = None
        self._plan_cache: tuple[int, list[tuple[int, ...]]] | None = None

    # ------------------------------------------------------------------ planning
    def buckets(self) -> list[list[int]]:
        """Indices grouped by duration: bucket edges are duration quantiles, so equal durations share a bucket."""
        order = sorted(range(len(self.durations)), key=lambda i: (self.durations[i], i))
        sorted_d = [self.durations[i] for i in order]
        edges = sorted({sorted_d[(k * len(order)) // self.num_buckets] for k in range(1, self.num_buckets)})
        groups: list[list[int]] = [[] for _ in range(len(edges) + 1)]
        for i in order:
            groups[bisect.bisect_right(edges, self.durations[i])].append(i)
        return [g for g in groups if g]

    def micro_batches(self, epoch: int) -> list[tuple[int, ...]]:
        """All ranks' micro-batches for ``epoch`` in training order (deterministic)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches: list[tuple[int, ...]] = []
        for bucket in self.buckets():
            bucket = list(bucket)
            if self.shuffle:
                rng.shuffle(bucket)
            batches += [
                tuple(b) for b in pack_by_duration(bucket, self.durations, self.max_seconds, self.max_batch_size)
            ]
        if self.shuffle:
            rng.shuffle(batches)
        self._plan_cache = (epoch, batches)
        return batches

    def windows(self, epoch: int) -> list[Window]:
        """This rank's windows for ``epoch``."""
        batches = self.micro_batches(epoch)
        if self.world_size > 1:
            usable = len(batches) - len(batches) % (self.window * self.world_size)
            if usable == 0:
                raise ValueError(
                    f"only {len(batches)} micro-batches for {self.world_size} ranks × {self.window} accumulation: "
                    f"lower data.max_batch_seconds or add data"
                )
            if usable < len(batches) and epoch == self.epoch and self.rank == 0:
                log.info(
                    "epoch %d: dropped %d micro-batches so every rank has full windows", epoch, len(batches) - usable
                )
            batches = batches[:usable]
        grouped = [tuple(batches[i : i + self.window]) for i in range(0, len(batches), self.window)]
        mine = grouped[self.rank :: self.world_size]
        out, first = [], 0
        for micro in mine:
            out.append(Window(epoch, first, micro))
            first += len(micro)
        return out

    # ------------------------------------------------------------------ iteration
    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Window]:
        windows = self.windows(self.epoch)
        start = 0
        if self._resume_from is not None and self._resume_from[0] == self.epoch:
            consumed = self._resume_from[1]
            start = sum(1 for w in windows if w.first_micro + len(w.micro_batches) <= consumed)
            if start < len(windows) and windows[start].first_micro != consumed:
                log.warning("resume point %d is inside a window; that window restarts from its start", consumed)
            self._resume_from = None
        yield from windows[start:]

    def __len__(self) -> int:
        """Number of windows this rank yields in the current epoch."""
        return len(self.windows(self.epoch))

    def num_micro_batches(self) -> int:
        """Micro-batches this rank yields in the current epoch."""
        return sum(len(w.micro_batches) for w in self.windows(self.epoch))

    # ------------------------------------------------------------------ resume
    def mark_consumed(self, epoch: int, micro_index: int) -> None:
        """Record that micro-batch ``micro_index`` of ``epoch`` has been trained on."""
        self._consumed = {"epoch": epoch, "micro": micro_index + 1}

    def state_dict(self) -> dict[str, Any]:
        """Position within the epoch, for mid-epoch resume."""
        return dict(self._consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration of ``state['epoch']`` start after the consumed micro-batches."""
        self._consumed = dict(state)
        self._resume_from = (int(state["epoch"]), int(state["micro"]))
