"""Versioned text normalisation for WER/CER scoring, shared by evaluation and RL rewards.

Why this module exists: Qwen3-ASR writes cased, punctuated text, and references come in every style.
Error rates are only comparable (across runs, and between the reward and the evaluation) when both
sides go through one normaliser whose behaviour is pinned. ``NORMALIZER_VERSION`` names that
behaviour; bump it whenever any output below changes, and record it next to every reported number
(``NormalizerOptions.as_dict()`` does that).

Version ``v1`` — what each language family gets (``language`` is a canonical name from
:mod:`qwen3asr_train.languages`):

* **English** — the Whisper English normaliser, taken from the standalone ``whisper-normalizer``
  package (``whisper_normalizer.english.EnglishTextNormalizer``; its British→American spelling table
  ``normalizers/english.json`` ships inside the package, so it works offline). It lower-cases, drops
  ``[…]``/``<…>``/``(…)`` spans and the fillers hmm/mm/mhm/mmm/uh/um, expands contractions and titles
  ("Mr." → "mister"), writes numbers and currencies as digits ("twenty dollars" → "$20"), maps British
  to American spelling, strips diacritics and punctuation. Before it runs, the text is NFKC-normalised
  and curly apostrophes become ``'`` so that "I’m" expands like "I'm" (Whisper misses that case).
* **Other space-delimited languages** (and ``None``/unknown languages) — Whisper's *basic* normaliser
  (``whisper_normalizer.basic.BasicTextNormalizer``): NFKC, lower-case, drop ``[…]``/``<…>``/``(…)``
  spans, punctuation and symbols become spaces, whitespace collapsed. It runs with
  ``preserve_marks=True``, because the default deletes Unicode combining marks and so destroys the
  vowel signs of Hindi (and similar scripts). ``remove_diacritics=True`` instead decomposes (NFKD) and
  drops combining marks ("très" → "tres"); it is off by default and should stay off for scripts whose
  marks are letters.
* **Character languages** (``CER_LANGUAGES``: Chinese, Cantonese, Japanese, Korean, Thai) — our own
  pipeline, *not* whisper-normalizer's ``ChineseTextNormalizer`` (that one rewrites every numeral run
  as digits, "一样" → "1样", which changes character counts): NFKC (folds full-width/half-width forms),
  optional traditional→simplified conversion, lower-case (for embedded Latin), the same bracket-span
  removal as above, punctuation and symbols (Unicode categories P*, S*) removed, combining marks kept
  (Thai vowels and tones are marks). Whitespace is removed everywhere except a single space between
  two non-CJK word characters ("去了 Starbucks coffee" → "去了starbucks coffee"), so that mixed error
  rate tokenisation still sees two Latin words; character tokenisation ignores that space anyway.
  Numerals are left as written (no 一→1 rewriting).
* ``to_simplified=True`` converts traditional to simplified Chinese with the official OpenCC Python
  binding (PyPI ``opencc``, config ``t2s``). It applies to Chinese and Cantonese only: Japanese kanji
  are not traditional Chinese, and converting them would invent errors. The library is imported only
  when the option is used.

Options that do not apply to a language (``remove_diacritics`` for character languages and English,
``to_simplified`` outside Chinese/Cantonese) are ignored for that language by design: one option set is
used for a whole multilingual evaluation. Language labels must be canonical names; an ISO code or a
non-canonical spelling raises instead of silently getting the wrong normaliser.
"""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import regex
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

from qwen3asr_train.languages import (
    CER_LANGUAGES,
    CHINESE_DIALECTS,
    LANGUAGE_CODE_TO_NAME,
    NO_SPEECH,
    SUPPORTED_LANGUAGES,
)

logger = logging.getLogger(__name__)

NORMALIZER_VERSION = "v1"
"""Bump whenever any normalised output changes; recorded with every metric."""

SIMPLIFIABLE_LANGUAGES: frozenset[str] = frozenset({"Chinese", "Cantonese"})
"""Languages to which ``to_simplified`` applies."""

CHAR_SCRIPT_CLASS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\p{Thai}\u3005-\u3007\u30fc"
"""Characters that are one error unit each in character and mixed tokenisation (CJK ideographs,
kana incl. the prolonged-sound mark ー and iteration marks, hangul, Thai)."""

