"""Shared-prefix rollouts (one prefill per prompt) against the plain path (prompt repeated G times).

The plain path is transformers ``generate`` on G copies of each prompt plus full prompt+completion
teacher forcing; it is the independent construction here. With one seed both paths must draw the same
tokens (same sampling procedure, same RNG draws), and every log-prob pass must agree to float round-off,
gradients included.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import Utterance
from qwen3asr_train.rl.rollout import (
    HFGenerateEngine,
    SamplingOptions,
    build_prompts,
    completion_logprobs,
)


def _samples(n: int = 3) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        sec = 0.8 + 0.5 * i
        utt = Utterance(id=f"u{i}", audio="x.wav", duration=sec, text="alpha bravo", language="English")
        out.append(Sample(utt, (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), i))
    return out


@pytest.fixture(scope="module")
def ending_model(tiny_model_and_processor):
    """The tiny model with the end-token logit raised, so rows end at different lengths (a random model
    otherwise runs every row to the budget and the 'finished rows' branch is never exercised)."""
    model, processor = tiny_model_and_processor
    model = copy.deepcopy(model)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def boost(module, args, output):
        output = output.clone()
        output[..., end] += 4.0
        return output

    model.lm_head.register_forward_hook(boost)
    return model, processor


def _rollouts(model, processor, shared: bool, seed: int = 5, **kw):
    opts = SamplingOptions(group_size=4, shared_prefix=shared, **kw)
    prompts = build_prompts(processor, _samples(3), opts, step=0)
    torch.manual_seed(seed)
    return HFGenerateEngine(processor).generate(model, prompts, opts)


@pytest.mark.parametrize(
    "options", [{}, {"temperature": 0.7, "top_k": 5}, {"top_p": 0.9}, {"temperature": 1.3, "top_p": 0.8}]
)
def test_same_seed_same_tokens_as_generate(ending_model, options):
    model, processor = ending_model
    shared = _rollouts(model, processor, True, **options)
    plain = _rollouts(model, processor, False, **options)
    lengths = shared.completion_mask.sum(1)
    assert lengths.min() < lengths.max(), "the fixture must produce rows of different lengths"
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert torch.equal(shared.completion_mask, plain.completion_mask)
    assert shared.texts == plain.texts and shared.truncated == plain.truncated


def test_sampling_distribution_matches_the_model(ending_model):
    """Independent of generate: first tokens drawn from one prompt follow softmax(logits / T) of the model.

    Frequent tokens (p > 5 %, the boosted end token among them) must lie within 4 binomial standard deviations;
    over the whole vocabulary the total-variation distance must stay below 1.5 × its expectation under pure
    sampling noise, E[TV] ≈ ½ Σ sqrt(2 p (1 − p) / (π N)).
    """
    model, processor = ending_model
    n = 2000
    opts = SamplingOptions(group_size=n, shared_prefix=True, temperature=0.8)
    prompts = build_prompts(processor, _samples(1), opts, step=0)
    prompts.max_new_tokens = 1
    torch.manual_seed(0)
    rollouts = HFGenerateEngine(processor).generate(model, prompts, opts)
    with torch.no_grad():
        first = completion_logprobs(model, rollouts, 0.8, [0], shared_prefix=False)[0, 0].exp()  # p(drawn token)
    # the full distribution, from the prompt state (checked equal to the plain path's log-prob just below)
    with torch.no_grad():
        probs = torch.softmax(model.lm_head(rollouts.prompt_state.last_hidden[0]).float() / 0.8, -1)  # (V,)
    tokens = rollouts.completion_ids[:, 0]
    assert torch.allclose(probs[tokens[0]], first, atol=1e-6)
    observed = torch.bincount(tokens, minlength=probs.numel()).double() / n
    p = probs.double()
    frequent = p > 0.05
    assert frequent.any()
    sd = (p * (1 - p) / n).sqrt()
    assert torch.all((observed - p).abs()[frequent] < 4 * sd[frequent])
    tv = 0.5 * (observed - p).abs().sum()
    expected_tv = 0.5 * (2 * p * (1 - p) / (torch.pi * n)).sqrt().sum()
    assert tv < 1.5 * expected_tv, (float(tv), float(expected_tv))


@pytest.mark.parametrize("rows", [None, [2, 0], [1]])
def test_logprobs_shared_prefix_equal_plain(ending_model, rows):
    model, processor = ending_model
    rollouts = _rollouts(model, processor, True, temperature=0.7)
    with torch.no_grad():
        plain = completion_logprobs(model, rollouts, 0.7, rows, shared_prefix=False)
        shared = completion_logprobs(model, rollouts, 0.7, rows, shared_prefix=True)
        reused = completion_logprobs(model, rollouts, 0.7, rows, prompt_state=rollouts.prompt_state)
    mask = rollouts.completion_mask if rows is None else rollouts.completion_mask.view(3, 4, -1)[rows].flatten(0, 1)
    assert torch.allclose(shared, plain, atol=2e-5, rtol=0)
    assert torch.allclose(reused, plain, atol=2e-5, rtol=0)
    assert torch.all(shared[mask == 0] == 0) and torch.all(reused[mask == 0] == 0)
    # the sampler's own log-probs (temperature only) are the same numbers
    sampled = (
        rollouts.sampled_logprobs if rows is None else rollouts.sampled_logprobs.view(3, 4, -1)[rows].flatten(0, 1)
    )
    assert torch.allclose(sampled, plain, atol=2e-5, rtol=0)


def test_gradients_shared_prefix_equal_plain(ending_model):
    """The update pass: one prefill whose cache is repeated G times gives the gradient of G full passes."""
    model, processor = ending_model
    model = copy.deepcopy(model).train()
    rollouts = _rollouts(model.eval(), processor, True)
    model.train()
    weights = torch.randn(rollouts.completion_ids.shape, generator=torch.Generator().manual_seed(1))
    grads = {}
    for shared in (False, True):
        model.zero_grad()
        logp = completion_logprobs(model, rollouts, 1.0, shared_prefix=shared)
        (logp * weights).sum().backward()
        grads[shared] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert any(n.startswith("model.audio_tower.") for n in grads[True]), "the encoder must receive gradient"
    for name, g in grads[False].items():
        assert torch.allclose(grads[True][name], g, atol=1e-5, rtol=1e-4), name


def test_prefill_once_per_prompt_and_no_encoder_in_reused_pass(ending_model):
    model, processor = ending_model
    encoder_rows: list[int] = []
    decoder_calls: list[tuple[int, int]] = []
    hooks = [
        model.model.audio_tower.register_forward_hook(
            lambda m, a, kw, out: encoder_rows.append(kw["input_features"].shape[0]), with_kwargs=True
        ),
        model.model.language_model.register_forward_hook(
            lambda m, a, kw, out: decoder_calls.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True
        ),
    ]
    try:
        rollouts = _rollouts(model, processor, True)
        p = rollouts.prompts.input_ids.shape[1]
        assert sum(encoder_rows) == 3, "each utterance encoded once (in groups of equal chunk counts)"
        assert decoder_calls[0] == (3, p), "prefill: 3 prompts once, not 12 copies"
        assert all(rows <= 12 and length == 1 for rows, length in decoder_calls[1:]), "then one token per prefix"
        encoder_rows.clear()
        decoder_calls.clear()
        with torch.no_grad():
            completion_logprobs(model, rollouts, 1.0, [0, 2], prompt_state=rollouts.prompt_state)
        assert encoder_rows == [] and decoder_calls == [(8, rollouts.completion_ids.shape[1])]
        decoder_calls.clear()
        with torch.no_grad():
            completion_logprobs(model, rollouts, 1.0, [0, 2], shared_prefix=True)
        assert sum(encoder_rows) == 2 and decoder_calls[0][0] == 2 and decoder_calls[1][0] == 8
    finally:
        for h in hooks:
            h.remove()


def test_prompt_state_is_not_modified_by_use(ending_model):
    """Decoding appends to a cache; the state must hand out fresh caches so it can serve several passes."""
    model, processor = ending_model
    rollouts = _rollouts(model, processor, True)
    state = rollouts.prompt_state
    before = [k.clone() for k in state.keys]
    with torch.no_grad():
        a = completion_logprobs(model, rollouts, 1.0, prompt_state=state)
        b = completion_logprobs(model, rollouts, 1.0, prompt_state=state)
    assert torch.equal(a, b)
    assert all(torch.equal(k, k0) for k, k0 in zip(state.keys, before, strict=True))


@pytest.mark.parametrize("fast_decode", [True, False])
def test_samples_share_decoder_rows_until_they_differ(tiny_model_and_processor, fast_decode):
    """A peaked model: all G samples of a prompt draw the same tokens, so the decoder runs on B rows, not B*G, and
    the draws still equal generate's; a flat model splits at once into B*G rows. Rows are counted at the first
    layer's input norm, which both the lean step and the transformers forward call."""
    model, processor = tiny_model_and_processor
    model = copy.deepcopy(model)
    favourite = processor.tokenizer.convert_tokens_to_ids("<asr_text>")

    def peak(module, args, output):
        output = output.clone()
        output[..., favourite] += 40.0
        return output

    handle = model.lm_head.register_forward_hook(peak)
    ends = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    calls: list[int] = []
    counter = model.model.language_model.layers[0].input_layernorm.register_forward_hook(
        lambda m, args, out: calls.append(args[0].shape[0])
    )
    try:
        shared = _rollouts(model, processor, True, fast_decode=fast_decode)
        assert calls[0] == 3 and set(calls[1:]) == {3}, calls
        assert torch.all(shared.completion_ids == favourite)
        assert torch.equal(shared.completion_ids, _rollouts(model, processor, False).completion_ids)
    finally:
        handle.remove()
    calls.clear()
    try:
        flat = _rollouts(model, processor, True, fast_decode=fast_decode)
        # decoder rows at step t = distinct (prompt, first t tokens) among the rows still live after t tokens
        ids, mask, g = flat.completion_ids.tolist(), flat.completion_mask.tolist(), flat.group_size
        expected = [
            len({(r // g, tuple(ids[r][:t])) for r in range(len(ids)) if mask[r][t - 1] and ids[r][t - 1] not in ends})
            for t in range(1, len(calls))
        ]
        assert calls[0] == 3 and calls[1:] == expected, (calls, expected)
        assert expected[0] == 12  # a flat model: the 4 samples of each prompt differ after one token
        assert min(expected) < 12, "a row must end early, so that dropping ended prefixes is exercised"
    finally:
        counter.remove()


def test_gradient_checkpointing_falls_back_to_the_plain_path(ending_model):
    """Checkpointed layers in training mode keep no cache (the backward replay would append twice): sampling and
    log-probs then take the plain path and give its results."""
    model, processor = ending_model
    model = copy.deepcopy(model)
    reference = _rollouts(model, processor, False)
    with torch.no_grad():
        expected = completion_logprobs(model, reference, 1.0, [1], shared_prefix=False)
    model.gradient_checkpointing_enable()
    model.train()
    shared = _rollouts(model, processor, True)
    assert shared.prompt_state is None and shared.sampled_logprobs is None
    assert shared.completion_ids.shape[0] == 12  # sampled (by generate, recomputing without a cache)
    logp = completion_logprobs(model, reference, 1.0, [1], shared_prefix=True)
    assert torch.allclose(logp, expected, atol=1e-5)
    logp.sum().backward()
    assert any(p.grad is not None for p in model.parameters())
