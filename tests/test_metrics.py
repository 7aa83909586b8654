"""Tests for the evaluation metrics: every number is checked against jiwer or a hand count."""

from __future__ import annotations

import random

import jiwer
import pytest

from qwen3asr_train.eval.metrics import (
    AlignOp,
    ErrorCounts,
    MetricAggregator,
    ParsedOutput,
    align,
    capped_error_rate,
    detect_repetition,
    format_alignment,
    language_id_accuracy,
    no_speech_precision_recall,
    parse_asr_output,
    score_tokens,
    score_utterance,
    tokenize,
)
from qwen3asr_train.eval.normalize import NORMALIZER_VERSION, NormalizerOptions, normalize


def sdi(counts: ErrorCounts) -> tuple[int, int, int, int]:
    return counts.substitutions, counts.deletions, counts.insertions, counts.hits


def jiwer_sdi(ref: str, hyp: str) -> tuple[int, int, int, int]:
    out = jiwer.process_words(ref, hyp)
    return out.substitutions, out.deletions, out.insertions, out.hits


# ------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Mr. Smith paid $20.", "mister smith paid $20"),
        ("mister smith paid twenty dollars", "mister smith paid $20"),
        ("Hello, World!", "hello world"),
        ("I'm gonna colour it", "i am going to color it"),
        ("I\u2019m OK", "i am ok"),  # curly apostrophe expands like a straight one
        ("Um, the [noise] answer (laughs) is twenty-five percent.", "the answer is 25%"),
    ],
)
def test_english_normaliser(raw: str, expected: str) -> None:
    assert normalize(raw, "English") == expected


def test_basic_normaliser_keeps_marks_and_strips_diacritics_on_request() -> None:
    assert normalize("Très bien, merci!", "French") == "très bien merci"
    assert normalize("Très bien, merci!", "French", remove_diacritics=True) == "tres bien merci"
    assert normalize("नमस्ते दुनिया!", "Hindi") == "नमस्ते दुनिया"  # vowel signs are marks: kept
    assert normalize("Hola  MUNDO", None) == "hola mundo"


def test_character_normaliser() -> None:
    assert normalize("我今天去了 Starbucks Coffee。", "Chinese") == "我今天去了starbucks coffee"
    assert normalize("ｺｰﾋｰを飲む、ＡＢＣ！", "Japanese") == "コーヒーを飲むabc"  # NFKC width folding
    assert normalize("안녕하세요, 반갑습니다!", "Korean") == "안녕하세요반갑습니다"
    assert normalize("สวัสดี ครับ!", "Thai") == "สวัสดีครับ"
    assert normalize("一样 2024年", "Chinese") == "一样2024年"  # numerals left alone
    assert normalize("學習漢語", "Chinese") == "學習漢語"
    assert normalize("學習漢語", "Chinese", to_simplified=True) == "学习汉语"
    assert normalize("學習漢語", "Japanese", to_simplified=True) == "學習漢語"  # not Chinese: untouched


def test_normaliser_rejects_non_canonical_labels_and_unknown_options() -> None:
    for label in ("zh", "english", "Sichuan"):
        with pytest.raises(ValueError):
            normalize("x", label)
    assert normalize("Hello", "Klingon") == "hello"  # user-added languages get the basic rules
    with pytest.raises(ValueError, match="unknown normaliser option"):
        NormalizerOptions.from_mapping({"lowercase": True})
    assert NormalizerOptions.from_mapping({"to_simplified": True}).as_dict() == {
        "normalizer_version": NORMALIZER_VERSION,
        "remove_diacritics": False,
        "to_simplified": True,
    }


# ---------------------------------------------------------------------------------- word error rate


@pytest.mark.parametrize(
    ("ref", "hyp"),
    [
        ("Mr. Smith paid $20.", "mister smith paid twenty dollars"),
        ("The colour of the sky is blue.", "the color of sky is blue today"),
        ("Hello, world! How are you?", "hello word how r you"),
        ("It's 3:30 p.m. on the 1st of May.", "its three thirty pm on the first of may"),
        ("a b c d", "a x c d e"),
        ("a b c", "c a b"),
    ],
)
def test_wer_matches_jiwer_on_normalised_text(ref: str, hyp: str) -> None:
    score = score_utterance(ref, hyp, "English")
    nref, nhyp = normalize(ref, "English"), normalize(hyp, "English")
    assert score.ref_tokens == nref.split() and score.hyp_tokens == nhyp.split()
    assert sdi(score.counts) == jiwer_sdi(nref, nhyp)
    assert score.counts.rate == pytest.approx(jiwer.wer(nref, nhyp))
    assert score.metric == "wer" and score.normalizer_version == NORMALIZER_VERSION


