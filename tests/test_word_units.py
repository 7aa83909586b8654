"""Aligner word units must equal what inference produces: transformers' ``split_words_for_alignment``."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from qwen3asr_train.data.word_units import split_words, word_spans

Qwen3ASRProcessor = pytest.importorskip("transformers.models.qwen3_asr.processing_qwen3_asr").Qwen3ASRProcessor

HAS_NAGISA = importlib.util.find_spec("nagisa") is not None
HAS_SOYNLP = importlib.util.find_spec("soynlp") is not None


def transformers_units(text: str, language: str | None) -> list[str]:
    # The method uses only ``text`` and ``language``, so no processor (tokenizer, feature extractor) is needed.
    return Qwen3ASRProcessor.split_words_for_alignment(None, text, language)


CASES = [
    ("Hello, world! It's 3:45 p.m. — don't-stop.", "English"),
    ("  The 2nd   try\tworked;\nrock'n'roll (live) 100% ", "English"),
    ("'quoted' words, O'Neil's cat", "English"),
    ("我爱Python编程，真的！", "Chinese"),
    ("「你好」，世界。ＡＢＣ１２３ 和 GPT-4o 模型", "Chinese"),
    ("第3届iPhone发布会（2024年）", "Chinese"),
    ("佢哋喺度食緊飯啦。", "Cantonese"),
    ("Ça va très bien, l'été dernier… « oui » !", "French"),
    ("Cafe\u0301 na\u00efve", "French"),  # combining acute (Mn) is dropped, precomposed kept
    ("Straße über Äpfel: 3½ Stück.", "German"),
    ("¿Qué tal? ¡Muy bien, señor!", "Spanish"),
    ("Привет, мир! Ёлка — 2024.", "Russian"),
    ("ab\U0002f800c 你\U0002f801好", None),  # CJK compatibility supplement: transformers-only range
    ("?!... ——", "English"),
    ("", "Chinese"),
]


@pytest.mark.parametrize(("text", "language"), CASES)
def test_default_path_equals_transformers(text: str, language: str | None) -> None:
    assert split_words(text, language) == transformers_units(text, language)


@pytest.mark.parametrize(("text", "language"), CASES)
def test_word_spans_point_at_the_units(text: str, language: str | None) -> None:
    spans = word_spans(text, language)
    assert [u for u, _, _ in spans] == split_words(text, language)
    for unit, start, end in spans:
        piece = text[start:end]
        assert piece[0] == unit[0] and piece[-1] == unit[-1] and all(ch in piece for ch in unit)


def test_iso_codes_resolve_like_the_processor() -> None:
    # prepare_forced_aligner_inputs maps codes to names before splitting; so do we.
    assert split_words("Hello, world", "en") == split_words("Hello, world", "English")
    assert split_words("你好", "zh") == ["你", "好"]


def test_qwen_asr_convention_differences() -> None:
    text = "ab\U0002f800c 你\U0002f801\U0002f802好"
    assert split_words(text, None) == ["ab", "\U0002f800", "c", "你", "\U0002f801", "\U0002f802", "好"]
    assert split_words(text, None, convention="qwen_asr") == ["ab\U0002f800c", "你", "\U0002f801\U0002f802", "好"]
    # unassigned code point in a CJK range: transformers keeps it, upstream's cleaning drops it
    assert split_words("a\ufadab", None) == ["a", "\ufada", "b"]
    assert split_words("a\ufadab", None, convention="qwen_asr") == ["ab"]


@pytest.mark.skipif(not HAS_NAGISA, reason="nagisa not installed (pip install nagisa==0.3.0)")
@pytest.mark.parametrize(
    "text", ["東京都に住んでいます。", "今日は、いい天気ですね！ GPT-4を使う。", " カタカナ　テスト "]
)
def test_japanese_equals_transformers(text: str) -> None:
    assert split_words(text, "Japanese") == transformers_units(text, "Japanese")
    assert split_words(text, "ja") == split_words(text, "Japanese")
    assert [u for u, _, _ in word_spans(text, "Japanese")] == split_words(text, "Japanese")


@pytest.mark.skipif(not HAS_SOYNLP, reason="soynlp not installed (pip install soynlp==0.0.493)")
@pytest.mark.parametrize("text", ["안녕하세요, 저는 학생입니다!", "서울에서 2024년에 만났어요."])
def test_korean_equals_transformers(text: str) -> None:
    assert split_words(text, "Korean") == transformers_units(text, "Korean")


@pytest.mark.skipif(not HAS_SOYNLP, reason="soynlp not installed (pip install soynlp==0.0.493)")
def test_korean_qwen_asr_convention_uses_dictionary_scores(tmp_path) -> None:
    ko_dict = tmp_path / "korean_dict_jieba.dict"
    ko_dict.write_text("학생 10 n\n안녕 3 n\n\n", encoding="utf-8")
    text = "안녕하세요 저는 학생입니다"
    assert split_words(text, "Korean") == ["안녕하세요", "저는", "학생입니다"]
    assert split_words(text, "Korean", convention="qwen_asr", korean_dict=ko_dict) == [
        "안녕",
        "하세요",
        "저는",
        "학생",
        "입니다",
    ]


def test_missing_tokenizer_packages_raise_clear_import_errors(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nagisa", None)
    with pytest.raises(ImportError, match="requires the `nagisa` package"):
        split_words("日本語", "Japanese")
    monkeypatch.setitem(sys.modules, "soynlp.tokenizer", None)
    from qwen3asr_train.data import word_units

    word_units._korean_tokenizer.cache_clear()
    with pytest.raises(ImportError, match="requires the `soynlp` package"):
        split_words("한국어", "Korean")
    word_units._korean_tokenizer.cache_clear()
