"""GSPO rewards for ASR: a registry of per-completion reward terms and their weighted composite.

Why this module exists: the reward must score exactly like evaluation (same parser, normaliser, error
units and empty-reference rule, :mod:`qwen3asr_train.eval.metrics`), on the *raw* decoded text (loops
are never repaired, spec §5.4), bounded (ER capped at 1, §5.3) and without ever scoring a no-speech item
with an edit distance (jiwer returns an insertion count there, §5.2; here no-speech items never reach
the scorer at all).

Each term is a plain function ``RewardInput -> float`` registered by name; :class:`CompositeReward` sums
weighted terms and returns every raw term for ``reward/<name>`` logging. Derived views of a completion
(parse, normalised units, repetition report) are computed lazily once per :class:`RewardInput` and shared
by all terms; normalisation and repetition checks are also memoised on strings, so the G identical
hypotheses that ASR groups often contain (and the reference they share) are processed once.

Target ordering (spec §6) with :data:`DEFAULT_REWARD_WEIGHTS`, on the test's fixed example (reference
"The quick brown fox jumps over the lazy dog.", 9 words, 3 s of English audio):

* correct ``language English<asr_text>The quick brown fox jumps over the lazy dog.`` -> **1.25**
  (accuracy 1 + language_id 0.25);
* partial ``...<asr_text>The quick brown fox jumped over a dog.`` (3 errors / 9 words) -> **0.917**;
* empty ``language English<asr_text>`` -> **0.25** (accuracy 0: an empty output is never rewarded);
* hallucination (the correct text + "the" x 30, truncated) -> **-1.75** (accuracy capped at 0, then
  repetition -1 and truncation -1; without the penalties it would tie with empty).

So correct > partial > empty > hallucination. On no-speech audio ``language None<asr_text>`` scores
**2.25** (accuracy 1 + language_id 0.25 + no_speech 1) and any speech output **-1.0** (no_speech -1);
predicting ``language None`` on speech scores at most 0.0 without hotwords (no_speech -1 cancels a
perfect text), below an empty transcript. Terms that are constant within a group (e.g. keyword_recall on an item without
hotwords) change nothing after group normalisation, which is also invariant to ``a * r + b`` (a > 0):
only the differences between a group's completions matter.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from qwen3asr_train.config.schema import DEFAULT_REWARD_WEIGHTS
from qwen3asr_train.eval import metrics
from qwen3asr_train.eval.metrics import ParsedOutput, RepetitionReport, Unit, UtteranceScore
from qwen3asr_train.eval.normalize import NormalizerOptions, check_language

logger = logging.getLogger(__name__)

RewardFn = Callable[["RewardInput"], float]
"""A reward term: one completion in, one finite float out."""


@functools.lru_cache(maxsize=16384)
def _normalised(text: str, language: str | None, options: NormalizerOptions) -> str:
    """``options.apply(text, language)``, memoised.

    Why: normalisation is most of a reward's cost (~0.2-0.5 ms a string on CPU for English, about a fifth of a
    demo-scale GSPO rollout's reward phase per 64 completions), and both the error units and the repetition check
    of a hypothesis need the same normalised string.
    """
    return options.apply(text, language)


@functools.lru_cache(maxsize=8192)
def _units(text: str, language: str | None, unit: str, options: NormalizerOptions) -> tuple[str, ...]:
    """Normalised error units of ``text`` (memoised: a group shares its reference and often its hypotheses)."""
    return tuple(metrics.tokenize(_normalised(text, language, options), unit))


@functools.lru_cache(maxsize=8192)
def _repetition(
    text: str, language: str | None, audio_seconds: float | None, unit: str, options: NormalizerOptions
) -> RepetitionReport:
    """Memoised :func:`metrics.detect_repetition` with its default thresholds, on the units of
    :func:`_units` (each distinct string is normalised once)."""
    units = _units(text, language, unit, options)
    return metrics.detect_repetition(text, language, audio_seconds, unit=unit, options=options, units=units)


@dataclass(frozen=True)
class RewardInput:
    """One sampled completion and what it is judged against.

    Attributes:
        completion: the raw decoded text (``skip_special_tokens=True``), e.g. ``language English<asr_text>hi``;
            may be malformed. Never repaired.
        reference: the transcript ("" for a no-speech item).
        language: the reference language (canonical name); ``None`` (or ``"None"``) = no-speech item.
        forced_language: the prompt already ended in ``language X<asr_text>``, so the completion is only text.
        hotwords: biasing words from the row's context that occur in the reference (empty otherwise).
        truncated: generation hit ``max_new_tokens`` without an end token.
        audio_seconds: clip duration, for the "too long for the audio" check (``None`` skips that check).
        unit: force an error unit (``"word"``/``"char"``/``"mixed"``); ``None`` picks by language. Must
            match the evaluation config.
        normalizer: normaliser options; must match the evaluation config (same normaliser, spec §5.6).

    The ``cached_property`` views below are computed on first use and shared by every reward term.
    """

    completion: str
    reference: str
    language: str | None
    forced_language: str | None = None
    hotwords: tuple[str, ...] = ()
    truncated: bool = False
    audio_seconds: float | None = None
    unit: str | None = None
    normalizer: NormalizerOptions = field(default_factory=NormalizerOptions)

    def __post_init__(self) -> None:
        language = check_language(self.language)  # "None" -> None; ISO codes/miscased names raise
        object.__setattr__(self, "language", language)
        object.__setattr__(self, "hotwords", tuple(self.hotwords))
        if language is None and self.reference.strip():
            raise ValueError(f"a no-speech item (language None) must have an empty reference, got {self.reference!r}")
        if self.forced_language is not None and check_language(self.forced_language) is None:
            raise ValueError("forced_language must be a real language; a forced 'None' leaves nothing to judge")
        if self.audio_seconds is not None and not self.audio_seconds > 0:
            raise ValueError(f"audio_seconds must be positive, got {self.audio_seconds}")
        metrics.unit_for_language(language, self.unit)  # validate early

    @cached_property
    def parsed(self) -> ParsedOutput:
        """Language prefix split off, text kept raw (the whole string when malformed)."""
        return metrics.parse_asr_output(self.completion, self.forced_language)

    @cached_property
    def error_unit(self) -> Unit:
        """WER/CER/MER unit chosen by the *reference* language (as in evaluation)."""
        return metrics.unit_for_language(self.language, self.unit)

    @cached_property
    def hypothesis_units(self) -> tuple[str, ...]:
        """Normalised error units of the parsed text."""
        return _units(self.parsed.text, self.language, self.error_unit, self.normalizer)

    @cached_property
    def clean_no_speech(self) -> bool:
        """The output is the no-speech answer: ``language None<asr_text>`` (or, when forced, just text) with
        no text left after normalisation -- the evaluation's definition of "not hallucinated"."""
        return (self.parsed.no_speech or self.parsed.language_forced) and not self.hypothesis_units

    @cached_property
    def score(self) -> UtteranceScore:
        """Alignment counts of a speech item (never computed for no-speech items)."""
        if self.language is None:
            raise ValueError("no-speech items are not scored by edit distance")
        reference_units = _units(self.reference, self.language, self.error_unit, self.normalizer)
        return metrics.score_tokens(list(reference_units), list(self.hypothesis_units), self.error_unit)

    @cached_property
    def char_score(self) -> UtteranceScore:
        """Character alignment counts of a speech item (spaces skipped), whatever the language's WER unit."""
        if self.language is None:
            raise ValueError("no-speech items are not scored by edit distance")
        reference_units = _units(self.reference, self.language, "char", self.normalizer)
        hypothesis_units = _units(self.parsed.text, self.language, "char", self.normalizer)
        return metrics.score_tokens(list(reference_units), list(hypothesis_units), "char")

    @cached_property
    def repetition(self) -> RepetitionReport:
        """Loop / too-long report of the raw parsed text."""
        return _repetition(self.parsed.text, self.language, self.audio_seconds, self.error_unit, self.normalizer)

    @cached_property
    def reference_repetition(self) -> RepetitionReport:
        """The same report for the reference, so genuinely repetitive or fast speech is not penalised."""
        return _repetition(self.reference, self.language, self.audio_seconds, self.error_unit, self.normalizer)