def test_normalisation_matters_hand_counts() -> None:
    # raw jiwer is case/punctuation/number sensitive: only "paid" matches (3 S + 1 I over 4 words)
    assert jiwer.wer("Mr. Smith paid $20.", "mister smith paid twenty dollars") == 1.0
    assert score_utterance("Mr. Smith paid $20.", "mister smith paid twenty dollars", "English").counts.rate == 0.0
    # contractions expand, ordinals become "1st"; only "p.m." vs "PM" differs
    score = score_utterance("It's 3:30 p.m. on the 1st of May.", "It is 3:30 PM on the first of May", "English")
    assert " ".join(score.ref_tokens) == "it is 3 30 p m on the 1st of may"
    assert " ".join(score.hyp_tokens) == "it is 3 30 pm on the 1st of may"
    # "p m" vs "pm": 1 substitution + 1 deletion, 9 hits over 11 words
    assert sdi(score.counts) == (1, 1, 0, 9)


def test_alignment_fuzz_against_jiwer() -> None:
    rng = random.Random(0)
    for _ in range(300):
        ref = [rng.choice("abcd") for _ in range(rng.randint(1, 12))]
        hyp = [rng.choice("abcde") for _ in range(rng.randint(0, 14))]
        counts = score_tokens(ref, hyp, "word").counts
        s, d, i, h = jiwer_sdi(" ".join(ref), " ".join(hyp))
        assert sdi(counts) == (s, d, i, h)  # the split too, ties included: the same algorithm as jiwer
        assert counts.ref_units == len(ref) and counts.hyp_units == len(hyp)


def test_alignment_ops_and_errs_line() -> None:
    ops = align("a b c d".split(), "a x c d e".split())
    assert ops == [
        AlignOp("hit", "a", "a"),
        AlignOp("sub", "b", "x"),
        AlignOp("hit", "c", "c"),
        AlignOp("hit", "d", "d"),
        AlignOp("ins", None, "e"),
    ]
    assert format_alignment(ops) == "a (b->x) c d (*->e)"
    assert format_alignment(align(["a", "b"], ["b"])) == "(a->*) b"


# ------------------------------------------------------------------------------ character error rate


def test_cer_chinese_japanese_korean_hand_counts() -> None:
    zh = score_utterance("今天天气很好。", "今天天汽很好啊", "Chinese")
    assert sdi(zh.counts) == (1, 0, 1, 5) and zh.counts.rate == pytest.approx(2 / 6) and zh.metric == "cer"
    ja = score_utterance("ｺｰﾋｰを飲む。", "コーヒー飲む", "Japanese")  # half-width folds; "を" deleted
    assert sdi(ja.counts) == (0, 1, 0, 6) and ja.counts.rate == pytest.approx(1 / 7)
    ko = score_utterance("안녕하세요 반갑습니다", "안녕하세요 반갑습니다요", "Korean")
    assert sdi(ko.counts) == (0, 0, 1, 10) and ko.counts.rate == pytest.approx(0.1)
    assert score_utterance("안녕하세요 반갑습니다", "안녕 하세요반갑습니다", "Korean").counts.rate == 0.0
    for score in (zh, ja, ko):  # independent check: jiwer CER on the normalised, space-free strings
        ref, hyp = "".join(score.ref_tokens), "".join(score.hyp_tokens)
        assert score.counts.rate == pytest.approx(jiwer.cer(ref, hyp))


def test_traditional_to_simplified_option() -> None:
    assert score_utterance("學習漢語", "学习汉语", "Chinese").counts.substitutions == 4
    opts = NormalizerOptions(to_simplified=True)
    assert score_utterance("學習漢語", "学习汉语", "Chinese", options=opts).counts.rate == 0.0


