"""GSPO reward terms: hand-computed values, the target ordering (spec §6), and the no-speech/jiwer pitfall (§5.2)."""

from __future__ import annotations

import pytest
import torch

from qwen3asr_train.eval import metrics
from qwen3asr_train.rl import rewards as R
from qwen3asr_train.rl.gspo import group_advantages
from qwen3asr_train.rl.rewards import (
    DEFAULT_REWARD_WEIGHTS,
    REWARDS,
    CompositeReward,
    RewardInput,
    get_reward,
    register_reward,
)

REF = "The quick brown fox jumps over the lazy dog."
EN = "language English<asr_text>"


def speech(hyp: str, reference: str = REF, language: str = "English", **kw) -> RewardInput:
    prefix = "" if kw.get("forced_language") else f"language {language}<asr_text>"
    return RewardInput(prefix + hyp, reference, language, **{"audio_seconds": 3.0, **kw})


def silence(completion: str) -> RewardInput:
    return RewardInput(completion, "", None, audio_seconds=3.0)


def length_bonus(x: RewardInput) -> float:
    """A custom reward loaded by import path."""
    return float(len(x.hypothesis_units))


NOT_CALLABLE = 3


# --------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    ("reference", "hypothesis", "language", "expected"),
    [
        ("Hello, World!", "hello world", "English", 1.0),  # case + punctuation normalised away
        ("I'm going home.", "I am going to home", "English", 0.75),  # i am going home (4) + 1 insertion
        (REF, "The quick brown fox jumped over a dog.", "English", 1 - 3 / 9),  # 2 subs + 1 deletion
        ("今天天气很好。", "今天天汽很好！", "Chinese", 1 - 1 / 6),  # CER, full-width punctuation removed
        ("今天天气很好", "今天天气", "Chinese", 1 - 2 / 6),  # 2 character deletions
        ("hello world", "", "English", 0.0),  # empty hypothesis on speech: ER 1
        ("hello world", "hello world " * 4, "English", 0.0),  # 6 insertions / 2 words: capped, not -2
        ("hello world", "a b c d e f g h", "English", 0.0),  # 2 subs + 6 ins, capped
    ],
)
def test_accuracy_hand_computed(reference: str, hypothesis: str, language: str, expected: float) -> None:
    assert R.accuracy(speech(hypothesis, reference, language)) == pytest.approx(expected)


def test_accuracy_uses_raw_text_and_wrong_tag_keeps_text_score() -> None:
    looped = speech("hello world" + " world" * 20, "hello world")
    assert R.accuracy(looped) == 0.0  # the loop is not repaired away
    mistagged = RewardInput("language German<asr_text>hello world", "hello world", "English")
    assert R.accuracy(mistagged) == 1.0 and R.language_id(mistagged) == 0.0


def test_malformed_output_scored_on_whole_string_with_format_penalty() -> None:
    bare = RewardInput(REF, REF, "English")  # no language prefix at all
    assert R.format_reward(bare) == -1.0 and R.accuracy(bare) == 1.0 and R.language_id(bare) == 0.0
    broken = RewardInput("language English the quick brown fox", REF, "English")  # no <asr_text>
    assert R.format_reward(broken) == -1.0 and R.accuracy(broken) < 0.5