# -------------------------------------------------------------------------------------------- registry

REWARDS: dict[str, RewardFn] = {}
"""Built-in and user-registered reward terms by name."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name``; a different function under a taken name raises
    (re-registering the same module-level function, e.g. on module reload, is allowed)."""

    def decorate(fn: RewardFn) -> RewardFn:
        existing = REWARDS.get(name)
        if existing is not None and _qualname(existing) != _qualname(fn):
            raise ValueError(f"reward {name!r} is already registered to {_qualname(existing)}")
        REWARDS[name] = fn
        return fn

    return decorate


def _qualname(fn: object) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def get_reward(name: str) -> RewardFn:
    """A registered reward, or a custom one by import path (``package.module:function`` or
    ``package.module.function``), so configs can name rewards without editing this module."""
    if name in REWARDS:
        return REWARDS[name]
    module_name, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    known = ", ".join(sorted(REWARDS))
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown reward {name!r}; registered: {known}; or give an import path 'package.module:fn'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name):
            raise  # the module exists but one of its own imports is missing
        raise ValueError(f"reward {name!r}: no module {module_name!r} (registered rewards: {known})") from err
    try:
        fn = functools.reduce(getattr, attr.split("."), module)
    except AttributeError as err:
        raise ValueError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}") from err
    if not callable(fn):
        raise TypeError(f"reward {name!r} resolves to a non-callable {type(fn).__name__}")
    return fn


