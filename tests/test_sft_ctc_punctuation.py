"""``recipe.ctc_skip_punctuation``: which tokens count as punctuation, and CTC targets without them."""

from __future__ import annotations

import unicodedata

import torch

from qwen3asr_train.config.schema import SFTConfig
from qwen3asr_train.data.prompts import ASR_TEXT, IM_END
from qwen3asr_train.stages.sft import SFTModule, punctuation_token_ids


def test_punctuation_tokens_are_exactly_the_punctuation_only_ones(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    tok = processor.tokenizer
    found = set(punctuation_token_ids(tok))
    # hand-picked: the marks a cased, punctuated transcript uses are single byte-level tokens
    for mark in ("?", ",", ".", "!"):
        (mark_id,) = tok.encode(mark, add_special_tokens=False)
        assert mark_id in found
    for word in ("Dog", " door", " day"):
        assert not set(tok.encode(word, add_special_tokens=False)) & found
    # second construction: every token whose decoded text is one ASCII punctuation character is found
    ascii_marks = {i for i in range(len(tok)) if len(t := tok.decode([i]).strip()) == 1 and t in "!?,.;:'\"-()"}
    assert ascii_marks - set(tok.all_special_ids) <= found
    assert all(unicodedata.category(c).startswith("P") for i in found for c in tok.decode([i]).strip())


def test_ctc_targets_drop_punctuation_only_when_asked(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    tok = processor.tokenizer
    asr_text, im_end = tok.convert_tokens_to_ids(ASR_TEXT), tok.convert_tokens_to_ids(IM_END)
    words = tok.encode("Dog door, day?", add_special_tokens=False)
    row = torch.tensor([-100, -100, asr_text, *words, im_end])  # labels of one clip
    plain = SFTModule(model, SFTConfig(ctc_weight=1.0), 10, tok.pad_token_id, asr_text, im_end)
    assert plain._ctc_targets([row])[0].tolist() == words
    skip = SFTModule(
        model,
        SFTConfig(ctc_weight=1.0, ctc_skip_punctuation=True),
        10,
        tok.pad_token_id,
        asr_text,
        im_end,
        punctuation_token_ids(tok),
    )
    expected = tok.encode("Dog door day", add_special_tokens=False)  # the same words, no marks
    assert skip._ctc_targets([row])[0].tolist() == expected
