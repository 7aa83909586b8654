"""The lazy training path (``data.lazy``): coverage, batch limits, windows, DDP disjointness, exact mid-epoch
resume, the bad-row policy when a row is reached, Lhotse cut manifests as input, and (slow) start-up cost
that does not grow with the corpus, measured for 10k vs 1M rows."""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import time
import tracemalloc
from pathlib import Path

import pytest

from qwen3asr_train.data.datamodule import ASRDataModule, WindowedLoader, load_train_data
from qwen3asr_train.data.lazy import LazyDataset, LazyRows, LazyWindowSampler
from qwen3asr_train.data.manifest import ManifestError, RowChecks, read_manifest
from qwen3asr_train.data.sampler import Window
from qwen3asr_train.languages import LanguageTable
from qwen3asr_train.testing import write_clip

log = logging.getLogger(__name__)

CLIP_SECONDS = 3.0


def clips(directory: Path, count: int = 4) -> list[Path]:
    """A few tiny wavs the generated rows repeat."""
    return [
        p if p.exists() else write_clip(p, CLIP_SECONDS, seed=i)
        for i, p in enumerate(directory / f"clip{i}.wav" for i in range(count))
    ]


def write_rows(path: Path, n: int, seed: int = 0, bad: dict[int, str] | None = None) -> Path:
    """``n`` rows over 4 repeated clips with durations in (0.2, 2.9) s; ``bad`` maps line -> raw text.

    Written in chunks of pre-formatted lines (a million rows take a few seconds)."""
    audio = [p.name for p in clips(path.parent)]
    rng = random.Random(seed)
    bad = bad or {}
    with open(path, "w", encoding="utf-8") as handle:
        chunk: list[str] = []
        for i in range(n):
            line = bad.get(i + 1)
            if line is None:
                line = (
                    f'{{"id": "u{i}", "audio": "{audio[i % 4]}", "text": "alpha bravo", '
                    f'"language": "English", "duration": {0.2 + rng.random() * 2.7:.3f}}}'
                )
            chunk.append(line)
            if len(chunk) == 10000:
                handle.write("\n".join(chunk) + "\n")
                chunk = []
        if chunk:
            handle.write("\n".join(chunk) + "\n")
    return path


def rows_of(path: Path | list[Path], policy: str = "error", check_audio: bool = True, **kw) -> LazyRows:
    paths = path if isinstance(path, list) else [path]
    return LazyRows(paths, RowChecks(LanguageTable(), check_audio=check_audio), policy, **kw)


def sampler_of(rows: LazyRows, **kw) -> LazyWindowSampler:
    args = {"max_seconds": 8.0, "max_batch_size": 6, "window": 1, "num_buckets": 4, "seed": 3}
    args.update(buffer_size=200, estimate_rows=100)
    args.update(kw)
    return LazyWindowSampler(rows, **args)


def ids(windows: list[Window]) -> list[str]:
    return [u.id for w in windows for micro in (w.items or ()) for u in micro]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("lazy") / "train.jsonl", 1000)


# ------------------------------------------------------------------------------------------ one rank
def test_one_epoch_covers_every_row_once_within_batch_limits(manifest: Path) -> None:
    expected = {u.id: u.duration for u in read_manifest(manifest, RowChecks(LanguageTable()))}  # the eager reader
    sampler = sampler_of(rows_of(manifest), window=3)
    windows = list(sampler)
    seen = ids(windows)
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen)) == 1000
    for w in windows:
        assert len(w.micro_batches) == len(w.items) and all(
            len(n) == len(u) for n, u in zip(w.micro_batches, w.items, strict=True)
        )
        for micro in w.items:
            assert 1 <= len(micro) <= 6
            assert len(micro) * max(expected[u.id] for u in micro) <= 8.0 + 1e-9  # padded seconds
    sizes = [len(w.micro_batches) for w in windows]
    assert sizes[:-1] == [3] * (len(sizes) - 1) and 1 <= sizes[-1] <= 3  # only the last window may be partial
    assert [w.first_micro for w in windows] == [3 * k for k in range(len(windows))]
    assert sampler.dropped[0] == 0


def test_epochs_are_deterministic_and_differ(manifest: Path) -> None:
    def order(epoch: int, seed: int = 3) -> list[str]:
        s = sampler_of(rows_of(manifest, check_audio=False), seed=seed)
        s.set_epoch(epoch)
        return ids(list(s))

    first = order(0)
    assert order(0) == first  # a fresh sampler replays the same plan
    assert order(1) != first and sorted(order(1)) == sorted(first)
    assert order(0, seed=4) != first