_BRACKETS = re.compile(r"[<\[][^>\]]*[>\]]|\(([^)]+?)\)")
_CURLY_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
# whitespace next to a character-script character carries no information in CER languages
_DROPPABLE_SPACE = regex.compile(rf"(?<=[{CHAR_SCRIPT_CLASS}])\s+|\s+(?=[{CHAR_SCRIPT_CLASS}])")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class NormalizerOptions:
    """The knobs of :func:`normalize`, as one hashable value that configs and reports can carry.

    Attributes:
        remove_diacritics: strip combining marks in space-delimited non-English languages.
        to_simplified: convert traditional to simplified Chinese (Chinese and Cantonese only).
    """

    remove_diacritics: bool = False
    to_simplified: bool = False

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> NormalizerOptions:
        """Build from a config mapping; unknown keys raise ``ValueError`` naming the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = set(options) - valid
        if unknown:
            raise ValueError(f"unknown normaliser option(s) {sorted(unknown)}; valid options: {sorted(valid)}")
        return cls(**dict(options))

    def as_dict(self) -> dict[str, Any]:
        """The options plus ``normalizer_version``, for recording next to metrics."""
        return {"normalizer_version": NORMALIZER_VERSION, **asdict(self)}

    def apply(self, text: str, language: str | None) -> str:
        """``normalize(text, language)`` with these options."""
        return normalize(text, language, **asdict(self))


def check_language(language: str | None) -> str | None:
    """Return the language (``"None"`` becomes ``None``), rejecting labels that look like a mistake.

    Unknown names are allowed (users add languages), but ISO codes, dialect names and miscased
    supported names would silently get the wrong normaliser and metric, so they raise ``ValueError``.
    """
    if language is None or language == NO_SPEECH:
        return None
    if language in SUPPORTED_LANGUAGES:
        return language
    lowered = language.strip().lower()
    if lowered in LANGUAGE_CODE_TO_NAME or lowered in {name.lower() for name in SUPPORTED_LANGUAGES}:
        raise ValueError(
            f"language {language!r} is not a canonical name; resolve it with "
            "qwen3asr_train.languages.LanguageTable first (e.g. 'zh' -> 'Chinese')"
        )
    if language in CHINESE_DIALECTS:
        raise ValueError(f"{language!r} is a dialect label; score it as {CHINESE_DIALECTS[language]!r}")
    return language


@functools.cache
def _english() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


@functools.cache
def _basic(remove_diacritics: bool) -> BasicTextNormalizer:
    if remove_diacritics:
        return BasicTextNormalizer(remove_diacritics=True)
    return BasicTextNormalizer(preserve_marks=True)


@functools.cache
def _t2s() -> Callable[[str], str]:
    try:
        import opencc
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("to_simplified=True needs the 'opencc' package (pip install opencc==1.4.2)") from err
    logger.debug("loading OpenCC t2s converter")
    return opencc.OpenCC("t2s").convert


def _normalize_characters(text: str, language: str, to_simplified: bool) -> str:
    text = unicodedata.normalize("NFKC", text)
    if to_simplified and language in SIMPLIFIABLE_LANGUAGES:
        text = _t2s()(text)
    text = _BRACKETS.sub(" ", text.lower())
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    text = _DROPPABLE_SPACE.sub("", text)
    return _SPACES.sub(" ", text).strip()


def normalize(
    text: str,
    language: str | None,
    *,
    remove_diacritics: bool = False,
    to_simplified: bool = False,
) -> str:
    """Normalise ``text`` for scoring in ``language`` (see the module docstring for each family).

    Args:
        text: raw reference or hypothesis text (no ``language X<asr_text>`` prefix).
        language: canonical language name, or ``None``/``"None"`` for no-speech/unknown (basic rules).
        remove_diacritics: space-delimited non-English languages only.
        to_simplified: Chinese and Cantonese only.

    Returns:
        The normalised text: lower-case, no punctuation, single spaces, stripped.
    """
    language = check_language(language)
    if language in CER_LANGUAGES:
        return _normalize_characters(text, language, to_simplified)
    text = unicodedata.normalize("NFKC", text)
    if language == "English":
        text = _english()(text.translate(_CURLY_APOSTROPHES))
    else:
        text = _basic(remove_diacritics)(text)
    return _SPACES.sub(" ", text).strip()
