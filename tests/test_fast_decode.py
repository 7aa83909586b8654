"""The lean decode step (``rl/fast_decode.py``) against the transformers forward and a full teacher-forced pass.

The independent construction is the text decoder run from scratch (no cache) over prompt + every token so far:
the lean step's and the transformers step's hidden states must both equal it to float round-off, through row
copies (prefix splits) and dropped rows (ended prefixes). Sampling with either step must draw the same tokens
with one seed and report the same log-probs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qwen3asr_train.rl.fast_decode import LeanDecoder, lean_decode_unsupported
from qwen3asr_train.rl.rollout import (
    HFStepDecoder,
    SamplingOptions,
    build_prompts,
    full_precision,
    position_ids,
    prefill,
    prompt_embeddings,
)
from tests.test_rollout_shared_prefix import _rollouts, _samples, ending_model  # noqa: F401  (fixture)


def _prompt_state(model, processor):
    prompts = build_prompts(processor, _samples(3), SamplingOptions(group_size=2), step=0)
    assert prompts.attention_mask.min() == 0, "prompts of different lengths: left padding must be exercised"
    embeds = prompt_embeddings(model, prompts)
    return prompts, embeds, prefill(model, embeds, prompts.attention_mask)


@pytest.mark.parametrize("adapter", [False, True])
@torch.no_grad()
def test_lean_step_equals_transformers_step_and_full_forward(tiny_model_and_processor, adapter):
    """``adapter``: a hook on layer 0's query projection stands for an adapter, so layer 0 takes the module path
    and layer 1 the fused one; the hook adds 0.1, so the reference must see it too."""
    model, processor = tiny_model_and_processor
    if adapter:
        model = copy.deepcopy(model)
        model.model.language_model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: out + 0.1)
    lm = model.model.language_model
    embed = model.get_input_embeddings()
    prompts, prompt_embeds, state = _prompt_state(model, processor)
    steps = 7
    lean = LeanDecoder(lm, state, steps)
    hf = HFStepDecoder(model, state)
    assert [f is None for f in lean.fused] == [adapter] + [False] * (len(lm.layers) - 1)
    origin = [0, 1, 2]  # prompt of each decoder row
    history: list[list[int]] = [[], [], []]  # tokens appended to each row
    # row copies (a prefix splits: repeated parents) and drops (a prefix ended: parents left out)
    selects = {1: [0, 0, 1, 2, 2], 3: [4, 1, 0], 4: [1, 1, 2, 0, 2], 6: [3]}
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for t in range(steps):
        if t in selects:
            parent = torch.tensor(selects[t])
            lean.select(parent)
            hf.select(parent)
            origin = [origin[p] for p in selects[t]]
            history = [list(history[p]) for p in selects[t]]
        tokens = torch.randint(model.config.text_config.vocab_size, (len(origin),), generator=generator)
        fast, slow = lean.step(embed(tokens)), hf.step(embed(tokens))  # (U, H)
        for row, token in zip(history, tokens.tolist(), strict=True):
            row.append(token)
        # from scratch: prompt + all tokens of each row, no cache
        rows = torch.tensor(origin)
        full = torch.cat([prompt_embeds[rows], embed(torch.tensor(history))], dim=1)  # (U, P+t+1, H)
        mask = torch.cat([prompts.attention_mask[rows], torch.ones(len(origin), t + 1, dtype=torch.long)], dim=1)
        reference = lm(
            inputs_embeds=full, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
        ).last_hidden_state[:, -1]  # (U, H)
        assert fast.shape == reference.shape
        assert torch.allclose(fast, reference, atol=2e-5, rtol=0), (t, float((fast - reference).abs().max()))
        assert torch.allclose(slow, reference, atol=2e-5, rtol=0), (t, float((slow - reference).abs().max()))
        worst = max(worst, float((fast - slow).abs().max()))
    assert worst < 2e-5
    with pytest.raises(RuntimeError, match="buffers are full"):
        lean.step(embed(tokens))


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 5}, {"temperature": 1.3, "top_p": 0.8}])
def test_same_tokens_and_logprobs_with_either_step(ending_model, options):  # noqa: F811
    model, processor = ending_model
    fast = _rollouts(model, processor, True, fast_decode=True, **options)
    slow = _rollouts(model, processor, True, fast_decode=False, **options)
    plain = _rollouts(model, processor, False, **options)  # transformers generate on repeated prompts
    lengths = fast.completion_mask.sum(1)
    assert lengths.min() < lengths.max(), "rows must end at different lengths (dropped prefixes exercised)"
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    assert fast.texts == plain.texts
    assert torch.allclose(fast.sampled_logprobs, slow.sampled_logprobs, atol=2e-6, rtol=0)
    assert torch.all(fast.sampled_logprobs[fast.completion_mask == 0] == 0)


def test_unsupported_decoders_and_grad_mode_raise(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    with torch.no_grad():
        _, _, state = _prompt_state(model, processor)
    lm = copy.deepcopy(model.model.language_model)
    assert lean_decode_unsupported(lm) is None
    with pytest.raises(RuntimeError, match="no_grad"):
        LeanDecoder(lm, state, 4)
    lm.train()
    for layer in lm.layers:
        layer.self_attn.attention_dropout = 0.1
    with torch.no_grad(), pytest.raises(RuntimeError, match="attention dropout"):
        LeanDecoder(lm, state, 4)
    lm.eval()
    lm.config.layer_types = ["sliding_attention"] * len(lm.layers)
    with torch.no_grad(), pytest.raises(ValueError, match=r"sliding_attention.*recipe.fast_decode=false"):
        LeanDecoder(lm, state, 4)


def test_engine_flags_its_logprobs_as_the_training_models(ending_model):  # noqa: F811
    """The HF engine vouches for its sampled log-probs (same model, same process, float32), not under autocast
    (bfloat16 decode steps and a teacher-forced pass differ by far more than round-off); the plain path reports none.
    """
    model, processor = ending_model
    assert _rollouts(model, processor, True).sampled_logprobs_in_process
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not full_precision(model)
    assert full_precision(model)
    plain = _rollouts(model, processor, False)
    assert plain.sampled_logprobs is None and not plain.sampled_logprobs_in_process


@torch.no_grad()
def test_audio_embeddings_grouped_by_length_equal_one_batch(tiny_model_and_processor):
    """Utterances of 1, 2 and 3 encoder chunks: the grouped encoder calls (padding chunks dropped) give each
    utterance what the one padded batch gives, in row order."""
    import numpy as np

    from qwen3asr_train.data.dataset import Sample
    from qwen3asr_train.data.manifest import Utterance
    from qwen3asr_train.rl.rollout import audio_embeddings

    model, processor = tiny_model_and_processor
    rng = np.random.default_rng(1)
    samples = []
    for i, sec in enumerate((2.6, 0.7, 1.4, 0.6)):
        utt = Utterance(id=f"u{i}", audio="x.wav", duration=sec, text="alpha", language="English")
        samples.append(Sample(utt, (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), i))
    prompts = build_prompts(processor, samples, SamplingOptions(group_size=2), step=0)
    chunk = 2 * model.model.audio_tower.n_window
    chunks = ((prompts.input_features_mask.sum(-1) + chunk - 1) // chunk).tolist()
    assert len(set(chunks)) == 3, chunks
    tokens = (prompts.input_ids == model.config.audio_token_id).sum(-1)
    one_batch = model.model.get_audio_features(prompts.input_features, prompts.input_features_mask).pooler_output
    grouped = audio_embeddings(model, prompts.input_features, prompts.input_features_mask, tokens)
    assert grouped.shape == one_batch.shape == (int(tokens.sum()), model.config.text_config.hidden_size)
    assert torch.allclose(grouped, one_batch, atol=1e-5, rtol=0), float((grouped - one_batch).abs().max())
