"""Word units of Qwen3-ForcedAligner: how a transcript is cut into the words that get ``<timestamp>`` slots.

Why this module exists: the aligner predicts one start and one end slot per *unit*, so training targets
(MFA word times, synthetic speech) must be cut into exactly the units inference will cut the same text
into. A training unit that inference never produces (``"don't"`` vs ``"dont"``, ``"你好"`` vs ``"你"``,
``"好"``) teaches the model slot positions it will never see.

Which inference we match. Our exported native checkpoints are decoded with transformers'
``Qwen3ASRProcessor.prepare_forced_aligner_inputs``, which resolves ISO codes to names and calls
``split_words_for_alignment(text, name)``. ``split_words`` reproduces that exactly by default
(``convention="transformers"``; the tests compare it with the real transformers function):

- every language except Japanese and Korean (Chinese included): walk the characters; whitespace ends a
  unit; characters that are not Unicode letters (L*), numbers (N*), ``'`` or CJK ideographs are dropped
  *without* ending the unit (``"well-known"`` -> ``"wellknown"``); each CJK ideograph is its own unit;
- Japanese: ``nagisa.tagging(text.strip()).words``, each cleaned, empty results dropped;
- Korean: soynlp ``LTokenizer()`` (no scores), each cleaned, empty results dropped.

Upstream qwen-asr (``qwen_asr/inference/qwen3_forced_aligner.py``, used with original-layout
checkpoints) differs in three places; ``convention="qwen_asr"`` reproduces it:

- Korean uses ``LTokenizer(scores={w: 1.0 for w in korean_dict_jieba.dict})`` (the dictionary bundled
  with qwen-asr), so it splits eojeol into L/R parts that the score-less tokenizer keeps whole;
- its CJK ranges lack U+2F800-U+2FA1F (compatibility supplement): those characters stay inside a
  non-CJK run instead of becoming their own unit;
- its cleaning keeps only L*/N*/``'``, so unassigned code points inside the CJK ranges are dropped
  (transformers keeps them); Japanese text is not stripped before nagisa.

Languages are canonical names (``"Chinese"``) or ISO codes (``"zh"``), resolved like transformers'
processor does; anything else (dialect names, ``None``) takes the default path. Whether the aligner
supports a language is the caller's check (``languages.FORCED_ALIGNER_LANGUAGES``).
"""

from __future__ import annotations

import functools
import importlib.util
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from qwen3asr_train.languages import LANGUAGE_CODE_TO_NAME

if TYPE_CHECKING:  # soynlp is optional: imported where Korean is first split
    from soynlp.tokenizer import LTokenizer

Convention = Literal["transformers", "qwen_asr"]

_CJK_RANGES = (
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0x3400, 0x4DBF),  # Extension A
    (0x20000, 0x2A6DF),  # Extension B
    (0x2A700, 0x2B73F),  # Extension C
    (0x2B740, 0x2B81F),  # Extension D
    (0x2B820, 0x2CEAF),  # Extension E
    (0xF900, 0xFAFF),  # Compatibility Ideographs
)
_CJK_COMPAT_SUPPLEMENT = (0x2F800, 0x2FA1F)  # transformers only


def is_cjk_char(char: str, convention: Convention = "transformers") -> bool:
    """True for a CJK ideograph, which the aligner treats as a unit of its own."""
    code = ord(char)
    if any(lo <= code <= hi for lo, hi in _CJK_RANGES):
        return True
    return convention == "transformers" and _CJK_COMPAT_SUPPLEMENT[0] <= code <= _CJK_COMPAT_SUPPLEMENT[1]


def is_kept_char(char: str, convention: Convention = "transformers") -> bool:
    """True for characters that survive cleaning: Unicode letters, numbers, ``'`` (and, in transformers, CJK)."""
    if char == "'" or unicodedata.category(char)[0] in "LN":
        return True
    return convention == "transformers" and is_cjk_char(char, convention)


def clean_token(token: str, convention: Convention = "transformers") -> str:
    """Drop every character that is not kept (punctuation, symbols, marks, spaces)."""
    return "".join(ch for ch in token if is_kept_char(ch, convention))


def resolve_language(language: str | None) -> str | None:
    """Map an ISO code to its canonical name (as transformers' processor does); other labels pass through."""
    if language is None:
        return None
    return LANGUAGE_CODE_TO_NAME.get(language.strip().lower(), language.strip())


