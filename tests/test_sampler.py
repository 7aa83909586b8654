"""DurationWindowSampler: batch limits, coverage, determinism, windows, ranks, mid-epoch resume and
padding efficiency, checked against plain set/list arithmetic."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from qwen3asr_train.data.sampler import DurationWindowSampler, Window


def wide_durations(n: int = 600, seed: int = 0, low: float = 0.5, high: float = 30.0) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(low, high), 3) for _ in range(n)]


def flat(windows: list[Window]) -> list[int]:
    return [i for w in windows for mb in w.micro_batches for i in mb]


def make(durations, **kw) -> DurationWindowSampler:
    args = {"max_seconds": 60.0, "max_batch_size": 16, "window": 1, "num_buckets": 8, "seed": 0}
    args.update(kw)
    return DurationWindowSampler(durations, **args)


# --------------------------------------------------------------------------- batch limits and coverage


@pytest.mark.parametrize(
    ("max_seconds", "max_batch_size", "num_buckets", "window"),
    [(60.0, 16, 8, 1), (60.0, 4, 8, 3), (200.0, 64, 4, 2), (25.0, 8, 1, 1), (45.0, 100, 16, 4)],
)
def test_micro_batches_respect_padded_seconds_and_size(max_seconds, max_batch_size, num_buckets, window):
    durations = wide_durations() + [70.0, 95.5, 40.0, 0.01, 0.01, 29.99]  # some longer than max_seconds
    sampler = make(
        durations, max_seconds=max_seconds, max_batch_size=max_batch_size, num_buckets=num_buckets, window=window
    )
    for epoch in range(3):
        batches = sampler.micro_batches(epoch)
        for mb in batches:
            assert 1 <= len(mb) <= max_batch_size
            longest = max(durations[i] for i in mb)
            if longest > max_seconds:
                assert len(mb) == 1, "an over-long utterance must be alone"
            else:
                assert len(mb) * longest <= max_seconds + 1e-9
        # the same holds for what iteration yields
        sampler.set_epoch(epoch)
        assert [mb for w in sampler for mb in w.micro_batches] == batches


def test_batches_are_filled_not_trivially_small():
    durations = [2.0] * 100
    batches = make(durations, max_seconds=20.0, max_batch_size=64, num_buckets=1).micro_batches(0)
    assert sorted(len(mb) for mb in batches) == [10] * 10
    batches = make(durations, max_seconds=1000.0, max_batch_size=7, num_buckets=1).micro_batches(0)
    assert sorted(len(mb) for mb in batches) == [2] + [7] * 14


def test_distinct_duration_groups_are_not_mixed():
    durations = [1.0] * 50 + [10.0] * 50
    random.Random(0).shuffle(durations)
    batches = make(durations, max_seconds=40.0, max_batch_size=64, num_buckets=2).micro_batches(0)
    assert all(len({durations[i] for i in mb}) == 1 for mb in batches)
    assert sorted(len(mb) for mb in batches) == [2] + [4] * 12 + [10, 40]


@pytest.mark.parametrize("window", [1, 3])
def test_each_epoch_covers_every_index_once(window):
    durations = wide_durations(n=501, seed=1)
    sampler = make(durations, window=window)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        indices = flat(list(sampler))
        assert sorted(indices) == list(range(len(durations)))


def test_tiny_dataset_and_more_buckets_than_items():
    sampler = make([3.0, 1.0, 2.0], num_buckets=8, window=4)
    windows = list(sampler)
    assert len(windows) == 1 and sorted(flat(windows)) == [0, 1, 2]


def test_no_durations_is_an_error():
    with pytest.raises(ValueError, match="no utterances"):
        make([])


# --------------------------------------------------------------------------- determinism


def test_same_seed_and_epoch_give_the_same_plan():
    durations = wide_durations()
    a, b = make(durations, seed=7, window=2), make(durations, seed=7, window=2)
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
        assert list(a) == list(a)  # re-iterating the same epoch repeats it


def test_different_epoch_or_seed_changes_the_order():
    durations = wide_durations()
    a = make(durations, seed=7)
    plans = [a.micro_batches(e) for e in range(4)]
    for p, q in itertools.combinations(plans, 2):
        assert p != q
        assert sorted(itertools.chain(*p)) == sorted(itertools.chain(*q))
    assert make(durations, seed=8).micro_batches(0) != plans[0]


def test_plan_does_not_depend_on_cache_or_call_order():
    durations = wide_durations()
    a, b = make(durations), make(durations)
    a.micro_batches(5)
    a.micro_batches(2)
    assert a.micro_batches(3) == b.micro_batches(3)


def test_no_shuffle_is_sorted_by_duration():
    durations = wide_durations(n=100)
    sampler = make(durations, shuffle=False, num_buckets=4)
    order = [i for mb in sampler.micro_batches(0) for i in mb]
    assert [durations[i] for i in order] == sorted(durations)
    assert sampler.micro_batches(0) == make(durations, shuffle=False, num_buckets=4).micro_batches(9)


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("window", [1, 2, 5])
def test_windows_group_consecutive_micro_batches(window):
    durations = wide_durations(n=333, seed=2)
    sampler = make(durations, window=window)
    windows = sampler.windows(0)
    batches = sampler.micro_batches(0)
    assert [mb for w in windows for mb in w.micro_batches] == batches
    assert all(len(w.micro_batches) == window for w in windows[:-1])
    assert 1 <= len(windows[-1].micro_batches) <= window  # alone, the last window may be partial
    assert [w.first_micro for w in windows] == list(range(0, len(batches), window))
    assert all(w.epoch == 0 for w in windows)
    assert len(sampler) == len(windows) == -(-len(batches) // window)
    assert sampler.num_micro_batches() == len(batches)


# --------------------------------------------------------------------------- several ranks


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_ranks_are_disjoint_equal_and_complete(world_size, window, caplog):
    durations = wide_durations(n=457, seed=3)
    samplers = [make(durations, window=window, rank=r, world_size=world_size) for r in range(world_size)]
    all_batches = samplers[0].micro_batches(1)
    for s in samplers:
        s.set_epoch(1)
    with caplog.at_level("INFO", logger="qwen3asr_train.data.sampler"):
        per_rank = [list(s) for s in samplers]

    # every window is full and every rank has the same number of micro-batches
    counts = {sum(len(w.micro_batches) for w in ws) for ws in per_rank}
    assert len(counts) == 1
    assert all(len(w.micro_batches) == window for ws in per_rank for w in ws)
    assert all(len(ws) == len(samplers[r]) for r, ws in enumerate(per_rank))

    # disjoint
    index_sets = [set(flat(ws)) for ws in per_rank]
    assert sum(len(s) for s in index_sets) == len(set().union(*index_sets))

    # union + dropped = everything; exactly the tail of the plan that does not fill a round of windows
    used = counts.pop() * world_size
    dropped = all_batches[used:]
    assert len(dropped) == len(all_batches) % (window * world_size)
    dropped_indices = [i for mb in dropped for i in mb]
    assert sorted(set().union(*index_sets) | set(dropped_indices)) == list(range(len(durations)))
    assert not set(dropped_indices) & set().union(*index_sets)

    # round-robin: rank r gets windows r, r + W, ... of the common plan
    grouped = [all_batches[i : i + window] for i in range(0, used, window)]
    for r, ws in enumerate(per_rank):
        assert [list(w.micro_batches) for w in ws] == grouped[r::world_size]
        assert [w.first_micro for w in ws] == [k * window for k in range(len(ws))]

    if dropped:
        assert f"dropped {len(dropped)} micro-batches" in caplog.text
    else:
        assert "dropped" not in caplog.text


def test_too_few_micro_batches_for_the_ranks():
    sampler = make([1.0] * 6, max_seconds=10.0, window=2, rank=0, world_size=2)  # one micro-batch
    with pytest.raises(ValueError, match="micro-batches for 2 ranks"):
        list(sampler)


# --------------------------------------------------------------------------- resume


def consumed_through(windows: list[Window], k: int) -> int:
    """The rank-local index of the last micro-batch of window ``k - 1``."""
    last = windows[k - 1]
    return last.first_micro + len(last.micro_batches) - 1


@pytest.mark.parametrize("k", [1, 4, 9])
@pytest.mark.parametrize("epoch", [0, 2])
def test_resume_continues_with_exactly_the_remaining_windows(epoch, k):
    durations = wide_durations(n=400, seed=4)
    first = make(durations, window=3, seed=11)
    first.set_epoch(epoch)
    windows = list(first)
    assert len(windows) > k
    for w in windows[:k]:
        for m in range(len(w.micro_batches)):
            first.mark_consumed(epoch, w.first_micro + m)
    state = first.state_dict()
    assert state == {"epoch": epoch, "micro": consumed_through(windows, k) + 1}

    resumed = make(durations, window=3, seed=11)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)
    assert list(resumed) == windows[k:]
    assert resumed.state_dict() == state
    # the resume point is used once: the next iteration of the epoch is whole again
    assert list(resumed) == windows
    # and the next epoch starts from its beginning
    resumed.set_epoch(epoch + 1)
    assert sorted(flat(list(resumed))) == list(range(len(durations)))


def test_resume_after_the_last_window_yields_nothing():
    durations = wide_durations(n=200, seed=5)
    sampler = make(durations, window=2)
    windows = list(sampler)
    sampler.mark_consumed(0, consumed_through(windows, len(windows)))
    resumed = make(durations, window=2)
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == []


def test_resume_inside_a_window_restarts_that_window(caplog):
    durations = wide_durations(n=400, seed=6)
    sampler = make(durations, window=3)
    windows = list(sampler)
    sampler.mark_consumed(0, windows[5].first_micro)  # one micro-batch into window 5
    resumed = make(durations, window=3)
    resumed.load_state_dict(sampler.state_dict())
    with caplog.at_level("WARNING", logger="qwen3asr_train.data.sampler"):
        assert list(resumed) == windows[5:]
    assert "inside a window" in caplog.text


def test_resume_point_from_another_epoch_is_ignored():
    durations = wide_durations(n=300, seed=7)
    sampler = make(durations, window=2)
    windows0 = list(sampler)
    sampler.mark_consumed(0, consumed_through(windows0, 3))
    resumed = make(durations, window=2)
    resumed.load_state_dict(sampler.state_dict())
    resumed.set_epoch(1)
    full1 = make(durations, window=2).windows(1)
    assert list(resumed) == full1


@pytest.mark.parametrize("world_size", [2, 3])
def test_resume_on_each_rank(world_size):
    durations = wide_durations(n=500, seed=8)
    k = 2
    for rank in range(world_size):
        first = make(durations, window=2, rank=rank, world_size=world_size)
        first.set_epoch(1)
        windows = list(first)
        first.mark_consumed(1, consumed_through(windows, k))
        resumed = make(durations, window=2, rank=rank, world_size=world_size)
        resumed.load_state_dict(first.state_dict())
        resumed.set_epoch(1)
        assert list(resumed) == windows[k:]


# --------------------------------------------------------------------------- padding efficiency


def padded_fraction(batches, durations) -> float:
    padded = sum(len(mb) * max(durations[i] for i in mb) for mb in batches)
    return 1.0 - sum(durations[i] for mb in batches for i in mb) / padded


def test_bucketing_pads_much_less_than_random_batching():
    durations = wide_durations(n=2000, seed=9, low=0.5, high=30.0)
    bucketed = make(durations, max_seconds=120.0, max_batch_size=64, num_buckets=16).micro_batches(0)
    # random batching: one bucket, i.e. the same greedy fill over a shuffled order
    unbucketed = make(durations, max_seconds=120.0, max_batch_size=64, num_buckets=1).micro_batches(0)
    # and the textbook baseline: fixed-size random batches of the bucketed plan's mean size
    rng = np.random.default_rng(0)
    order = rng.permutation(len(durations)).tolist()
    size = max(1, round(len(durations) / len(bucketed)))
    fixed = [order[i : i + size] for i in range(0, len(order), size)]

    f_bucketed = padded_fraction(bucketed, durations)
    f_unbucketed = padded_fraction(unbucketed, durations)
    f_fixed = padded_fraction(fixed, durations)
    assert f_bucketed < 0.1
    assert f_unbucketed > 0.3 and f_fixed > 0.3
    assert f_bucketed < f_unbucketed / 4 and f_bucketed < f_fixed / 4
    # bucketing also needs fewer micro-batches for the same padded-seconds limit
    assert len(bucketed) < len(unbucketed)


def test_golden_batch_plans_are_unchanged():
    """Plans recorded before the two batchers became one (``pack_by_duration``): training order and the
    evaluation plan must not move when the code does."""
    from qwen3asr_train.eval.decode import duration_batches

    d = [1.0, 2.5, 0.7, 3.2, 1.1, 2.2, 0.9, 4.0]
    sampler = DurationWindowSampler(d, 6.0, 3, num_buckets=2, seed=7)
    assert sampler.micro_batches(0) == [(7,), (1,), (4, 2, 0), (3,), (5,), (6,)]
    assert sampler.micro_batches(1) == [(7,), (5,), (4, 2, 0), (6,), (1,), (3,)]
    assert duration_batches(d, 6.0, 3) == [[2, 6, 0], [4, 5], [1], [3], [7]]
