"""Error rates, alignments, output parsing, repetition detection and LID/no-speech statistics.

Why this module exists: evaluation and the RL reward must score the same way (same normaliser, same
error units, same edge cases), and the pitfalls of off-the-shelf tools bite exactly on the items RL
produces: jiwer returns the insertion *count* for an empty reference, error rates are unbounded, and
upstream's output parser silently deletes repetition loops. Everything here is a pure function or a
small accumulator, with no model code.

Conventions:

* Error units: ``"word"`` (whitespace-split, WER), ``"char"`` (every non-space code point, CER) or
  ``"mixed"`` (mixed error rate for code-switched text: each CJK/kana/hangul/Thai character is one unit,
  each other run of non-space characters, e.g. a Latin word, is one unit). By default the unit follows
  :func:`qwen3asr_train.languages.metric_for_language`; ``unit="mixed"`` forces MER.
* Rates are corpus-level: summed errors over summed reference units. Rates above 1 are real and
  reported; :func:`capped_error_rate` (``min(ER, 1)``) is the reward-side variant.
* An empty (normalised) reference is a no-speech item: it is correct when the hypothesis is empty too,
  else a hallucination. Its inserted units go to ``hallucinated_units``, never into the error rate, so
  no rate is ever divided by zero.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast

import regex
from rapidfuzz.distance import Levenshtein

from qwen3asr_train.data.prompts import (
    MALFORMED,
    ParsedOutput,
    parse_asr_output,
    strip_end_tokens,
)
from qwen3asr_train.eval.normalize import CHAR_SCRIPT_CLASS, NORMALIZER_VERSION, NormalizerOptions, check_language
from qwen3asr_train.languages import NO_SPEECH, metric_for_language

logger = logging.getLogger(__name__)

Unit = Literal["word", "char", "mixed"]
UNITS: tuple[str, ...] = ("word", "char", "mixed")
METRIC_NAMES: dict[str, str] = {"word": "wer", "char": "cer", "mixed": "mer"}


_MIXED_TOKEN = regex.compile(rf"[{CHAR_SCRIPT_CLASS}]|[^\s{CHAR_SCRIPT_CLASS}]+")


# --------------------------------------------------------------------------------------------- units


def unit_for_language(language: str | None, unit: str | None = None) -> Unit:
    """The error unit: ``unit`` when given (validated), else ``"char"`` for CER languages, ``"word"`` otherwise."""
    if unit is None:
        return "char" if metric_for_language(check_language(language)) == "cer" else "word"
    if unit not in UNITS:
        raise ValueError(f"unknown error unit {unit!r}; expected one of {UNITS} or None (by language)")
    return cast(Unit, unit)


def tokenize(text: str, unit: str) -> list[str]:
    """Split (normalised) text into error units: words, characters (spaces skipped) or mixed units."""
    if unit == "word":
        return text.split()
    if unit == "char":
        return [c for c in text if not c.isspace()]
    if unit == "mixed":
        return _MIXED_TOKEN.findall(text)
    raise ValueError(f"unknown error unit {unit!r}; expected one of {UNITS}")


# ------------------------------------------------------------------------------------------ counting


@dataclass
class ErrorCounts:
    """Edit-distance counts, summable with ``+`` (and ``sum``) for corpus-level rates.

    Attributes:
        substitutions: reference units replaced by a different hypothesis unit.
        deletions: reference units missing from the hypothesis.
        insertions: hypothesis units with no reference counterpart (items with a non-empty reference).
        hits: reference units matched exactly.
        utterances: number of scored items.
        empty_refs: items whose normalised reference is empty (no-speech items).
        hallucinations: empty-reference items with a non-empty hypothesis.
        hallucinated_units: hypothesis units of those items (kept out of ``insertions``).
    """

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0
    utterances: int = 0
    empty_refs: int = 0
    hallucinations: int = 0
    hallucinated_units: int = 0

    @property
    def ref_units(self) -> int:
        """Reference units scored: S + D + H."""
        return self.substitutions + self.deletions + self.hits

    @property
    def hyp_units(self) -> int:
        """Hypothesis units on non-empty-reference items: S + I + H."""
        return self.substitutions + self.insertions + self.hits

    @property
    def errors(self) -> int:
        """S + D + I."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def hallucination_rate(self) -> float:
        """Hallucinated items / empty-reference items (0.0 when there are none)."""
        return self.hallucinations / self.empty_refs if self.empty_refs else 0.0

    @property
    def rate(self) -> float:
        """(S + D + I) / reference units; may exceed 1.

        With no reference units at all (only no-speech items) the rate is the hallucination rate, so a
        single no-speech item scores 0.0 (correct) or 1.0 (hallucinated), never infinity.
        """
        return self.errors / self.ref_units if self.ref_units else self.hallucination_rate

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        if not isinstance(other, ErrorCounts):
            return NotImplemented
        return ErrorCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __radd__(self, other: object) -> ErrorCounts:
        if other == 0:  # lets sum(list_of_counts) work
            return self
        return NotImplemented

    def as_dict(self) -> dict[str, Any]:
        """Counts plus derived ``ref_units``, ``rate`` and ``hallucination_rate``."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(ref_units=self.ref_units, rate=self.rate, hallucination_rate=self.hallucination_rate)
        return out


def capped_error_rate(counts_or_rate: ErrorCounts | float) -> float:
    """``min(ER, 1)``: the bounded error rate rewards use (garbage never ranks below an empty output)."""
    rate = counts_or_rate.rate if isinstance(counts_or_rate, ErrorCounts) else float(counts_or_rate)
    return min(rate, 1.0)


# ----------------------------------------------------------------------------------------- alignment

Op = Literal["hit", "sub", "del", "ins"]


@dataclass(frozen=True)
class AlignOp:
    """One alignment step: ``ref`` is ``None`` for insertions, ``hyp`` is ``None`` for deletions."""

    op: Op
    ref: str | None
    hyp: str | None


def align(ref: list[str], hyp: list[str]) -> list[AlignOp]:
    """Minimum-edit-distance alignment (unit costs) of two token lists, by rapidfuzz.

    Why rapidfuzz: it is what jiwer (the field's reference scorer) runs, in C++, so our S/D/I split and
    ``errs`` lines equal jiwer's, including how ties between equally short alignments are broken, and the
    GSPO reward path no longer runs a Python dynamic programme per completion.
    """
    ops: list[AlignOp] = []
    for tag, i1, i2, j1, j2 in Levenshtein.opcodes(ref, hyp):
        if tag == "equal":
            ops += [AlignOp("hit", r, r) for r in ref[i1:i2]]
        elif tag == "replace":
            ops += [AlignOp("sub", r, h) for r, h in zip(ref[i1:i2], hyp[j1:j2], strict=True)]
        elif tag == "delete":
            ops += [AlignOp("del", r, None) for r in ref[i1:i2]]
        else:
            ops += [AlignOp("ins", None, h) for h in hyp[j1:j2]]
    return ops


def format_alignment(alignment: Iterable[AlignOp], joiner: str = " ") -> str:
    """icefall-style ``errs`` line: hits as the token, errors as ``(ref->hyp)`` with ``*`` for nothing."""
    parts = []
    for a in alignment:
        if a.op == "hit":
            parts.append(str(a.ref))
        else:
            parts.append(f"({'*' if a.ref is None else a.ref}->{'*' if a.hyp is None else a.hyp})")
    return joiner.join(parts)


def count_alignment(alignment: Iterable[AlignOp]) -> ErrorCounts:
    """Counts of one non-empty-reference item from its alignment."""
    ops = Counter(a.op for a in alignment)
    return ErrorCounts(
        substitutions=ops["sub"], deletions=ops["del"], insertions=ops["ins"], hits=ops["hit"], utterances=1
    )


@dataclass
class UtteranceScore:
    """Everything needed to report one item: counts, the alignment, and what was compared.

    ``ref_tokens``/``hyp_tokens`` are the normalised error units; ``normalizer_version`` pins how they
    were made.
    """

    counts: ErrorCounts
    alignment: list[AlignOp]
    ref_tokens: list[str]
    hyp_tokens: list[str]
    unit: Unit
    normalizer_version: str = NORMALIZER_VERSION

    @property
    def metric(self) -> str:
        """``"wer"``, ``"cer"`` or ``"mer"``."""
        return METRIC_NAMES[self.unit]


def score_tokens(ref_tokens: list[str], hyp_tokens: list[str], unit: Unit) -> UtteranceScore:
    """Score already-tokenised units, applying the empty-reference rule (no-speech item)."""
    if not ref_tokens:
        hallucinated = len(hyp_tokens)
        counts = ErrorCounts(
            utterances=1, empty_refs=1, hallucinations=int(hallucinated > 0), hallucinated_units=hallucinated
        )
        alignment = [AlignOp("ins", None, t) for t in hyp_tokens]
    else:
        alignment = align(ref_tokens, hyp_tokens)
        counts = count_alignment(alignment)
    return UtteranceScore(counts, alignment, ref_tokens, hyp_tokens, unit)


def score_utterance(
    reference: str,
    hypothesis: str,
    language: str | None,
    *,
    unit: str | None = None,
    options: NormalizerOptions | None = None,
) -> UtteranceScore:
    """Normalise both texts for ``language``, tokenise into error units, align and count.

    Args:
        reference: reference transcript ("" for no-speech items).
        hypothesis: the hypothesis *text* (already split from ``language X<asr_text>``; never repaired).
        language: the reference language (canonical name, or ``None`` for no speech).
        unit: force ``"word"``, ``"char"`` or ``"mixed"``; ``None`` picks by language.
        options: normaliser options (defaults when ``None``).
    """
    opts = options or NormalizerOptions()
    chosen = unit_for_language(language, unit)
    ref_tokens = tokenize(opts.apply(reference, language), chosen)
    hyp_tokens = tokenize(opts.apply(hypothesis, language), chosen)
    return score_tokens(ref_tokens, hyp_tokens, chosen)


# ------------------------------------------------------------------------------------------- parsing


# ---------------------------------------------------------------------------------------- repetition

DEFAULT_MAX_UNITS_PER_SECOND: dict[str, float] = {"word": 6.0, "char": 12.0, "mixed": 12.0}
"""Upper limits on speaking rate. Fast read speech is ~4 words/s and ~8 Chinese/Japanese/Korean
characters/s; these leave ~50 % headroom. Thai is special-cased (``THAI_MAX_CHARS_PER_SECOND``)."""
THAI_MAX_CHARS_PER_SECOND = 25.0
"""Thai vowels and tone marks are separate code points, so a syllable is often 2-4 character units."""


@dataclass(frozen=True)
class RepetitionReport:
    """Result of :func:`detect_repetition`.

    Attributes:
        loop: an n-gram repeated consecutively at least ``min_repeats`` times over ``min_span`` units.
        too_long: more units than the audio duration allows.
        ngram: the repeated n-gram of the longest loop found (``None`` if no loop).
        repeats: consecutive occurrences of that n-gram.
        start: index (in units) where the loop starts.
        units: number of units in the text.
        units_per_second: ``units / audio_seconds`` (``None`` without a duration).
        max_units: units allowed for the duration (``None`` without a duration).
    """

    loop: bool
    too_long: bool
    ngram: tuple[str, ...] | None
    repeats: int
    start: int
    units: int
    units_per_second: float | None
    max_units: float | None

    @property
    def flagged(self) -> bool:
        """Either a loop or an implausibly long output."""
        return self.loop or self.too_long


def longest_repeat(tokens: list[str], max_ngram: int, min_repeats: int = 2) -> tuple[int, int, int]:
    """``(n, repeats, start)`` of the consecutive repetition covering most units among those with
    n <= ``max_ngram`` and at least ``min_repeats`` occurrences; ``(1, 1, 0)`` when there is none.

    For each n, ``tokens[i] == tokens[i + n]`` holding for L positions in a row means the n-gram at the
    run's start occurs ``L // n + 1`` times in a row. O(len * max_ngram).
    """
    best = (1, 1, 0)
    for n in range(1, max_ngram + 1):
        run, run_start = 0, 0
        for i in range(len(tokens) - n + 1):
            if i + n < len(tokens) and tokens[i] == tokens[i + n]:
                if run == 0:
                    run_start = i
                run += 1
                continue
            if run:
                repeats = run // n + 1
                if repeats >= min_repeats and repeats * n > best[0] * best[1]:
                    best = (n, repeats, run_start)
            run = 0
    return best


def detect_repetition(
    text: str,
    language: str | None,
    audio_seconds: float | None = None,
    *,
    unit: str | None = None,
    options: NormalizerOptions | None = None,
    max_ngram: int = 10,
    min_repeats: int = 5,
    min_span: int = 10,
    max_units_per_second: float | None = None,
    slack_units: int = 5,
    units: Sequence[str] | None = None,
) -> RepetitionReport:
    """Flag hallucination loops and outputs longer than the audio can hold, on normalised error units.

    Defaults and why: a loop is an n-gram (n <= ``max_ngram`` = 10 units) occurring ``min_repeats`` = 5
    times in a row *and* covering ``min_span`` = 10 units; natural speech repeats short things 2-4
    times ("no no no"), the span rule stops "哈哈哈哈哈" (5 units) from counting. Length: more than
    ``max_units_per_second * audio_seconds + slack_units`` units, with the rate from
    ``DEFAULT_MAX_UNITS_PER_SECOND`` (6 words/s, 12 characters/s, 25 for Thai) unless given; the slack
    keeps very short clips from being flagged for a couple of words. ``units``: the text's normalised error
    units when the caller has them already (the GSPO rewards score many completions and normalise each once);
    they must come from the same normaliser and unit.
    """
    if max_ngram < 1 or min_repeats < 2 or min_span < 1 or slack_units < 0:
        raise ValueError("need max_ngram >= 1, min_repeats >= 2, min_span >= 1, slack_units >= 0")
    opts = options or NormalizerOptions()
    chosen = unit_for_language(language, unit)
    tokens = list(units) if units is not None else tokenize(opts.apply(text, language), chosen)
    n, repeats, start = longest_repeat(tokens, max_ngram, min_repeats)
    loop = repeats >= min_repeats and n * repeats >= min_span
    rate = max_units = None
    too_long = False
    if audio_seconds is not None:
        if audio_seconds <= 0:
            raise ValueError(f"audio_seconds must be positive, got {audio_seconds}")
        if max_units_per_second is None:
            thai = chosen == "char" and check_language(language) == "Thai"
            max_units_per_second = THAI_MAX_CHARS_PER_SECOND if thai else DEFAULT_MAX_UNITS_PER_SECOND[chosen]
        rate = len(tokens) / audio_seconds
        max_units = max_units_per_second * audio_seconds + slack_units
        too_long = len(tokens) > max_units
    return RepetitionReport(
        loop=loop,
        too_long=too_long,
        ngram=tuple(tokens[start : start + n]) if loop else None,
        repeats=repeats if loop else 0,
        start=start if loop else 0,
        units=len(tokens),
        units_per_second=rate,
        max_units=max_units,
    )


# ------------------------------------------------------------------------------ LID and no-speech


@dataclass
class LanguageIdStats:
    """Language-ID accuracy over speech items, with a counter of ``(reference, predicted)`` mismatches.

    Predicted ``None`` (no speech) is recorded as ``"None"``, a malformed output as ``"<malformed>"``.
    """

    total: int = 0
    correct: int = 0
    confusions: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, reference: str, predicted: str | None) -> None:
        """Record one item (reference is a canonical language name)."""
        predicted_label = NO_SPEECH if predicted is None else predicted
        self.total += 1
        if predicted_label == reference:
            self.correct += 1
        else:
            self.confusions[(reference, predicted_label)] += 1

    @property
    def accuracy(self) -> float | None:
        """Correct / total; ``None`` when nothing was recorded."""
        return self.correct / self.total if self.total else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary; confusions as ``"ref->hyp": count``, most frequent first."""
        return {
            "total": self.total,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "confusions": {f"{r}->{h}": c for (r, h), c in self.confusions.most_common()},
        }


def language_id_accuracy(pairs: Iterable[tuple[str, str | None]]) -> LanguageIdStats:
    """LID statistics for ``(reference language, predicted language)`` pairs."""
    stats = LanguageIdStats()
    for reference, predicted in pairs:
        stats.add(reference, predicted)
    return stats


@dataclass
class NoSpeechStats:
    """Detection of no-speech audio: positives are references without speech / predictions ``language None``."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, reference_no_speech: bool, predicted_no_speech: bool) -> None:
        """Record one item."""
        if reference_no_speech and predicted_no_speech:
            self.tp += 1
        elif predicted_no_speech:
            self.fp += 1
        elif reference_no_speech:
            self.fn += 1
        else:
            self.tn += 1

    @property
    def precision(self) -> float | None:
        """tp / (tp + fp); ``None`` when nothing was predicted as no speech."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        """tp / (tp + fn); ``None`` when no reference was no speech."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    def as_dict(self) -> dict[str, Any]:
        """Counts plus precision and recall."""
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "precision": self.precision,
            "recall": self.recall,
        }