def test_code_switch_mixed_and_character_units() -> None:
    ref = "我今天去了Starbucks买coffee"
    assert tokenize(normalize(ref, "Chinese"), "mixed") == ["我", "今", "天", "去", "了", "starbucks", "买", "coffee"]
    same = score_utterance(ref, "我今天去了 starbucks 买 Coffee。", "Chinese", unit="mixed")
    assert same.counts.rate == 0.0 and same.metric == "mer"
    # 星巴克 for Starbucks: 1 substitution + 2 insertions over 8 mixed units
    mer = score_utterance(ref, "我今天去了星巴克买coffee", "Chinese", unit="mixed")
    assert mer.counts.errors == 3 and mer.counts.ref_units == 8 and mer.counts.hits == 7
    # as plain CER: "starbucks" (9 chars) vs "星巴克" (3): 3 substitutions + 6 deletions over 21 chars
    cer = score_utterance(ref, "我今天去了星巴克买coffee", "Chinese")
    assert sdi(cer.counts) == (3, 6, 0, 12) and cer.counts.rate == pytest.approx(9 / 21)
    assert cer.counts.rate == pytest.approx(jiwer.cer("".join(cer.ref_tokens), "".join(cer.hyp_tokens)))
    # two Latin words in a row stay two mixed units
    assert tokenize(normalize("去 Starbucks coffee 店", "Chinese"), "mixed") == ["去", "starbucks", "coffee", "店"]


def test_unknown_unit_raises() -> None:
    with pytest.raises(ValueError, match="unknown error unit"):
        score_utterance("a", "a", "English", unit="phoneme")
    with pytest.raises(ValueError, match="unknown error unit"):
        MetricAggregator(unit="syllable")


# ------------------------------------------------------------------------------------------ edge cases


def test_empty_reference_is_never_divided_by_zero() -> None:
    assert jiwer.wer("", "abc def") == 2  # the pitfall: a count, not a rate
    clean = score_utterance("", "", None).counts
    assert (clean.empty_refs, clean.hallucinations, clean.rate) == (1, 0, 0.0)
    bad = score_utterance("", "Thank you for watching!", None).counts
    assert (bad.hallucinations, bad.hallucinated_units, bad.insertions, bad.rate) == (1, 4, 0, 1.0)
    assert score_utterance("[noise]", "", "English").counts.empty_refs == 1  # normalises to empty
    # hallucinated units stay out of the corpus error rate
    total = bad + score_utterance("a b c d", "a b c", "English").counts
    assert total.rate == pytest.approx(1 / 4) and total.hallucination_rate == 1.0
    assert sum([bad, clean], ErrorCounts()).hallucination_rate == 0.5
    assert sum([bad, clean]).utterances == 2


def test_empty_hypothesis_and_long_hypothesis() -> None:
    empty = score_utterance("hello big world", "", "English").counts
    assert sdi(empty) == (0, 3, 0, 0) and empty.rate == 1.0
    tripled = " ".join(["hello world"] * 3)
    long = score_utterance("hello world", tripled, "English")
    assert long.counts.rate == pytest.approx(jiwer.wer("hello world", tripled)) == 2.0
    assert capped_error_rate(long.counts) == 1.0 and capped_error_rate(0.25) == 0.25


# --------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("raw", "forced", "expected"),
    [
        ("language English<asr_text>Hello world.", None, ParsedOutput("English", "Hello world.", False, True)),
        ("language Chinese<asr_text>你好<|im_end|>\n", None, ParsedOutput("Chinese", "你好", False, True)),
        ("language None<asr_text>", None, ParsedOutput(None, "", True, True)),
        ("language None<asr_text><|endoftext|>", None, ParsedOutput(None, "", True, True)),
        ("language None<asr_text>thanks for watching", None, ParsedOutput(None, "thanks for watching", True, True)),
        ("Hello world.<|im_end|>", "English", ParsedOutput("English", "Hello world.", False, True, True)),
        ("Hello world.", None, ParsedOutput(None, "Hello world.", False, False)),
        ("language English Hello world.", None, ParsedOutput(None, "language English Hello world.", False, False)),
        ("English<asr_text>Hello", None, ParsedOutput(None, "English<asr_text>Hello", False, False)),
        ("language <asr_text>Hello", None, ParsedOutput(None, "language <asr_text>Hello", False, False)),
    ],
)
def test_parse_asr_output(raw: str, forced: str | None, expected: ParsedOutput) -> None:
    assert parse_asr_output(raw, forced_language=forced) == expected


