"""SFT label masks against independent constructions, for left and right padding.

Independent references:
* the transformers processor itself, called on the full prompt+target string (it tokenises jointly,
  expands the audio placeholder and pads on the requested side);
* hand-written prompt strings (not :func:`asr_prompt`) tokenised separately from the target.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen3asr_train.data.collate import IGNORE_INDEX, SFTCollator, SFTOptions, row_rng
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import Utterance

TEXTS = ["alpha bravo charlie", "one two", "delta echo foxtrot golf hotel india", "kilo"]
CONTEXTS = ["", "bravo, tango", "", "lima mike"]
SECONDS = [1.3, 0.7, 2.9, 0.4]  # includes a clip under 0.5 s (zero-padded by the feature extractor)


def samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i, (text, ctx, sec) in enumerate(zip(TEXTS, CONTEXTS, SECONDS, strict=True)):
        utt = Utterance(id=f"u{i}", audio="x.wav", duration=sec, text=text, language="English", context=ctx)
        out.append(Sample(utt, (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), i))
    return out


def hand_prompt(context: str, forced: str | None) -> str:
    """The upstream chat format, written out by hand."""
    s = "<|im_start|>system\n" + context + "<|im_end|>\n<|im_start|>user\n"
    s += "<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n<|im_start|>assistant\n"
    return s + (f"language {forced}<asr_text>" if forced else "")


def hand_target(text: str, forced: bool) -> str:
    return (text if forced else "language English<asr_text>" + text) + "<|im_end|>"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("forced_prob", [0.0, 1.0])
@pytest.mark.parametrize("use_context", [False, True])
def test_label_mask_matches_processor_and_hand_construction(tiny_model_and_processor, side, forced_prob, use_context):
    _, processor = tiny_model_and_processor
    opts = SFTOptions(
        forced_language_prob=forced_prob, manifest_context_prob=1.0 if use_context else 0.0, padding_side=side
    )
    collator = SFTCollator(processor, opts)
    batch = collator(samples())
    tok = processor.tokenizer
    ctxs = CONTEXTS if use_context else [""] * 4
    forced = forced_prob == 1.0
    full = [
        hand_prompt(c, "English" if forced else None) + hand_target(t, forced) for c, t in zip(ctxs, TEXTS, strict=True)
    ]
    audios = [s.audio for s in samples()]

    # 1) the processor's own tokenisation, audio expansion and padding give the same input ids and mask
    ref = processor(text=full, audio=audios, padding_side=side)
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert torch.equal(batch["input_features"], ref["input_features"])
    assert torch.equal(batch["input_features_mask"], ref["input_features_mask"].long())

    # 2) labels sit exactly on the separately tokenised target, nowhere else
    for i, (ctx, text) in enumerate(zip(ctxs, TEXTS, strict=True)):
        target_ids = tok.encode(hand_target(text, forced), add_special_tokens=False)
        prompt_ids = tok.encode(hand_prompt(ctx, "English" if forced else None), add_special_tokens=False)
        n_audio = int((ref["input_ids"][i] == tok.convert_tokens_to_ids("<|audio_pad|>")).sum())
        n_real = len(prompt_ids) - 1 + n_audio + len(target_ids)
        assert int(ref["attention_mask"][i].sum()) == n_real
        labels = batch["labels"][i]
        valid = (labels != IGNORE_INDEX).nonzero().flatten()
        if side == "right":
            expected_positions = torch.arange(n_real - len(target_ids), n_real)
        else:
            length = labels.numel()
            expected_positions = torch.arange(length - len(target_ids), length)
        assert torch.equal(valid, expected_positions), f"row {i}: labels on the wrong positions"
        assert labels[valid].tolist() == target_ids
        assert tok.decode(labels[valid]) == hand_target(text, forced)
    assert batch["num_target_tokens"] == int((batch["labels"] != IGNORE_INDEX).sum())


def test_no_speech_rows_target_none(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    collator = SFTCollator(processor, SFTOptions(no_speech_prob=1.0))
    batch = collator(samples())
    tok = processor.tokenizer
    for i in range(4):
        labels = batch["labels"][i]
        assert tok.decode(labels[labels != IGNORE_INDEX]) == "language None<asr_text><|im_end|>"
    assert batch["num_no_speech"] == 4


def test_hotword_context_uses_transcript_words(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    collator = SFTCollator(
        processor,
        SFTOptions(context_prob=1.0, manifest_context_prob=0.0, distractors_max=3),
        distractor_pool=["zulu", "yankee", "xray"],
    )
    for s in samples():
        plan = collator.plan(s, epoch=0)
        words = plan.context.split(", ") if plan.context else []
        own = [w for w in words if w in s.utt.text.split()]
        assert own, plan  # at least one hot word comes from the transcript
        assert all(w in s.utt.text.split() or w in {"zulu", "yankee", "xray"} for w in words)


def test_row_choices_are_deterministic_per_epoch():
    a = [row_rng(7, 0, i).random() for i in range(5)]
    assert a == [row_rng(7, 0, i).random() for i in range(5)]
    assert a != [row_rng(7, 1, i).random() for i in range(5)]


def test_forced_language_prob_statistics(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    collator = SFTCollator(processor, SFTOptions(forced_language_prob=0.3))
    base = samples()[0]
    forced = [collator.plan(Sample(base.utt, base.audio, i), 0).forced_language for i in range(2000)]
    assert abs(np.mean(forced) - 0.3) < 0.04