def test_buckets_cut_padding_against_file_order(manifest: Path) -> None:
    """Bucketing groups similar durations: padded seconds per real second beat batching in file order."""
    durations = {u.id: u.duration for u in read_manifest(manifest, RowChecks(LanguageTable(), check_audio=False))}

    def waste(micro_batches: list[list[str]]) -> float:
        padded = sum(len(m) * max(durations[i] for i in m) for m in micro_batches)
        return padded / sum(durations.values())

    bucketed = [[u.id for u in micro] for w in sampler_of(rows_of(manifest, check_audio=False)) for micro in w.items]
    # the same batch sizes over rows in file order (an independent construction: no bucketing at all)
    in_order, start = [], 0
    for m in bucketed:
        in_order.append([f"u{j}" for j in range(start, start + len(m))])
        start += len(m)
    assert waste(bucketed) < waste(in_order)


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.parametrize(("world", "window"), [(2, 1), (2, 3), (3, 2)])
def test_ranks_see_disjoint_rows_and_drop_only_the_last_round(manifest: Path, world: int, window: int) -> None:
    per_rank = []
    for rank in range(world):
        s = sampler_of(rows_of(manifest, check_audio=False), window=window, rank=rank, world_size=world)
        per_rank.append((list(s), s.dropped[0]))
    seen = [i for windows, _ in per_rank for i in ids(windows)]
    assert len(seen) == len(set(seen)), "a row reached two ranks"
    counts = {len(windows) for windows, _ in per_rank}
    assert len(counts) == 1, "every rank must take the same number of steps"
    assert all(len(w.micro_batches) == window for windows, _ in per_rank for w in windows)
    # independent construction: the single global stream, cut into windows and dealt round-robin
    glob = [rows for _, rows in sampler_of(rows_of(manifest, check_audio=False)).micro_batches(0)]
    rounds = len(glob) // (window * world)
    for rank, (windows, dropped) in enumerate(per_rank):
        expected = [glob[(r * world + rank) * window : (r * world + rank + 1) * window] for r in range(rounds)]
        assert [list(w.items) for w in windows] == expected
        assert dropped == len(glob) - rounds * window * world  # counted, and the same on every rank
    dropped_rows = {u.id for micro in glob[rounds * window * world :] for u in micro}
    assert set(seen) | dropped_rows == {f"u{i}" for i in range(1000)}


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize(("world", "window", "k"), [(1, 1, 7), (1, 2, 10), (2, 2, 6), (1, 2, 5)])
def test_resume_from_state_dict_replays_exactly(manifest: Path, world: int, window: int, k: int) -> None:
    """Batches after resuming from a state taken after k consumed micro-batches == the uninterrupted run's."""
    for rank in range(world):
        full = sampler_of(rows_of(manifest, check_audio=False), window=window, rank=rank, world_size=world)
        full.set_epoch(1)
        uninterrupted = list(full)
        # the interrupted run: consume k micro-batches, as DataPositionTracker marks them, and save the state
        first = sampler_of(rows_of(manifest, check_audio=False), window=window, rank=rank, world_size=world)
        first.set_epoch(1)
        consumed = 0
        for w in first:
            for j in range(len(w.micro_batches)):
                if consumed < k:
                    first.mark_consumed(1, w.first_micro + j)
                    consumed += 1
            if consumed >= k:
                break
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        assert state == {"epoch": 1, "micro": k, "stream": "lazy"}
        resumed = sampler_of(rows_of(manifest, check_audio=False), window=window, rank=rank, world_size=world)
        resumed.load_state_dict(state)
        resumed.set_epoch(1)
        after = list(resumed)
        # k inside a window (k % window != 0) restarts that window, as the eager sampler does
        start = k // window
        assert [(w.first_micro, w.micro_batches) for w in after] == [
            (w.first_micro, w.micro_batches) for w in uninterrupted[start:]
        ]
        assert ids(after) == ids(uninterrupted[start:])
        resumed.set_epoch(2)  # the resume point applies to its epoch only: the next epoch starts at its start
        again = list(resumed)
        assert again[0].first_micro == 0 and (world > 1 or len(ids(again)) == 1000)


# ------------------------------------------------------------------------------------------ bad rows
def test_bad_rows_error_when_reached_naming_file_and_line(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "m.jsonl", 300, bad={250: "{not json"})
    rows = rows_of(path)
    assert len(rows.head(100)) == 100  # the start reads only the head: the bad row is not reached yet
    with pytest.raises(ManifestError, match=r"m\.jsonl:250: malformed JSON"):
        list(sampler_of(rows))