def no_speech_precision_recall(pairs: Iterable[tuple[bool, bool]]) -> NoSpeechStats:
    """No-speech statistics for ``(reference is no speech, predicted language None)`` pairs."""
    stats = NoSpeechStats()
    for reference, predicted in pairs:
        stats.add(reference, predicted)
    return stats


# ------------------------------------------------------------------------------------------- corpus


def _macro(groups: dict[str, ErrorCounts]) -> float | None:
    """Unweighted mean of per-language rates over languages with reference units (paper style)."""
    rates = [c.rate for c in groups.values() if c.ref_units]
    return sum(rates) / len(rates) if rates else None


class MetricAggregator:
    """Accumulates scores per (set, language) and reports corpus and macro averages.

    ``add`` scores one item (normalise, tokenise, align) and, when given a :class:`ParsedOutput`, also
    records format errors, LID (speech references, unforced outputs) and no-speech detection.
    ``add_counts`` accumulates precomputed counts. The no-speech group is keyed ``"None"``; it has no
    reference units, so it never enters the macro average (its hallucinations are reported instead).
    """

    def __init__(self, *, unit: str | None = None, options: NormalizerOptions | None = None) -> None:
        if unit is not None:
            unit_for_language(None, unit)  # validate early
        self.unit = unit
        self.options = options or NormalizerOptions()
        self.counts: dict[str, dict[str, ErrorCounts]] = defaultdict(dict)
        self.units: dict[tuple[str, str], str] = {}
        self.lid: dict[str, LanguageIdStats] = defaultdict(LanguageIdStats)
        self.no_speech: dict[str, NoSpeechStats] = defaultdict(NoSpeechStats)
        self.format_errors: Counter[str] = Counter()

    def add(
        self, set_name: str, language: str | None, reference: str, hypothesis: str | ParsedOutput
    ) -> UtteranceScore:
        """Score ``hypothesis`` against ``reference`` in ``language`` and accumulate it; returns the score."""
        language = check_language(language)
        parsed: ParsedOutput | None = None
        if isinstance(hypothesis, ParsedOutput):
            parsed, hypothesis = hypothesis, hypothesis.text
        score = score_utterance(reference, hypothesis, language, unit=self.unit, options=self.options)
        self.add_counts(set_name, language, score.counts, score.unit)
        if parsed is not None:
            self.format_errors[set_name] += int(not parsed.format_ok)
            if not parsed.language_forced:
                reference_no_speech = language is None or score.counts.empty_refs > 0
                self.no_speech[set_name].add(reference_no_speech, parsed.no_speech)
                if not reference_no_speech and language is not None:
                    predicted = parsed.language if parsed.format_ok else MALFORMED
                    self.lid[set_name].add(language, predicted)
        return score

    def add_counts(self, set_name: str, language: str | None, counts: ErrorCounts, unit: str) -> None:
        """Accumulate precomputed counts; one language must keep one unit within a set."""
        key = NO_SPEECH if language is None else language
        if language is None and counts.ref_units:
            raise ValueError("an item without a language must have an empty reference (no speech)")
        known = self.units.setdefault((set_name, key), unit)
        if known != unit:
            raise ValueError(f"set {set_name!r}, language {key!r}: mixing units {known!r} and {unit!r}")
        group = self.counts[set_name]
        group[key] = group.get(key, ErrorCounts()) + counts

    def summary(self) -> dict[str, Any]:
        """Per set: per-language counts/rates, the corpus rate over all units, the macro average, and
        LID/no-speech/format statistics; plus the same per language pooled over sets."""
        sets: dict[str, Any] = {}
        pooled: dict[str, ErrorCounts] = {}
        pooled_units: dict[str, str] = {}
        for set_name, groups in sorted(self.counts.items()):
            languages = {}
            for lang, counts in sorted(groups.items()):
                unit = self.units[(set_name, lang)]
                languages[lang] = {"metric": METRIC_NAMES[unit], **counts.as_dict()}
                pooled[lang] = pooled.get(lang, ErrorCounts()) + counts
                if pooled_units.setdefault(lang, unit) != unit:
                    logger.warning("language %s is scored in different units across sets", lang)
                    pooled_units[lang] = "mixed-units"
            corpus = sum(groups.values(), ErrorCounts())
            sets[set_name] = {
                "languages": languages,
                "corpus": corpus.as_dict(),
                "macro": _macro(groups),
                "format_errors": self.format_errors.get(set_name, 0),
                "lid": self.lid[set_name].as_dict() if set_name in self.lid else None,
                "no_speech": self.no_speech[set_name].as_dict() if set_name in self.no_speech else None,
            }
        return {
            **self.options.as_dict(),
            "unit": self.unit or "by-language",
            "sets": sets,
            "languages": {
                lang: {"metric": METRIC_NAMES.get(pooled_units[lang], pooled_units[lang]), **c.as_dict()}
                for lang, c in sorted(pooled.items())
            },
            "macro": _macro(pooled),
        }


__all__ = [
    "AlignOp",
    "ErrorCounts",
    "LanguageIdStats",
    "MetricAggregator",
    "NoSpeechStats",
    "ParsedOutput",
    "RepetitionReport",
    "UtteranceScore",
    "align",
    "capped_error_rate",
    "count_alignment",
    "detect_repetition",
    "format_alignment",
    "language_id_accuracy",
    "longest_repeat",
    "no_speech_precision_recall",
    "parse_asr_output",
    "score_tokens",
    "score_utterance",
    "strip_end_tokens",
    "tokenize",
    "unit_for_language",
]
