"""``recipe.ctc_fold_case``: CTC targets from the lower-cased, space-prefixed transcript."""

from __future__ import annotations

import torch

from qwen3asr_train.config.schema import SFTConfig
from qwen3asr_train.data.prompts import ASR_TEXT, IM_END
from qwen3asr_train.stages.sft import SFTModule, fold_case_ids


def _module(model, tok, **recipe):
    asr_text, im_end = tok.convert_tokens_to_ids(ASR_TEXT), tok.convert_tokens_to_ids(IM_END)
    fold = tok if recipe.get("ctc_fold_case") else None
    module = SFTModule(
        model, SFTConfig(ctc_weight=1.0, **recipe), 10, tok.pad_token_id, asr_text, im_end, ctc_fold_tokenizer=fold
    )
    return module, asr_text, im_end


def test_cased_and_lower_case_transcripts_give_one_ctc_target(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    tok = processor.tokenizer
    # the premise: the tokenizer spells a cased word with other pieces than the lower-case one
    assert tok.encode("Dog", add_special_tokens=False) != tok.encode(" dog", add_special_tokens=False)
    fold, asr_text, im_end = _module(model, tok, ctc_fold_case=True)
    plain, _, _ = _module(model, tok)
    targets = []
    for text in ("Dog door, Day?", "dog door, day?", " DOG DOOR, DAY?"):
        row = torch.tensor([-100, -100, asr_text, *tok.encode(text, add_special_tokens=False), im_end])
        targets.append(fold._ctc_targets([row])[0].tolist())
        # off: the labels themselves, unchanged
        assert plain._ctc_targets([row])[0].tolist() == tok.encode(text, add_special_tokens=False)
    # independent construction: the folded text typed by hand, encoded directly
    expected = tok.encode(" dog door, day?", add_special_tokens=False)
    assert targets == [expected] * 3


def test_fold_keeps_non_ascii_and_empty(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    tok = processor.tokenizer
    ids = torch.tensor(tok.encode("Élan Café", add_special_tokens=False))
    assert tok.decode(fold_case_ids(tok, ids).tolist()) == " élan café"
    assert fold_case_ids(tok, torch.tensor([], dtype=torch.long)).tolist() == []