def test_no_speech_never_reaches_the_scorer(monkeypatch: pytest.MonkeyPatch) -> None:
    import jiwer

    def boom(*args, **kwargs):
        raise AssertionError("jiwer must not be called")

    for name in ("wer", "cer", "mer", "process_words", "process_characters"):
        monkeypatch.setattr(jiwer, name, boom, raising=False)
    real_score_tokens, real_align = metrics.score_tokens, metrics.align

    def guarded_score_tokens(ref_tokens, hyp_tokens, unit):
        assert ref_tokens, "scorer called with an empty reference"
        return real_score_tokens(ref_tokens, hyp_tokens, unit)

    def guarded_align(ref, hyp):
        assert ref, "alignment with an empty reference"
        return real_align(ref, hyp)

    monkeypatch.setattr(metrics, "score_tokens", guarded_score_tokens)
    monkeypatch.setattr(metrics, "align", guarded_align)
    monkeypatch.setattr(metrics, "score_utterance", boom)

    cases = {
        "language None<asr_text>": (1.0, 1.0, 1.0),
        "language None<asr_text>Thank you for watching.": (0.0, 1.0, -1.0),
        "language English<asr_text>Thank you.": (0.0, 0.0, -1.0),
        "language English<asr_text>": (0.0, 0.0, -1.0),  # empty, but the tag says speech
        "Thank you.": (0.0, 0.0, -1.0),  # malformed
    }
    for completion, (acc, lid, ns) in cases.items():
        x = silence(completion)
        assert (R.accuracy(x), R.language_id(x), R.no_speech(x)) == (acc, lid, ns), completion
    total, _ = CompositeReward()([silence(c) for c in cases])
    assert total[0] > total[1:].max()  # correct no-speech answer beats every speech output
    assert RewardInput("language None<asr_text>", "", "None").language is None  # "None" label accepted


def test_predicting_no_speech_on_speech_is_penalised() -> None:
    claim = RewardInput("language None<asr_text>", REF, "English")
    assert R.no_speech(claim) == -1.0 and R.language_id(claim) == 0.0 and R.accuracy(claim) == 0.0
    total, _ = CompositeReward()([claim, speech("")])
    assert total[0] < total[1]  # worse than an empty transcript with the right tag


# --------------------------------------------------------------------------------------------- ordering


def test_default_ordering_correct_partial_empty_hallucination() -> None:
    group = [
        speech(REF),
        speech("The quick brown fox jumped over a dog."),
        speech(""),
        speech(REF + " the" * 30, truncated=True),
    ]
    total, terms = CompositeReward()(group)
    assert total.dtype == torch.float64 and total.shape == (4,)
    assert total.tolist() == pytest.approx([1.25, 1 - 3 / 9 + 0.25, 0.25, -1.75])
    assert total[0] > total[1] > total[2] >= total[3]
    assert terms["repetition"].tolist() == [0, 0, 0, -1] and terms["truncation"].tolist() == [0, 0, 0, -1]
    assert set(terms) == set(DEFAULT_REWARD_WEIGHTS)
    # the cap alone would tie garbage with empty; the penalties break the tie
    assert terms["accuracy"][2] == terms["accuracy"][3] == 0.0


def test_repetition_flags_loops_and_overlong_but_not_repetitive_references() -> None:
    assert R.repetition(speech(REF + " the" * 30)) == -1.0
    assert R.repetition(speech(" ".join(f"w{i}" for i in range(40)), audio_seconds=2.0)) == -1.0  # 40 > 6*2+5 words
    chant = "no " * 12
    assert R.repetition(speech(chant, chant, audio_seconds=4.0)) == 0.0  # the reference loops too
    assert R.repetition(speech(REF, audio_seconds=None)) == 0.0


def test_each_distinct_string_is_normalised_once(monkeypatch) -> None:
    """The error units and the repetition check share one memoised normalisation per distinct string, and give what
    the unmemoised evaluation functions give."""
    from qwen3asr_train.eval import normalize as N

    calls: list[str] = []
    plain = N.normalize

    def counting(text, language, **kw):
        calls.append(text)
        return plain(text, language, **kw)

    for cached in (R._normalised, R._units, R._repetition):
        cached.cache_clear()
    monkeypatch.setattr(N, "normalize", counting)
    loop = REF + " the" * 30
    inputs = [speech(h) for h in ("the quick brown fox", loop, "the quick brown fox", REF)]
    total, _ = CompositeReward()(inputs)
    # distinct strings: 3 hypotheses (REF is also the reference) and the reference of the flagged loop row
    assert sorted(calls) == sorted(["the quick brown fox", loop, REF])
    options = N.NormalizerOptions()
    for x in inputs:
        expected = metrics.detect_repetition(x.parsed.text, "English", 3.0, unit="word", options=options)
        assert x.repetition == expected
        assert list(x.hypothesis_units) == metrics.tokenize(plain(x.parsed.text, "English"), "word")
    assert total[1] < total[3]  # the loop is penalised