def test_bad_rows_skipped_are_counted_and_written_once(tmp_path: Path) -> None:
    bad = {
        5: '{"id": "x", "audio": "missing.wav", "text": "a", "language": "English", "duration": 1.0}',
        9: '{"id": "y", "audio": "clip0.wav", "text": "a", "language": "Klingon", "duration": 1.0}',
        200: "[1, 2]",
    }
    path = write_rows(tmp_path / "m.jsonl", 300, bad=bad)
    rows = rows_of(path, policy="skip")
    rows.rejects_path = tmp_path / "rejects.jsonl"
    sampler = sampler_of(rows)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen = ids(list(sampler))
        assert len(seen) == 297 and {"x", "y"}.isdisjoint(seen)
        assert dict(rows.report.counts) == {"audio_missing": 1, "unknown_language": 1, "not_an_object": 1}
    written = [json.loads(line) for line in rows.rejects_path.read_text().splitlines()]
    assert sorted((r["line"], r["reason"]) for r in written) == [
        (5, "audio_missing"),
        (9, "unknown_language"),
        (200, "not_an_object"),
    ]


def test_token_limit_and_max_rows_apply_in_the_stream(tmp_path: Path) -> None:
    from qwen3asr_train.data.manifest import ManifestError as Error

    path = write_rows(tmp_path / "m.jsonl", 120)
    rows = rows_of(path, policy="skip", max_rows=50)
    rows.row_filter = lambda u: Error(f"{u.source}: too long", "text_too_long") if u.id.endswith("7") else None
    seen = ids(list(sampler_of(rows, estimate_rows=10)))
    # independent count: the first 50 rows whose id does not end in 7
    expected = [f"u{i}" for i in range(120) if not str(i).endswith("7")][:50]
    assert sorted(seen) == sorted(expected)
    assert rows.report.counts["text_too_long"] == sum(1 for i in range(int(expected[-1][1:])) if str(i).endswith("7"))


def test_several_manifests_are_read_as_shards_in_a_per_epoch_order(tmp_path: Path) -> None:
    shards = [write_rows(tmp_path / f"s{k}.jsonl", 40, seed=k) for k in range(4)]
    for k, shard in enumerate(shards):  # distinct ids per shard
        shard.write_text(shard.read_text().replace('"id": "u', f'"id": "s{k}-u'))
    rows = rows_of(shards, shuffle_files=True, seed=1)
    orders = {tuple(rows.file_order(e)) for e in range(6)}
    assert len(orders) > 1 and all(sorted(o) == [0, 1, 2, 3] for o in orders)
    for epoch in (0, 1):
        streamed = [u.id for _, u in rows.iterate(epoch)]
        expected = [f"s{k}-u{i}" for k in rows.file_order(epoch) for i in range(40)]
        assert streamed == expected
    capped = rows_of(shards, shuffle_files=True, seed=1, max_rows=50)
    assert [u.id for _, u in capped.iterate(3)] == [f"s0-u{i}" for i in range(40)] + [f"s1-u{i}" for i in range(10)]


# ------------------------------------------------------------------------------------------ Lhotse input
def test_lhotse_cut_manifest_streams_the_same_utterances(tmp_path: Path) -> None:
    pytest.importorskip("lhotse")
    from qwen3asr_train.tools.lhotse_io import export_lhotse

    rec = write_clip(tmp_path / "rec.wav", 5.0, seed=1)
    source = [
        {"id": "r1", "audio": str(rec), "text": "alpha bravo", "language": "English", "duration": 1.5, "offset": 0.25,
         "context": "bravo", "words": [{"word": "alpha", "start": 0.1, "end": 0.5}, {"word": "bravo", "start": 0.6, "end": 1.2}]},
        {"id": "r2", "audio": str(rec), "text": "你好", "language": "Henan", "duration": 2.0, "offset": 2.5},
        {"id": "r3", "audio": str(rec), "text": "", "no_speech": True, "duration": 1.0},
    ]  # fmt: skip
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in source), encoding="utf-8")
    cuts = Path(export_lhotse(manifest, tmp_path / "lh")["cuts"])
    eager = read_manifest(manifest, RowChecks(LanguageTable()))
    lazy = [u for _, u in rows_of(cuts).iterate(0)]

    def key(u):
        words = [(w.word, round(w.start, 6), round(w.end, 6)) for w in u.words or []]
        return (
            u.id,
            u.audio,
            round(u.offset, 6),
            round(u.duration, 6),
            u.text,
            u.language,
            u.dialect,
            u.context,
            words,
        )

    assert [key(u) for u in lazy] == [key(u) for u in eager]
    assert all(u.source.startswith(f"{cuts}:") for u in lazy)  # errors and rejects name the cut manifest's line


