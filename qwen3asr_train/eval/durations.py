"""Word-duration relabelling of aligned spans: undo a one-word slip of the aligner with a duration model.

Why this exists: a small aligner trained from scratch finds word *onsets* well but does not know which word it
hears (docs/aligner.md, chained windows). Where it cannot hear a boundary (a vowel-initial word right after a
vowel: "day eat"), it puts the second word on the next onset, the third on the one after, and so on: the
spans it returns are the right audio segments, only labelled one word late. Inside a chain of windows on a
long clip, that slip stays to the end of the clip. The word *texts* still say which labelling is right,
through durations: "day" spans two words' worth of audio, and from there every span has the length of the
word after its label. This module scores labellings by how well each word's span length matches the word's
expected length, and moves labels where a whole stretch of words fits much better shifted.

* :class:`DurationTable`: each word type's expected length relative to its utterance's speaking rate, in
  *character equivalents* (a word whose type was seen fewer than ``min_count`` times counts its characters),
  learnt from a manifest with word times (the aligner's training manifest: MFA or synthetic labels).
* :func:`relabel_spans`: the best labelling of the spans by an exact dynamic programme over four moves per
  step: *match* (word i takes span j), *split* (words i, i+1 share span j, cut in proportion to their expected
  lengths), *merge* (word i takes spans j, j+1) and *skip* (span j belongs to no word). Each word's cost is
  ``(log(length / expected) / sigma)^2 / 2`` with the expected length scaled by the local speaking rate (the
  spans around it), and each move other than *match* costs ``penalty`` more, so a label moves only where the
  durations of many following words agree that it should.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen3asr_train.config.recipes import DecodeConfig
from qwen3asr_train.data.manifest import ManifestError, read_jsonl

log = logging.getLogger(__name__)

Span = tuple[float, float]

MIN_SPAN_S = 0.01
"""Span lengths are floored at this many seconds (an aligner may give a short word a zero-length span)."""

RATE_HALF_WIDTH = 4
"""The local speaking rate at span j is taken over the spans j - 4 .. j + 4 (and the words at those places)."""

BAND = 8
"""Labels move at most this many places from their span's index (the dynamic programme's band)."""


def _characters(word: str) -> int:
    return max(1, sum(ch.isalnum() for ch in word))


def _key(word: str) -> str:
    return word.casefold()


@dataclass
class DurationTable:
    """Expected word lengths in character equivalents (see the module docstring)."""

    per_type: dict[str, float] = field(default_factory=dict)
    """Word type (case-folded) -> expected length; types seen fewer than ``min_count`` times are absent."""
    min_count: int = 5

    def expected(self, words: Sequence[str]) -> np.ndarray:
        """``(N,)`` expected lengths of ``words`` (a word type not in the table counts its characters)."""
        return np.asarray([self.per_type.get(_key(w), float(_characters(w))) for w in words], dtype=np.float64)

    @classmethod
    def from_utterances(
        cls, utterances: Iterable[Sequence[tuple[str, float, float]]], min_count: int = 5
    ) -> DurationTable:
        """Learn the table from utterances given as ``(word, start, end)`` rows.

        A word's relative length is ``log(length / (characters x rate))``, ``rate`` = the utterance's audible
        seconds per character; a type's expected length is its characters times the exponential of its mean
        relative length. Why relative to the utterance: speakers and speaking rates differ by ±25% between
        utterances, more than word types differ from their character counts."""
        sums: dict[str, list[float]] = defaultdict(list)
        for words in utterances:
            if not words:
                continue
            lengths = np.asarray([max(end - start, MIN_SPAN_S) for _, start, end in words])
            chars = np.asarray([_characters(w) for w, _, _ in words], dtype=np.float64)
            rate = lengths.sum() / chars.sum()
            for (word, _, _), length, count in zip(words, lengths, chars, strict=True):
                sums[_key(word)].append(math.log(length / (count * rate)))
        per_type = {
            word: _characters(word) * math.exp(float(np.mean(values)))
            for word, values in sums.items()
            if len(values) >= min_count
        }
        return cls(per_type, min_count)

    @classmethod
    def from_manifest(cls, path: str | Path, min_count: int = 5) -> DurationTable:
        """The table of a JSONL manifest whose rows carry ``words`` with times; rows without words are skipped
        (counted in the log); a malformed row raises :class:`ManifestError` naming ``path:line``."""
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"{path}: duration manifest not found", "manifest_missing")
        utterances, skipped = [], 0
        for line, row in enumerate(read_jsonl(path), 1):
            words = row.get("words") if isinstance(row, dict) else None
            if not words:
                skipped += 1
                continue
            try:
                utterances.append([(str(w["word"]), float(w["start"]), float(w["end"])) for w in words])
            except (KeyError, TypeError, ValueError):
                raise ManifestError(
                    f"{path}: row {line}: every word needs 'word', 'start', 'end'", "bad_words"
                ) from None
        if not utterances:
            raise ManifestError(f"{path}: no rows with word times to learn durations from", "empty_manifest")
        table = cls.from_utterances(utterances, min_count)
        log.info(
            "duration table from %s: %d utterances (%d without word times skipped), %d word types seen >= %d times",
            path,
            len(utterances),
            skipped,
            len(table.per_type),
            min_count,
        )
        return table

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"min_count": self.min_count, "per_type": self.per_type}, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> DurationTable:
        """A table written by :meth:`save` (``.json``) or learnt from a manifest (any other suffix)."""
        path = Path(path)
        if path.suffix != ".json":
            return cls.from_manifest(path)
        data = json.loads(path.read_text())
        return cls({str(k): float(v) for k, v in data["per_type"].items()}, int(data["min_count"]))


@dataclass(frozen=True)
class Relabel:
    """``decode.align_relabel_*``: the table and the two costs of :func:`relabel_spans`."""

    table: DurationTable
    sigma: float = 0.2
    penalty: float = 10.0


def relabel_spans(
    spans: Sequence[Span], expected: np.ndarray, sigma: float, penalty: float
) -> tuple[list[Span], list[tuple[str, int, int]]]:
    """The labelling of ``spans`` (one per word, as an aligner returns them) that best fits ``expected``.

    Returns the words' new spans and the moves other than *match* as ``(move, word, span)``. See the module
    docstring for the moves and costs. The rate at span j is ``sum(lengths) / sum(expected)`` over the spans
    and words at j - :data:`RATE_HALF_WIDTH` .. j + :data:`RATE_HALF_WIDTH` (the same indices for both, so it
    barely depends on the labelling being scored). Exact within a band of :data:`BAND` places."""
    n, m = len(expected), len(spans)
    if n != m:
        raise ValueError(f"relabel: {n} words but {m} spans")
    if n < 2:
        return [(float(a), float(b)) for a, b in spans], []
    starts = np.asarray([a for a, _ in spans], dtype=np.float64)
    ends = np.asarray([b for _, b in spans], dtype=np.float64)
    lengths = np.maximum(ends - starts, MIN_SPAN_S)
    want = np.asarray(expected, dtype=np.float64)
    cum_len = np.concatenate([[0.0], np.cumsum(lengths)])
    cum_want = np.concatenate([[0.0], np.cumsum(want)])
    lo = np.maximum(np.arange(m) - RATE_HALF_WIDTH, 0)
    hi = np.minimum(np.arange(m) + RATE_HALF_WIDTH + 1, m)
    rate = (cum_len[hi] - cum_len[lo]) / (cum_want[hi] - cum_want[lo])
    scale = 2.0 * sigma * sigma

    def cost(length: float, size: float, j: int) -> float:
        return math.log(max(length, MIN_SPAN_S) / (size * rate[j])) ** 2 / scale

    inf = math.inf
    best = np.full((n + 1, m + 1), inf)
    step: dict[tuple[int, int], tuple[int, int, str]] = {}
    best[0, 0] = 0.0

    def relax(i: int, j: int, value: float, frm: tuple[int, int, str]) -> None:
        if abs(i - j) <= BAND and value < best[i, j]:
            best[i, j] = value
            step[(i, j)] = frm

    for i in range(n + 1):
        for j in range(max(0, i - BAND), min(m, i + BAND) + 1):
            here = best[i, j]
            if here == inf:
                continue
            if i < n and j < m:
                relax(i + 1, j + 1, here + cost(lengths[j], want[i], j), (i, j, "match"))
            if i + 1 < n and j < m:
                both = 2.0 * cost(lengths[j], want[i] + want[i + 1], j)
                relax(i + 2, j + 1, here + both + penalty, (i, j, "split"))
            if i < n and j + 1 < m:
                relax(i + 1, j + 2, here + cost(ends[j + 1] - starts[j], want[i], j) + penalty, (i, j, "merge"))
            if j < m:
                relax(i, j + 1, here + penalty, (i, j, "skip"))
    out: list[Span] = [(0.0, 0.0)] * n
    moves: list[tuple[str, int, int]] = []
    i, j = n, m
    while (i, j) != (0, 0):
        pi, pj, move = step[(i, j)]
        if move == "match":
            out[pi] = (float(starts[pj]), float(ends[pj]))
        elif move == "split":
            cut = float(starts[pj] + lengths[pj] * want[pi] / (want[pi] + want[pi + 1]))
            out[pi], out[pi + 1] = (float(starts[pj]), cut), (cut, float(ends[pj]))
        elif move == "merge":
            out[pi] = (float(starts[pj]), float(ends[pj + 1]))
        if move != "match":
            moves.append((move, pi, pj))
        i, j = pi, pj
    return out, moves[::-1]


def relabel_all(spans: Sequence[Sequence[Span]], words: Sequence[Sequence[str]], relabel: Relabel) -> list[list[Span]]:
    """:func:`relabel_spans` on every clip (words and spans of each); logs how many clips changed."""
    out, changed, moves = [], 0, 0
    for clip_spans, clip_words in zip(spans, words, strict=True):
        new, edits = relabel_spans(clip_spans, relabel.table.expected(clip_words), relabel.sigma, relabel.penalty)
        out.append(new)
        changed += bool(edits)
        moves += len(edits)
    log.info("duration relabelling: %d of %d clips changed (%d moves)", changed, len(out), moves)
    return out


def relabel_from_decode(decode: DecodeConfig) -> Relabel | None:
    """The relabelling of ``decode.align_relabel_*``; ``None`` when ``align_relabel_durations`` is empty."""
    if not decode.align_relabel_durations:
        return None
    table = DurationTable.load(decode.align_relabel_durations)
    return Relabel(table, decode.align_relabel_sigma, decode.align_relabel_penalty)