def split_words(
    text: str,
    language: str | None,
    *,
    convention: Convention = "transformers",
    korean_dict: str | Path | None = None,
) -> list[str]:
    """Cut ``text`` into the aligner's word units for ``language`` (see the module docstring).

    Args:
        text: The transcript (raw, with punctuation; cleaning is part of the segmentation).
        language: Canonical name or ISO code; ``None`` or an unlisted label uses the default path.
        convention: ``"transformers"`` (default; native checkpoints) or ``"qwen_asr"`` (upstream package).
        korean_dict: Only for ``convention="qwen_asr"`` with Korean: path to qwen-asr's
            ``korean_dict_jieba.dict``; found in an installed ``qwen_asr`` package when omitted.

    Raises:
        ImportError: Japanese without ``nagisa`` or Korean without ``soynlp``.
    """
    lang = (resolve_language(language) or "").lower()
    if lang == "japanese":
        return _clean_all(_nagisa_words(text.strip() if convention == "transformers" else text), convention)
    if lang == "korean":
        return _clean_all(_korean_tokenizer(convention, korean_dict).tokenize(text), convention)
    return [unit for unit, _, _ in _default_spans(text, convention)]


def word_spans(
    text: str,
    language: str | None,
    *,
    convention: Convention = "transformers",
    korean_dict: str | Path | None = None,
) -> list[tuple[str, int, int]]:
    """``split_words`` plus where each unit sits in ``text``: ``(unit, start, end)`` with ``text[start:end]``
    the shortest slice holding the unit's characters (dropped punctuation inside a unit stays in the slice).

    Why: callers that edit or display the original text (cropping, highlighting, mixing synthetic
    segments) need the offsets of the units the aligner timed.
    """
    lang = (resolve_language(language) or "").lower()
    if lang not in ("japanese", "korean"):
        return _default_spans(text, convention)
    spans: list[tuple[str, int, int]] = []
    pos = 0
    for unit in split_words(text, language, convention=convention, korean_dict=korean_dict):
        start = None
        for ch in unit:  # units are the text's kept characters in order, so a forward scan finds them
            while pos < len(text) and text[pos] != ch:
                if is_kept_char(text[pos], convention):
                    raise ValueError(f"unit {unit!r} does not occur in order in {text!r}")
                pos += 1
            if pos == len(text):
                raise ValueError(f"unit {unit!r} does not occur in order in {text!r}")
            start = pos if start is None else start
            pos += 1
        spans.append((unit, start if start is not None else pos, pos))
    return spans


def _default_spans(text: str, convention: Convention) -> list[tuple[str, int, int]]:
    """The whitespace / CJK path with offsets. Character by character, this equals both transformers'
    loop and upstream's ``split() -> clean_token -> split_segment_with_chinese`` for its convention."""
    spans: list[tuple[str, int, int]] = []
    buf: list[str] = []
    start = end = 0
    for i, ch in enumerate(text):
        if ch.isspace() or (is_cjk_char(ch, convention) and is_kept_char(ch, convention)):
            if buf:
                spans.append(("".join(buf), start, end))
                buf.clear()
            if not ch.isspace():
                spans.append((ch, i, i + 1))
        elif is_kept_char(ch, convention):
            if not buf:
                start = i
            buf.append(ch)
            end = i + 1
    if buf:
        spans.append(("".join(buf), start, end))
    return spans


def _clean_all(tokens: list[str], convention: Convention) -> list[str]:
    return [cleaned for token in tokens if (cleaned := clean_token(token, convention))]


def _nagisa_words(text: str) -> list[str]:
    try:
        import nagisa
    except ImportError as err:  # same message transformers gives
        raise ImportError(
            "Japanese forced alignment requires the `nagisa` package. Install it with: pip install nagisa"
        ) from err
    return list(nagisa.tagging(text).words)


@functools.lru_cache(maxsize=4)
def _korean_tokenizer(convention: Convention, korean_dict: str | Path | None) -> LTokenizer:
    try:
        from soynlp.tokenizer import LTokenizer
    except ImportError as err:
        raise ImportError(
            "Korean forced alignment requires the `soynlp` package. Install it with: pip install soynlp"
        ) from err
    if convention == "transformers":
        return LTokenizer()
    path = Path(korean_dict) if korean_dict is not None else _find_qwen_asr_korean_dict()
    scores: dict[str, float] = {}
    with open(path, encoding="utf-8") as f:  # upstream: first field of each non-empty line, score 1.0
        for line in f:
            if line.strip():
                scores[line.split()[0]] = 1.0
    return LTokenizer(scores=scores)


def _find_qwen_asr_korean_dict() -> Path:
    spec = importlib.util.find_spec("qwen_asr")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "inference" / "assets" / "korean_dict_jieba.dict"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "convention='qwen_asr' for Korean needs qwen-asr's korean_dict_jieba.dict (upstream scores every entry "
        "1.0); pass korean_dict=<path> or install the qwen-asr package"
    )
