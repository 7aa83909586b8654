"""Duration relabelling of aligned spans (``eval/durations.py``).

Independent references: the duration table against values worked out by hand; the dynamic programme against
brute-force enumeration of every move sequence, scored by a cost written out again here from the documented
formula; relabelling against spans built from known word lengths, then slipped by one word the way the
aligner slips (two words on one span, every later word on the next word's span).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qwen3asr_train.config.base import ConfigError
from qwen3asr_train.config.recipes import DecodeConfig
from qwen3asr_train.data.manifest import ManifestError
from qwen3asr_train.eval import durations
from qwen3asr_train.eval.durations import DurationTable, Relabel, relabel_all, relabel_spans


def test_the_table_by_hand(tmp_path):
    utterances = [
        [("ab", 0.0, 0.3), ("abcd", 0.3, 0.6)],  # rate 0.6 s / 6 chars = 0.1: ab 0.3/0.2 = 1.5, abcd 0.3/0.4 = 0.75
        [("AB", 1.0, 1.1), ("xyz", 1.1, 1.4)],  # rate 0.4 / 5 = 0.08: AB 0.1/0.16 = 0.625, xyz 0.3/0.24 = 1.25
    ]
    table = DurationTable.from_utterances(utterances, min_count=1)
    assert table.per_type["ab"] == pytest.approx(2 * math.sqrt(1.5 * 0.625))  # geometric mean, case folded
    assert table.per_type["abcd"] == pytest.approx(4 * 0.75)
    assert table.per_type["xyz"] == pytest.approx(3 * 1.25)
    np.testing.assert_allclose(table.expected(["Ab", "hello", "x-y"]), [2 * math.sqrt(1.5 * 0.625), 5.0, 2.0])
    strict = DurationTable.from_utterances(utterances, min_count=2)
    assert set(strict.per_type) == {"ab"}  # seen twice; the others count their characters
    saved = table.save(tmp_path / "durations.json")
    assert DurationTable.load(saved) == table

    manifest = tmp_path / "train.jsonl"
    rows = [
        {"id": f"u{k}", "words": [{"word": w, "start": a, "end": b} for w, a, b in u]} for k, u in enumerate(utterances)
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows + [{"id": "no-words", "text": "x"}]) + "\n")
    assert DurationTable.load(manifest) == DurationTable.from_utterances(utterances)  # default min_count 5
    assert DurationTable.from_manifest(manifest, min_count=1) == table
    manifest.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"words": [{"word": "a", "start": 0.0}]}) + "\n")
    with pytest.raises(ManifestError, match=r"train\.jsonl: row 2: every word needs"):
        DurationTable.from_manifest(manifest)
    with pytest.raises(ManifestError, match="not found"):
        DurationTable.from_manifest(tmp_path / "missing.jsonl")


def _reference(expected: np.ndarray, rate: float = 0.09, seed: int = 0) -> list[tuple[float, float]]:
    """Spans exactly ``expected x rate`` long, with random pauses of 0-0.15 s between them."""
    rng = np.random.default_rng(seed)
    spans, t = [], 0.3
    for length in expected * rate:
        spans.append((t, t + float(length)))
        t += float(length) + float(rng.uniform(0.0, 0.15))
    return spans


def _expected(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).choice([2.0, 3.0, 4.5, 6.0, 8.0], size=n)


def test_spans_that_fit_their_words_are_kept():
    expected = _expected(30)
    ref = _reference(expected)
    new, moves = relabel_spans(ref, expected, sigma=0.2, penalty=10.0)
    assert moves == []
    assert new == ref


@pytest.mark.parametrize("k", [0, 4, 11])
def test_a_one_word_late_slip_is_undone(k):
    expected = _expected(40)
    ref = _reference(expected)
    # the aligner's slip: words k and k+1 on one span, every later word on the next word's span, the last
    # word squeezed into the second half of the last span
    slipped = ref[:k] + [(ref[k][0], ref[k + 1][1])] + ref[k + 2 :] + [((ref[-1][0] + ref[-1][1]) / 2, ref[-1][1])]
    assert len(slipped) == len(ref)
    new, moves = relabel_spans(slipped, expected, sigma=0.2, penalty=10.0)
    assert [m[0] for m in moves] in (["split", "merge"], ["split", "skip"])
    assert moves[0][1:] == (k, k)
    for j in range(len(ref)):
        if j in (k, k + 1):  # the split cuts the shared span in proportion to the two words' expected lengths
            cut = ref[k][0] + (ref[k + 1][1] - ref[k][0]) * expected[k] / (expected[k] + expected[k + 1])
            want = (ref[k][0], cut) if j == k else (cut, ref[k + 1][1])
            assert new[j] == pytest.approx(want, abs=1e-9)
        elif j < len(ref) - 1:
            assert new[j] == pytest.approx(ref[j], abs=1e-9)
    assert new[-1][0] == pytest.approx(ref[-1][0], abs=1e-9)  # the last word gets its own onset back


def test_a_one_word_early_slip_is_undone_up_to_the_clip_end():
    expected = _expected(40, seed=3)
    ref = _reference(expected, seed=3)
    k = 6
    a, b = ref[k]
    early = ref[:k] + [(a, (a + b) / 2), ((a + b) / 2, b)] + ref[k + 1 : -1]  # word k+1 on the second half of k
    new, moves = relabel_spans(early, expected, sigma=0.2, penalty=10.0)
    assert moves and moves[0] == ("merge", k, k)
    for j in range(len(ref) - 2):  # the clip's last two words share the one span left for them
        assert new[j] == pytest.approx(ref[j], abs=1e-9)


def _brute_cost(spans, expected, sigma, penalty, moves_of_path):
    """Cost of one labelling, written out from the module docstring."""
    starts = np.asarray([a for a, _ in spans])
    ends = np.asarray([b for _, b in spans])
    lengths = np.maximum(ends - starts, durations.MIN_SPAN_S)
    m = len(spans)
    rate = []
    for j in range(m):
        lo, hi = max(0, j - durations.RATE_HALF_WIDTH), min(m, j + durations.RATE_HALF_WIDTH + 1)
        rate.append(lengths[lo:hi].sum() / expected[lo:hi].sum())

    def c(length, size, j):
        return (math.log(max(length, durations.MIN_SPAN_S) / (size * rate[j])) / sigma) ** 2 / 2

    total, i, j = 0.0, 0, 0
    for move in moves_of_path:
        if move == "match":
            total += c(lengths[j], expected[i], j)
            i, j = i + 1, j + 1
        elif move == "split":
            total += 2 * c(lengths[j], expected[i] + expected[i + 1], j) + penalty
            i, j = i + 2, j + 1
        elif move == "merge":
            total += c(ends[j + 1] - starts[j], expected[i], j) + penalty
            i, j = i + 1, j + 2
        else:
            total += penalty
            j += 1
    return total


def _paths(n, m):
    """Every move sequence that labels n words with m spans."""
    steps = {"match": (1, 1), "split": (2, 1), "merge": (1, 2), "skip": (0, 1)}
    out = []

    def walk(i, j, path):
        if (i, j) == (n, m):
            out.append(tuple(path))
            return
        for move, (di, dj) in steps.items():
            if i + di <= n and j + dj <= m and (move == "skip" or i < n):
                walk(i + di, j + dj, path + [move])

    walk(0, 0, [])
    return out


def test_the_programme_finds_the_cheapest_labelling():
    moved = 0
    for seed in range(40):
        moved += _check_cheapest(np.random.default_rng(seed))
    assert moved >= 10  # the cases exercise the other moves, not only one word per span


def _check_cheapest(rng: np.random.Generator) -> bool:
    n = int(rng.integers(2, 6))
    expected = rng.uniform(1.0, 6.0, size=n)
    starts = np.cumsum(rng.uniform(0.05, 0.5, size=n))
    spans = [(float(a), float(a + rng.uniform(0.02, 0.6))) for a in starts]
    sigma, penalty = 0.2, float(rng.uniform(0.0, 2.0))
    new, moves = relabel_spans(spans, expected, sigma, penalty)
    best = min(_brute_cost(spans, expected, sigma, penalty, p) for p in _paths(n, n))
    # rebuild the programme's path from its moves (every other step is a match)
    path, i, j, pending = [], 0, 0, list(moves)
    while (i, j) != (n, n):
        if pending and pending[0][1:] == (i, j):
            move = pending.pop(0)[0]
        else:
            move = "match"
        path.append(move)
        di, dj = {"match": (1, 1), "split": (2, 1), "merge": (1, 2), "skip": (0, 1)}[move]
        i, j = i + di, j + dj
    assert _brute_cost(spans, expected, sigma, penalty, path) == pytest.approx(best, rel=1e-9, abs=1e-9)
    assert len(new) == n
    return bool(moves)


def test_relabel_all_and_the_config(caplog):
    table = DurationTable({}, 5)
    expected = _expected(20)
    words = ["x" * int(e) for e in expected]
    ref = _reference(table.expected(words))
    slipped = ref[:3] + [(ref[3][0], ref[4][1])] + ref[5:] + [((ref[-1][0] + ref[-1][1]) / 2, ref[-1][1])]
    with caplog.at_level("INFO", logger="qwen3asr_train.eval.durations"):
        out = relabel_all([ref, slipped], [words, words], Relabel(table))
    assert out[0] == ref
    assert out[1][:3] == ref[:3] and out[1][5:-1] == ref[5:-1]
    assert "1 of 2 clips changed (2 moves)" in caplog.text
    with pytest.raises(ValueError, match="3 words but 2 spans"):
        relabel_spans(ref[:2], np.ones(3), 0.2, 10.0)
    DecodeConfig(align_relabel_durations="x.jsonl").validate()
    for bad in ({"align_relabel_sigma": 0.0}, {"align_relabel_penalty": -1.0}):
        with pytest.raises(ConfigError, match="align_relabel"):
            DecodeConfig(**bad).validate()


def test_short_lists_pass_through():
    assert relabel_spans([(0.1, 0.2)], np.ones(1), 0.2, 10.0) == ([(0.1, 0.2)], [])
    assert relabel_spans([], np.ones(0), 0.2, 10.0) == ([], [])


def test_every_path_is_enumerated_once():
    # the brute force itself, by hand: 2 words on 2 spans
    assert sorted(_paths(2, 2)) == sorted([("match", "match"), ("split", "skip"), ("skip", "split")])


def test_align_relabels_what_it_aligned(monkeypatch):
    """``align(relabel=...)`` is exactly ``relabel_all`` of the plain alignment (a tiny random model)."""
    from qwen3asr_train.config.schema import ModelConfig
    from qwen3asr_train.eval.align_eval import align
    from qwen3asr_train.model.builder import build_model
    from tests.test_aligner_chain import NUM_CLASSES, _clip

    model, processor = build_model(ModelConfig(source="tiny", task="aligner", num_labels=NUM_CLASSES), seed=0)
    samples = [_clip(6, index=0), _clip(9, seconds_per_word=0.3, index=1)]
    relabel = Relabel(DurationTable({"w1": 9.0}, 5), sigma=0.2, penalty=0.5)
    plain = align(model, processor, samples)
    got = align(model, processor, samples, relabel=relabel)
    assert got == relabel_all(plain, [[w.word for w in s.utt.words] for s in samples], relabel)
    assert len(got) == 2 and [len(g) for g in got] == [6, 9]