def test_forced_language_rows() -> None:
    x = speech(REF, forced_language="English")
    assert x.completion == REF
    assert (R.accuracy(x), R.format_reward(x), R.language_id(x), R.no_speech(x)) == (1.0, 0.0, 0.0, 0.0)
    zh = speech("今天天气很好", "今天天气很好。", "Chinese", forced_language="Chinese")
    assert R.accuracy(zh) == 1.0 and R.format_reward(zh) == 0.0
    half = speech("the quick brown fox", forced_language="English")
    assert R.accuracy(half) == pytest.approx(4 / 9)


def test_keyword_recall() -> None:
    ref = "Please ask Nguyen about the Qwen3-ASR release."
    x = speech("please ask win about the qwen3-asr release", ref, hotwords=("Nguyen", "Qwen3-ASR"))
    assert R.keyword_recall(x) == 0.5
    assert R.keyword_recall(speech("a category", "a cat", hotwords=("cat",))) == 0.0  # whole units only
    assert R.keyword_recall(speech("the cat", "the cat", hotwords=["Cat", "cat"])) == 1.0  # normalised, deduplicated
    zh = speech("我们用通义千问", "我们用通义千问。", "Chinese", hotwords=("通义千问", "深度学习"))
    assert R.keyword_recall(zh) == 0.5
    assert R.keyword_recall(speech(REF)) == 0.0  # neutral without hotwords


# --------------------------------------------------------------------------------------------- registry


def test_registry_and_dotted_paths() -> None:
    assert set(DEFAULT_REWARD_WEIGHTS) <= set(REWARDS)
    for path in (f"{__name__}:length_bonus", f"{__name__}.length_bonus"):
        assert get_reward(path) is length_bonus
    total, terms = CompositeReward({"accuracy": 1.0, f"{__name__}:length_bonus": 0.5})([speech("hello world")])
    assert terms[f"{__name__}:length_bonus"].item() == 2.0 and total.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="registered: accuracy"):
        get_reward("acuracy")
    with pytest.raises(ValueError, match="unknown reward 'bogus'.*keyword_recall"):
        CompositeReward({"bogus": 1.0})
    with pytest.raises(ValueError, match="no module"):
        get_reward("no_such_package_xyz.rewards:fn")
    with pytest.raises(ValueError, match="no attribute"):
        get_reward(f"{__name__}:missing")
    with pytest.raises(TypeError, match="non-callable"):
        get_reward(f"{__name__}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(length_bonus)
    with pytest.raises(ValueError, match="finite"):
        CompositeReward({"accuracy": float("nan")})


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="canonical"):
        RewardInput("x", "x", "en")
    with pytest.raises(ValueError, match="empty reference"):
        RewardInput("x", "some words", None)
    with pytest.raises(ValueError, match="real language"):
        RewardInput("x", "", None, forced_language="None")


def test_parse_once_per_completion(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = metrics.parse_asr_output
    monkeypatch.setattr(metrics, "parse_asr_output", lambda *a: calls.append(a) or real(*a))
    CompositeReward()([speech(REF), silence("language None<asr_text>")])
    assert len(calls) == 2


def test_group_normalisation_invariant_to_affine_rescaling() -> None:
    """(r - mean) / std is unchanged by r -> a*r + b, a > 0: only within-group differences matter."""
    group = [speech(REF), speech("The quick brown fox"), speech(""), speech(REF + " the" * 30, truncated=True)]
    total, _ = CompositeReward()(group)
    scaled, _ = CompositeReward({k: 3.0 * w for k, w in DEFAULT_REWARD_WEIGHTS.items()})(group)
    a0, a1 = group_advantages(total, 4), group_advantages(scaled + 7.0, 4)
    torch.testing.assert_close(a0, a1, atol=1e-4, rtol=1e-4)  # equal up to the eps in std + eps
