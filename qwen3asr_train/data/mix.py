"""The GSPO data mix: weighted sources, rollout batches drawn per (seed, rank, rollout), a resumable tick loader.

Why in the data package: these decide *which utterances* a GSPO run sees and in what order; they hold no
training logic. The stage (``stages/gspo.py``) only builds them.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from qwen3asr_train.config.schema import GSPOConfig, RunConfig
from qwen3asr_train.data.datamodule import load_train_utterances, row_checks
from qwen3asr_train.data.dataset import Sample, UtteranceDataset
from qwen3asr_train.data.manifest import SkipReport, Utterance, read_manifests

log = logging.getLogger(__name__)


class TickSampler(Sampler[int]):
    """Optimizer-step ticks 0, 1, 2, ... (endless); Lightning's ``max_steps`` ends the run.

    Resuming sets the first tick to the start of the next rollout batch after the checkpoint.
    """

    def __init__(self) -> None:
        self.start = 0
        self.consumed = 0

    def __iter__(self) -> Iterator[int]:
        tick = self.start
        while True:
            yield tick
            tick += 1

    def state_dict(self) -> dict[str, int]:
        return {"next_tick": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = int(state["next_tick"])


class MixtureRollouts:
    """Map-style: tick -> ``{"tick", "rollout", "minibatch", "samples"}``; samples only on a rollout's first tick.

    Utterances are drawn per (seed, rank, rollout) — a source by weight, then an utterance uniformly — so
    every rank sees different utterances and a resumed run draws exactly what the uninterrupted run would.
    """

    def __init__(
        self,
        sources: Sequence[tuple[UtteranceDataset, float]],
        batch_size: int,
        steps_per_rollout: int,
        seed: int,
        rank: int,
    ) -> None:
        self.sources = list(sources)
        total = sum(w for _, w in self.sources)
        self.weights = [w / total for _, w in self.sources]
        self.batch_size = batch_size
        self.steps_per_rollout = steps_per_rollout
        self.seed = seed
        self.rank = rank

    def draw(self, rollout: int) -> list[tuple[int, int]]:
        """(source, utterance) pairs of a rollout batch."""
        rng = random.Random(zlib.crc32(f"gspo/{self.seed}/{self.rank}/{rollout}".encode()))
        picks = []
        for _ in range(self.batch_size):
            src = rng.choices(range(len(self.sources)), weights=self.weights)[0]
            picks.append((src, rng.randrange(len(self.sources[src][0]))))
        return picks

    def __getitem__(self, tick: int) -> dict[str, Any]:
        rollout, minibatch = divmod(tick, self.steps_per_rollout)
        item: dict[str, Any] = {"tick": tick, "rollout": rollout, "minibatch": minibatch, "samples": None}
        if minibatch == 0:
            samples: list[Sample] = []
            for src, idx in self.draw(rollout):
                sample = self.sources[src][0].load(idx)
                if sample is not None:
                    # a unique index per (source, utterance) for the per-row RNGs
                    samples.append(Sample(sample.utt, sample.audio, src * 10_000_000 + idx))
            if not samples:
                raise RuntimeError(f"rollout {rollout}: every drawn utterance was unreadable")
            item["samples"] = samples
        return item


class RolloutLoader:
    """DataLoader over ticks; stateful so Lightning restores the position on resume."""

    def __init__(self, dataset: MixtureRollouts, num_workers: int) -> None:
        self.sampler = TickSampler()
        self.batch_sampler = None
        # own generator: creating the iterator draws a worker base seed, which must not come from the global
        # RNG (restored on resume just before the iterator is created, it would be shifted by that draw)
        generator = torch.Generator().manual_seed(dataset.seed)
        self.loader = DataLoader(
            dataset,
            sampler=self.sampler,
            batch_size=None,
            collate_fn=lambda x: x,
            num_workers=num_workers,
            generator=generator,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.loader)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def read_mix_sources(cfg: RunConfig, rejects: SkipReport | None = None) -> list[tuple[list[Utterance], float, str]]:
    """``(utterances, weight, name)`` per GSPO data-mix source (``recipe.mix``), or ``data.train`` as one source."""
    recipe: GSPOConfig = cfg.recipe
    rejects = rejects if rejects is not None else SkipReport()
    if recipe.mix:
        checks = row_checks(cfg.data)
        out = []
        for name, src in recipe.mix.items():
            local = SkipReport()
            out.append((read_manifests(src.manifests, checks, cfg.data.on_bad_row, local), src.weight, name))
            rejects.extend(local, f"mix:{name}")
        return out
    items, hf = load_train_utterances(cfg.data, rejects)
    if hf is not None:
        raise NotImplementedError("recipe=gspo reads manifests (data.train or recipe.mix); HF datasets are SFT-only")
    return [(items, 1.0, "train")]