def test_parse_keeps_repetition_loops() -> None:
    loop = "好的" * 40
    parsed = parse_asr_output(f"language Chinese<asr_text>{loop}<|im_end|>")
    assert parsed.text == loop and parsed.format_ok
    assert parse_asr_output("language English<asr_text>" + "la " * 50).text == ("la " * 50).strip()


# ------------------------------------------------------------------------------------------ repetition


def test_repetition_loops_detected() -> None:
    words = detect_repetition("So I said " + "the cat " * 10 + "and left.", "English")
    assert words.loop and words.flagged and words.ngram == ("the", "cat") and words.repeats == 10
    assert words.start == 3
    chars = detect_repetition("我说" + "好的" * 8, "Chinese")
    assert chars.loop and chars.ngram == ("好", "的") and chars.repeats == 8
    # a 3x-repeated long phrase must not hide a real loop elsewhere
    phrase = " ".join(f"w{i}" for i in range(10))
    hidden = detect_repetition(" ".join([phrase] * 3) + " " + "na " * 12, "English")
    assert hidden.loop and hidden.ngram == ("na",) and hidden.repeats == 12


def test_repetition_negatives() -> None:
    assert not detect_repetition("no no no I don't think so", "English").flagged
    assert not detect_repetition("哈哈哈哈哈", "Chinese").loop  # 5 units: below min_span
    assert not detect_repetition("very very good, very very good", "English").loop
    assert detect_repetition("哈哈哈哈哈", "Chinese", min_span=5).loop


def test_output_too_long_for_audio() -> None:
    text = " ".join(f"w{chr(97 + i)}" for i in range(26)) + " a b c d"  # 30 distinct words (no digits:
    # the English normaliser splits "word1" into "word 1")
    report = detect_repetition(text, "English", audio_seconds=2.0)
    assert report.too_long and not report.loop and report.units == 30
    assert report.units_per_second == 15.0 and report.max_units == 6.0 * 2 + 5
    assert not detect_repetition(" ".join(f"mot{i}" for i in range(17)), "French", audio_seconds=2.0).too_long
    assert detect_repetition(" ".join(f"mot{i}" for i in range(18)), "French", audio_seconds=2.0).too_long
    assert detect_repetition("你我他" * 6, "Chinese", audio_seconds=1.0).too_long  # 18 > 12 + 5
    assert not detect_repetition("你我他" * 5, "Chinese", audio_seconds=1.0).too_long  # 15 <= 17
    thai = "สวัสดีครับ" * 2  # 20 code points in 1 s: fine for Thai (25/s + 5)
    assert not detect_repetition(thai, "Thai", audio_seconds=1.0).too_long
    with pytest.raises(ValueError):
        detect_repetition("a", "English", audio_seconds=0.0)


# ------------------------------------------------------------------------------------ LID, no speech


def test_language_id_accuracy_and_confusions() -> None:
    stats = language_id_accuracy(
        [
            ("English", "English"),
            ("Chinese", "Cantonese"),
            ("Chinese", "Chinese"),
            ("Chinese", "Cantonese"),
            ("Spanish", None),
        ]
    )
    assert stats.total == 5 and stats.correct == 2 and stats.accuracy == pytest.approx(0.4)
    assert stats.confusions == {("Chinese", "Cantonese"): 2, ("Spanish", "None"): 1}
    assert stats.as_dict()["confusions"] == {"Chinese->Cantonese": 2, "Spanish->None": 1}
    assert language_id_accuracy([]).accuracy is None


def test_no_speech_precision_recall() -> None:
    # (reference no speech, predicted language None): tp=2, fp=1, fn=1, tn=2
    stats = no_speech_precision_recall(
        [(True, True), (True, True), (False, True), (True, False), (False, False), (False, False)]
    )
    assert (stats.tp, stats.fp, stats.fn, stats.tn) == (2, 1, 1, 2)
    assert stats.precision == pytest.approx(2 / 3) and stats.recall == pytest.approx(2 / 3)
    assert no_speech_precision_recall([(False, False)]).precision is None


# ------------------------------------------------------------------------------------------- corpus