# ------------------------------------------------------------------------------------------- built-ins


@register_reward("accuracy")
def accuracy(x: RewardInput) -> float:
    """``1 - min(ER, 1)`` on the raw parsed text, ER = WER or CER by the reference language.

    The cap keeps insertion-heavy garbage from ranking below an empty output (spec §5.3); an empty
    hypothesis on speech is ER 1 -> 0. A malformed output is scored with the whole raw string as its text
    (usually low; the ``format`` term adds the penalty), a wrong language tag does not change the text
    score (``language_id`` handles it). No-speech item: 1.0 for the clean no-speech answer, else 0.0,
    decided without any edit distance. A speech item whose reference normalises to nothing (e.g.
    "[laughter]") follows the evaluation's empty-reference rule: 1.0 if the hypothesis is empty too.
    """
    if x.language is None:
        return float(x.clean_no_speech)
    return 1.0 - metrics.capped_error_rate(x.score.counts)


@register_reward("char_accuracy")
def char_accuracy(x: RewardInput) -> float:
    """``1 - min(CER, 1)`` on the raw parsed text, for every language (``accuracy`` uses WER for English).

    Why: on short clips word accuracy is coarse. A 2-word clip scores 0, 0.5 or 1, and a near miss
    ("bred" for "bread") scores like a wrong word, so many groups of G samples tie and carry no signal.
    Characters grade the misses. Mixed with ``accuracy`` it keeps the word-level goal and breaks ties. Measured
    on the demo-scale model (docs/gspo.md, "Tuning GSPO"), an even mix cut the groups with equal rewards
    from 4.7% to 4.2% and did not change dev WER, so the defaults leave it out. No-speech items: as
    ``accuracy`` (no edit distance).
    """
    if x.language is None:
        return float(x.clean_no_speech)
    return 1.0 - metrics.capped_error_rate(x.char_score.counts)


@register_reward("language_id")
def language_id(x: RewardInput) -> float:
    """1.0 when the written language tag equals the reference language (``None`` on no-speech items),
    else 0.0 (malformed outputs included). 0.0 for forced-language rows: the prompt wrote the tag.

    It is the only signal in groups whose transcripts agree but whose tags differ.
    """
    if x.parsed.language_forced:
        return 0.0
    if x.language is None:
        return float(x.parsed.no_speech)
    return float(x.parsed.language == x.language)


@register_reward("no_speech")
def no_speech(x: RewardInput) -> float:
    """No-speech item: +1 for the clean ``language None<asr_text>`` answer, -1 for anything else.
    Speech item: -1 for claiming ``language None`` (whatever follows the tag), else 0. Forced rows: 0.

    Symmetric +-1 so that "say nothing" is learnt on silence without becoming a safe answer on speech.
    """
    if x.parsed.language_forced:
        return 0.0
    if x.language is None:
        return 1.0 if x.clean_no_speech else -1.0
    return -1.0 if x.parsed.no_speech else 0.0


@register_reward("repetition")
def repetition(x: RewardInput) -> float:
    """-1 when :func:`metrics.detect_repetition` flags a loop or an output too long for the audio, else 0.

    A flag the reference raises too (a chant, very fast speech) is not penalised: the detector cannot
    tell such a hypothesis from a correct one, so accuracy alone judges it there.
    """
    h = x.repetition
    if not h.flagged:
        return 0.0
    r = x.reference_repetition
    return -1.0 if (h.loop and not r.loop) or (h.too_long and not r.too_long) else 0.0


