"""The ``char_accuracy`` reward: 1 - min(CER, 1) on the evaluation's normalised text, whatever the language.

Checked against an independent character edit distance written here (plain Levenshtein over the normalised
strings with spaces removed), and for the property that motivated it: on short clips it separates
hypotheses that the word-level ``accuracy`` term ties.
"""

from __future__ import annotations

import pytest

from qwen3asr_train.eval.normalize import NormalizerOptions
from qwen3asr_train.rl.rewards import REWARDS, CompositeReward, RewardInput, accuracy, get_reward

EN = "language English<asr_text>"


def levenshtein(a: str, b: str) -> int:
    """Edit distance by the textbook dynamic programme (independent of eval.metrics.align)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def expected(hyp: str, ref: str) -> float:
    norm = NormalizerOptions()
    r = "".join(norm.apply(ref, "English").split())
    h = "".join(norm.apply(hyp, "English").split())
    if not r:
        return 1.0 if not h else 0.0
    return 1.0 - min(levenshtein(r, h) / len(r), 1.0)


CASES = [
    ("Dog door day?", "Dog door day?"),
    ("Dog door day?", "dog, door, day"),
    ("Dog door day?", "Door day."),
    ("Dog door day?", "Dig dear dye"),
    ("Apple cat, dark cat.", "Apple cold, apple cold."),
    ("Ball.", "Ball ball ball ball ball ball ball ball"),
    ("Ball.", ""),
    ("Bread boat.", "Bred bot."),
]


@pytest.mark.parametrize(("ref", "hyp"), CASES)
def test_char_accuracy_equals_one_minus_capped_cer(ref: str, hyp: str) -> None:
    x = RewardInput(EN + hyp, ref, "English", audio_seconds=2.0)
    assert REWARDS["char_accuracy"](x) == pytest.approx(expected(hyp, ref), abs=1e-12)
    assert get_reward("char_accuracy") is REWARDS["char_accuracy"]


def test_char_accuracy_separates_what_word_accuracy_ties() -> None:
    """Two one-word misses score the same word accuracy (0) but not the same character accuracy."""
    near = RewardInput(EN + "Bred.", "Bread.", "English", audio_seconds=1.0)
    far = RewardInput(EN + "Cat.", "Bread.", "English", audio_seconds=1.0)
    assert accuracy(near) == accuracy(far) == 0.0
    assert REWARDS["char_accuracy"](near) > REWARDS["char_accuracy"](far)


def test_char_accuracy_on_no_speech_items_is_the_clean_answer() -> None:
    """No edit distance on no-speech items (same rule as ``accuracy``)."""
    assert REWARDS["char_accuracy"](RewardInput("language None<asr_text>", "", None, audio_seconds=1.0)) == 1.0
    assert REWARDS["char_accuracy"](RewardInput(EN + "Dog.", "", None, audio_seconds=1.0)) == 0.0


def test_char_accuracy_in_a_composite_with_word_accuracy() -> None:
    composite = CompositeReward({"accuracy": 0.5, "char_accuracy": 0.5})
    inputs = [RewardInput(EN + hyp, ref, "English", audio_seconds=2.0) for ref, hyp in CASES]
    total, terms = composite(inputs)
    for k, x in enumerate(inputs):
        assert float(terms["char_accuracy"][k]) == pytest.approx(expected(x.completion[len(EN) :], x.reference))
        assert float(total[k]) == pytest.approx(0.5 * accuracy(x) + 0.5 * float(terms["char_accuracy"][k]))