def test_corpus_and_macro_averages_on_two_languages() -> None:
    agg = MetricAggregator()
    # English: 1 deletion over 4 words, 2 insertions over 2 words -> 3/6
    agg.add("dev", "English", "a b c d", "a b c")
    agg.add("dev", "English", "e f", "e f g h")
    # Chinese: 2 deletions over 4 chars, 0 over 4 chars -> 2/8
    agg.add("dev", "Chinese", "你好世界", "你好")
    agg.add("dev", "Chinese", "谢谢你们", "谢谢你们")
    # a no-speech item with a hallucination: outside every rate, reported separately
    agg.add("dev", None, "", parse_asr_output("language English<asr_text>thanks for watching"))
    agg.add("test", "English", "a b", "a c")
    summary = agg.summary()
    dev = summary["sets"]["dev"]
    assert dev["languages"]["English"]["rate"] == pytest.approx(0.5)
    assert dev["languages"]["English"]["metric"] == "wer"
    assert dev["languages"]["Chinese"]["rate"] == pytest.approx(0.25)
    assert dev["languages"]["Chinese"]["metric"] == "cer"
    assert dev["corpus"]["rate"] == pytest.approx(5 / 14)
    assert dev["macro"] == pytest.approx((0.5 + 0.25) / 2)
    assert dev["languages"]["None"]["hallucinations"] == 1 and dev["corpus"]["hallucinated_units"] == 3
    assert dev["no_speech"] == {"tp": 0, "fp": 0, "fn": 1, "tn": 0, "precision": None, "recall": 0.0}
    # pooled over sets: English 4/8, Chinese 2/8
    assert summary["languages"]["English"]["rate"] == pytest.approx(0.5)
    assert summary["macro"] == pytest.approx((0.5 + 0.25) / 2)
    assert summary["sets"]["test"]["corpus"]["rate"] == pytest.approx(0.5)
    assert summary["normalizer_version"] == NORMALIZER_VERSION


def test_aggregator_records_lid_and_format_errors() -> None:
    agg = MetricAggregator()
    agg.add("dev", "English", "hello", parse_asr_output("language English<asr_text>hello<|im_end|>"))
    agg.add("dev", "Chinese", "你好", parse_asr_output("language Cantonese<asr_text>你好"))
    agg.add("dev", "English", "hello", parse_asr_output("hello"))
    agg.add("dev", "French", "bonjour", parse_asr_output("bonjour", forced_language="French"))
    agg.add("dev", "English", "hello", parse_asr_output("language None<asr_text>"))
    dev = agg.summary()["sets"]["dev"]
    assert dev["format_errors"] == 1
    assert dev["lid"]["total"] == 4 and dev["lid"]["correct"] == 1  # the forced item is skipped
    assert dev["lid"]["confusions"] == {"Chinese->Cantonese": 1, "English-><malformed>": 1, "English->None": 1}
    assert dev["no_speech"]["fp"] == 1 and dev["no_speech"]["tn"] == 3
    with pytest.raises(ValueError, match="mixing units"):
        agg.add_counts("dev", "English", ErrorCounts(hits=1, utterances=1), "char")


def test_tag_loop_is_a_format_error() -> None:
    """A model stuck writing ``<asr_text>`` has not produced the ``language X<asr_text>text`` shape."""
    looped = parse_asr_output("language English" + "<asr_text>" * 35 + "<|im_end|>")
    assert not looped.format_ok and looped.language is None
    assert parse_asr_output("<asr_text>" * 35).format_ok is False
    assert parse_asr_output("language English<asr_text>hello <asr_text>").format_ok is False


def test_undecodable_bytes_are_shown_as_such(tiny_model_and_processor) -> None:
    """A lone byte token that starts a character reads as ``\\xNN``, not U+FFFD; whole characters are unchanged."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from qwen3asr_train.eval.decode import decode_readable

    tok = tiny_model_and_processor[1].tokenizer
    ids = tok.encode("你好 hi", add_special_tokens=False)
    assert decode_readable(tok, ids) == tok.decode(ids) == "你好 hi"
    lone = tok.convert_tokens_to_ids(bytes_to_unicode()[0xE4])  # first of the 3 bytes of 你
    broken = [lone, *tok.encode(" hi", add_special_tokens=False)]
    assert "\ufffd" in tok.decode(broken)
    assert decode_readable(tok, broken) == "\\xe4 hi"