# ------------------------------------------------------------------------------------------ data module
def test_datamodule_lazy_loader_has_windows_and_no_length(manifest: Path) -> None:
    from qwen3asr_train.config.schema import DataConfig

    cfg = DataConfig(train=[str(manifest)], lazy=True, num_workers=0, max_batch_seconds=8.0, max_batch_size=6)
    cfg.bucket_buffer_size, cfg.bucket_estimate_rows = 200, 50
    cfg.validate()
    data = load_train_data(cfg, seed=0)
    assert len(data.utterances) == 50 and data.lazy is not None  # only the head was read at start
    assert data.plan_extra()["lazy_data"]["files"][0]["bytes"] == manifest.stat().st_size

    def collate(samples, epoch):
        return {"num_target_tokens": len(samples), "ids": [s.utt.id for s in samples]}

    dm = ASRDataModule(cfg, data.dataset(cfg), collate, accumulate=2, seed=0)
    loader = dm.train_dataloader()
    assert isinstance(loader, WindowedLoader) and isinstance(dm.train_set, LazyDataset)
    with pytest.raises(TypeError):
        len(loader)
    with pytest.raises(TypeError, match="trainer.max_steps"):
        dm.micro_batches_per_epoch()
    batches = list(loader)
    assert sorted(i for b in batches for i in b["ids"]) == sorted(f"u{i}" for i in range(1000))
    for a, b in zip(batches[::2], batches[1::2], strict=False):  # window-level token normalisation
        assert a["window_target_tokens"] == b["window_target_tokens"] == a["num_target_tokens"] + b["num_target_tokens"]
    assert [b["position"][1] for b in batches] == list(range(len(batches)))
    assert loader.state_dict() == {
        "epoch": 0,
        "micro": 0,
        "stream": "lazy",
    }  # DataPositionTracker moves it, not prefetching


def test_eager_only_stages_refuse_lazy_data(manifest: Path) -> None:
    from qwen3asr_train.config.schema import DataConfig
    from qwen3asr_train.data.datamodule import load_train_utterances

    cfg = DataConfig(train=[str(manifest)], lazy=True)
    cfg.validate()
    with pytest.raises(ValueError, match="SFT-only"):
        load_train_utterances(cfg)


def _needs_stage_support() -> None:
    import inspect

    from qwen3asr_train.stages import sft

    if "load_train_data" not in inspect.getsource(sft.prepare):
        pytest.skip("stages/sft.py does not call load_train_data yet (docs/data.md, 'Large corpora')")


def test_sft_lazy_preempt_and_resume_is_exact(manifest_dir: Path, tmp_path: Path) -> None:
    """A lazy SFT run stopped by SIGTERM mid-epoch and resumed ends with the uninterrupted run's weights and losses."""
    import signal

    from qwen3asr_train.stages import sft
    from qwen3asr_train.training import Preempted, fit
    from tests.conftest import make_config, tiny_sft_overrides
    from tests.test_fault_handling import SignalAt, _losses, _weights, assert_same_weights

    _needs_stage_support()
    common = (
        "data=lazy",
        "trainer.max_steps=6",
        "trainer.accumulate_grad_batches=2",
        "data.max_batch_seconds=4",
        "recipe.export_on_end=false",
        "recipe.context_prob=0.5",
    )
    full = tmp_path / "full"
    sft.run(make_config(tiny_sft_overrides(manifest_dir, full, *common)))
    part = tmp_path / "part"
    cfg = make_config(tiny_sft_overrides(manifest_dir, part, *common, "trainer.checkpoint_every_n_steps=100"))
    module, datamodule, trainer, _ = sft.prepare(cfg, [SignalAt(3, signal.SIGTERM)])
    with pytest.raises(Preempted):
        fit(trainer, module, datamodule=datamodule)
    state = datamodule.trainer.train_dataloader.state_dict()
    assert state["micro"] > 0, "the checkpoint must be mid-epoch for this test to mean something"
    sft.run(make_config(tiny_sft_overrides(manifest_dir, part, *common, "recipe.resume_from=auto")))
    assert_same_weights(_weights(full / "checkpoints" / "last.ckpt"), _weights(part / "checkpoints" / "last.ckpt"))
    assert _losses(part) == _losses(full)