@register_reward("truncation")
def truncation(x: RewardInput) -> float:
    """-1 when generation hit ``max_new_tokens`` (nearly always a loop, spec §5.6), else 0."""
    return -1.0 if x.truncated else 0.0


@register_reward("format")
def format_reward(x: RewardInput) -> float:
    """-1 when the output lacks the ``language X<asr_text>`` shape, else 0 (forced rows are only text, never
    malformed). Downstream parsing and LID depend on that shape."""
    return 0.0 if x.parsed.format_ok else -1.0


def _contains(units: Sequence[str], needle: tuple[str, ...]) -> bool:
    n = len(needle)
    return any(tuple(units[i : i + n]) == needle for i in range(len(units) - n + 1))


@register_reward("keyword_recall")
def keyword_recall(x: RewardInput) -> float:
    """Fraction of distinct ``hotwords`` found in the hypothesis as whole, contiguous normalised units
    (words for WER languages, characters for CER languages); 0.0 (neutral) without hotwords.

    Contextual biasing is what a context row is for, and one missed name costs one unit of WER only.
    """
    needles = {u for w in x.hotwords if (u := _units(w, x.language, x.error_unit, x.normalizer))}
    if not needles:
        return 0.0
    return sum(_contains(x.hypothesis_units, n) for n in needles) / len(needles)


# ------------------------------------------------------------------------------------------- composite

"""Default weights, in units of one perfect transcript (accuracy 1.0):

* ``no_speech`` 1.0: on silence, correct vs hallucinated is 2.25 vs -1, as decisive as a transcript.
* ``repetition``/``truncation`` 1.0 each: with the cap alone a loop ties with an empty output at 0; each
  penalty puts it a full transcript below (they usually fire together: -2).
* ``format`` 0.5: a malformed but otherwise correct output (1 - 0.5 = 0.5, no LID credit) ranks below a
  well-formed one with ~30 % errors (0.67 + 0.25), since parsing and LID break without the shape.
* ``language_id`` 0.25 and ``keyword_recall`` 0.25: a wrong tag or all hotwords missed costs as much as
  25 % WER; the text stays the main target, but these keep signal for LID and biasing (spec §5.6,
  forgetting) where transcripts in a group agree.
"""


def _finite(value: object, what: str) -> float:
    """``float(value)``, rejecting NaN/inf: one bad reward would poison its whole group's advantages."""
    out = float(value)  # type: ignore[arg-type]
    if not math.isfinite(out):
        raise ValueError(f"{what} is {out}; rewards and weights must be finite")
    return out


class CompositeReward:
    """Weighted sum of reward terms over a batch of completions.

    Args:
        weights: term name (registered, or an import path for :func:`get_reward`) -> weight; ``None`` uses
            :data:`DEFAULT_REWARD_WEIGHTS`. Zero-weight terms are still computed, so they can be logged.
    """

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        weights = DEFAULT_REWARD_WEIGHTS if weights is None else weights
        if not weights:
            raise ValueError("CompositeReward needs at least one weighted term")
        self.weights: dict[str, float] = {}
        self.terms: dict[str, RewardFn] = {}
        for name, weight in weights.items():
            self.terms[name] = get_reward(name)
            self.weights[name] = _finite(weight, f"the weight of reward {name!r}")
        logger.info("reward terms: %s", self.weights)

    def __call__(self, inputs: Sequence[RewardInput]) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(total (N,) float64, {name: raw term values (N,) float64})``."""
        terms = {
            name: torch.tensor([_finite(fn(x), f"reward {name!r}") for x in inputs], dtype=torch.float64)
            for name, fn in self.terms.items()
        }
        total = torch.zeros(len(inputs), dtype=torch.float64)
        for name, values in terms.items():
            total += self.weights[name] * values
        return total, terms


__all__ = [
    "DEFAULT_REWARD_WEIGHTS",
    "REWARDS",
    "CompositeReward",
    "RewardFn",
    "RewardInput",
    "accuracy",
    "char_accuracy",
    "format_reward",
    "get_reward",
    "keyword_recall",
    "language_id",
    "no_speech",
    "register_reward",
    "repetition",
    "truncation",
]
