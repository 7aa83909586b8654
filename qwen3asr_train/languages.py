"""Language names, ISO codes and metric families for the Qwen3-ASR family.

Why this module exists: the model emits (and is prompted with) Title-case full language names in
``language {Name}<asr_text>``; users write manifests with names, ISO codes or Chinese dialect names.
Every stage (data checks, targets, metrics, rewards) must agree on one canonical name, so the mapping
lives here and nowhere else.

Sources: upstream ``qwen_asr/inference/utils.py`` ``SUPPORTED_LANGUAGES`` (30 names) and transformers
5.23 ``processing_qwen3_asr.LANGUAGE_CODE_TO_NAME`` (the same 30 names keyed by ISO code). The 22
Chinese dialects are those listed in the Qwen3-ASR model card; the upstream output vocabulary has no
dialect tags, so a dialect label maps to the language the model writes in its target (``Chinese``, or
``Cantonese`` for the two Cantonese accents) and the dialect is kept separately for per-dialect reports.
"""

from __future__ import annotations

from collections.abc import Iterable

LANGUAGE_CODE_TO_NAME: dict[str, str] = {
    "ar": "Arabic",
    "yue": "Cantonese",
    "zh": "Chinese",
    "cs": "Czech",
    "da": "Danish",
    "nl": "Dutch",
    "en": "English",
    "fil": "Filipino",
    "fi": "Finnish",
    "fr": "French",
    "de": "German",
    "el": "Greek",
    "hi": "Hindi",
    "hu": "Hungarian",
    "id": "Indonesian",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "mk": "Macedonian",
    "ms": "Malay",
    "fa": "Persian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "es": "Spanish",
    "sv": "Swedish",
    "th": "Thai",
    "tr": "Turkish",
    "vi": "Vietnamese",
}
"""ISO 639 code -> the full name the model uses in ``language {Name}<asr_text>``."""

SUPPORTED_LANGUAGES: tuple[str, ...] = tuple(LANGUAGE_CODE_TO_NAME.values())
"""The 30 language names of Qwen3-ASR, in upstream order."""

CHINESE_DIALECTS: dict[str, str] = {
    "Anhui": "Chinese",
    "Dongbei": "Chinese",
    "Fujian": "Chinese",
    "Gansu": "Chinese",
    "Guizhou": "Chinese",
    "Hebei": "Chinese",
    "Henan": "Chinese",
    "Hubei": "Chinese",
    "Hunan": "Chinese",
    "Jiangxi": "Chinese",
    "Ningxia": "Chinese",
    "Shandong": "Chinese",
    "Shaanxi": "Chinese",
    "Shanxi": "Chinese",
    "Sichuan": "Chinese",
    "Tianjin": "Chinese",
    "Yunnan": "Chinese",
    "Zhejiang": "Chinese",
    "Wu": "Chinese",
    "Minnan": "Chinese",
    "Cantonese (Hong Kong)": "Cantonese",
    "Cantonese (Guangdong)": "Cantonese",
}
"""Dialect label -> the language name written in the target (see the module docstring)."""

FORCED_ALIGNER_LANGUAGES: tuple[str, ...] = (
    "Chinese",
    "English",
    "Cantonese",
    "French",
    "German",
    "Italian",
    "Japanese",
    "Korean",
    "Portuguese",
    "Russian",
    "Spanish",
)
"""The 11 languages of Qwen3-ForcedAligner-0.6B."""

CER_LANGUAGES: frozenset[str] = frozenset({"Chinese", "Cantonese", "Japanese", "Korean", "Thai"})
"""Languages scored by character error rate (the paper names zh, yue, ko; ja and th are not
space-delimited, so a WER would be meaningless). Everything else is scored by WER."""

NO_SPEECH = "None"
"""The language tag of a no-speech target: ``language None<asr_text>``."""


class UnknownLanguageError(ValueError):
    """A language label that is neither a configured name, an ISO code nor a dialect."""


class LanguageTable:
    """Resolves user-facing language labels to the canonical names the model is trained on.

    Why a class: the set of allowed names is configuration (users extend it to teach the model a new
    language), so the resolver carries that set instead of reading a global.
    """

    def __init__(self, extra_languages: Iterable[str] = (), allow_dialects: bool = True) -> None:
        self.names: tuple[str, ...] = SUPPORTED_LANGUAGES + tuple(
            name for name in extra_languages if name not in SUPPORTED_LANGUAGES
        )
        self._by_lower: dict[str, str] = {name.lower(): name for name in self.names}
        self._by_lower.update({code.lower(): name for code, name in LANGUAGE_CODE_TO_NAME.items()})
        self._dialects: dict[str, str] = {}
        if allow_dialects:
            self._dialects = {d.lower(): d for d in CHINESE_DIALECTS}

    def resolve(self, label: str) -> tuple[str, str | None]:
        """Return ``(target language name, dialect or None)`` for a manifest label.

        Raises:
            UnknownLanguageError: when the label is not a configured name, ISO code or dialect.
        """
        key = label.strip().lower()
        if key in self._by_lower:
            return self._by_lower[key], None
        if key in self._dialects:
            dialect = self._dialects[key]
            return CHINESE_DIALECTS[dialect], dialect
        raise UnknownLanguageError(
            f"unknown language {label!r}: not one of the configured names ({', '.join(self.names)}), "
            f"their ISO codes, or a Chinese dialect name; add it to data.extra_languages to train a new language"
        )


def metric_for_language(language: str | None) -> str:
    """``"cer"`` for character languages, ``"wer"`` otherwise (``None`` = no speech, scored as ``"wer"``)."""
    return "cer" if language in CER_LANGUAGES else "wer"