# ------------------------------------------------------------------------------------------ scale (slow)
def start_cost(path: Path, trace: bool) -> float:
    """Seconds to the first window of a fresh lazy sampler on ``path`` (``trace=False``), or its peak traced
    memory in bytes (``trace=True``; tracemalloc slows Python several-fold, so time is measured without it)."""
    gc.collect()
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    sampler = LazyWindowSampler(
        rows_of(path), 60.0, 32, window=2, num_buckets=8, seed=0, buffer_size=4000, estimate_rows=2000
    )
    window = next(iter(sampler))
    seconds = time.perf_counter() - t0
    assert len(window.micro_batches) == 2
    if not trace:
        return seconds
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return float(peak)


@pytest.mark.slow
def test_start_cost_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    """10k vs 1M rows: time to the first window and peak memory stay flat (the eager path reads every row)."""
    small = write_rows(tmp_path / "small.jsonl", 10_000)
    t0 = time.perf_counter()
    big = write_rows(tmp_path / "big.jsonl", 1_000_000)
    write_seconds = time.perf_counter() - t0
    start_cost(small, trace=False)  # warm imports and the page cache
    small_s, big_s = start_cost(small, trace=False), start_cost(big, trace=False)
    small_peak, big_peak = start_cost(small, trace=True), start_cost(big, trace=True)
    # the eager reader on the small manifest, for scale (it reads and keeps every row)
    gc.collect()
    t0 = time.perf_counter()
    eager = read_manifest(small, RowChecks(LanguageTable()))
    eager_s = time.perf_counter() - t0
    log.info(
        f"lazy start: 10k rows {small_s:.2f} s / {small_peak / 2**20:.1f} MiB peak; 1M rows {big_s:.2f} s / "
        f"{big_peak / 2**20:.1f} MiB peak (1M manifest written in {write_seconds:.1f} s, "
        f"{big.stat().st_size / 2**20:.0f} MiB); eager read of 10k rows {eager_s:.2f} s ({len(eager)} rows)"
    )
    assert big_s / small_s < 3
    assert big_peak - small_peak < 8 * 2**20


def _sft_start(manifest: Path, run_dir: Path) -> tuple[float, float, float]:
    """A real ``recipe=sft model=tiny`` lazy run of 2 steps: (seconds to prepare, seconds to step 2, RSS growth MiB)."""
    from qwen3asr_train import training
    from qwen3asr_train.stages import sft
    from tests.conftest import make_config

    overrides = [
        "recipe=sft",
        "model=tiny",
        f"data.train={manifest}",
        "data=lazy",
        "data.num_workers=0",
        "data.max_batch_seconds=6",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        f"run_dir={run_dir}",
    ]
    gc.collect()
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    module, datamodule, trainer, _ = sft.prepare(make_config(overrides))
    prepared = time.perf_counter() - t0
    training.fit(trainer, module, datamodule=datamodule)
    assert trainer.global_step == 2
    return prepared, time.perf_counter() - t0, _rss_mib() - rss0


@pytest.mark.slow
def test_sft_starts_on_a_million_rows(tmp_path: Path) -> None:
    """A real ``recipe=sft model=tiny`` run (2 steps) on 1M rows starts as fast as on 10k rows."""
    _needs_stage_support()
    small = write_rows(tmp_path / "small.jsonl", 10_000)
    big = write_rows(tmp_path / "big.jsonl", 1_000_000)
    _sft_start(small, tmp_path / "warm")  # imports, tokenizer training code paths, page cache
    small_prep, small_total, small_rss = _sft_start(small, tmp_path / "small")
    big_prep, big_total, big_rss = _sft_start(big, tmp_path / "big")
    log.info(
        f"sft, 2 steps: 10k rows prepare {small_prep:.1f} s, step 2 after {small_total:.1f} s, RSS +{small_rss:.0f} MiB; "
        f"1M rows prepare {big_prep:.1f} s, step 2 after {big_total:.1f} s, RSS +{big_rss:.0f} MiB "
        f"(process RSS {_rss_mib():.0f} MiB)"
    )
    assert big_total / small_total < 3
    assert big_rss < small_rss + 256


def _rss_mib() -> float:
    """Resident memory of this process in MiB (Linux /proc)."""
    with open(f"/proc/{os.getpid()}/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
