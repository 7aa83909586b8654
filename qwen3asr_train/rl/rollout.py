"""GSPO rollouts: prompts, G sampled transcripts per utterance, and sequence log-probabilities.

Cost model (why this module looks the way it does). A rollout batch of B utterances costs one audio
encoder pass, one *prefill* of the B prompts (~170 tokens each with the audio placeholders), C sampling
steps over B·G rows, and the log-probability passes. Two paths exist, chosen by ``recipe.shared_prefix``:

* **shared prefix** (default): each prompt is prefilled **once**; its key/value cache (``PromptState``)
  is repeated G times along the batch dimension and the G continuations are sampled from it with our
  own loop (:func:`sample_from_prompts`: the same logits processors, ``softmax`` and
  ``torch.multinomial`` per step as transformers' ``generate``, so with one seed both paths draw the
  same tokens). The sampling steps use the lean decode step of :mod:`qwen3asr_train.rl.fast_decode`
  (``recipe.fast_decode``) and run once per distinct live prefix. Log-probabilities are computed the same
  way: one prompt prefill per group, then one forward of the B·G completions over the repeated cache
  (:func:`completion_logprobs`). The behaviour (old) log-probs are the sampler's own when the engine computed
  them in this process in float32 (``Rollouts.sampled_logprobs_in_process``: the same numbers up to float
  round-off); otherwise the old log-prob pass, which runs right after sampling with the same weights and
  dropout off, reuses the rollout's prompt state outright (no encoder, no prefill): ``Rollouts.prompt_state``.
  The update pass recomputes everything, since it needs gradients and the weights change between minibatches.
* **plain** (``recipe.shared_prefix=false``, the earlier path, kept for comparison and as a fallback):
  the prompt embeddings are repeated G times and passed to ``generate``, and every log-prob pass
  re-encodes the audio and re-runs the B·G full prompt+completion sequences.

Both paths run the audio encoder once per utterance in generation (``generate(num_return_sequences=G)``
would repeat ``input_features`` G times), on its own chunks only (:func:`audio_embeddings`). Positions are ``cumsum(attention_mask) − 1`` (what generation
uses for left-padded prompts); logits are divided by the sampling temperature; the LM head is evaluated
only where a completion token is predicted. ``benchmarks/gspo_step_cost.py`` measures both paths.

Engines: :class:`HFGenerateEngine` (transformers model in the training process; CPU-testable)
implements :class:`RolloutEngine`. A vLLM engine would implement the same two methods (``generate``
with ``SamplingParams(n=G)``, whose prefix cache shares the prompt; ``sync_weights``: load the updated
weights, reset the prefix cache, and reset the encoder cache when the encoder trains). It returns
``prompt_state=None`` (its cache lives in another engine), so the trainer recomputes the old log-probs
with one prefill per group. vLLM is not shipped because it cannot be tested without a GPU here.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch
from transformers import DynamicCache, LogitsProcessorList, Qwen3ASRProcessor
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from qwen3asr_train.config.schema import GSPOSampling
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.collate import candidate_words
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.prompts import ENDOFTEXT, IM_END, asr_prompt
from qwen3asr_train.rl.fast_decode import LeanDecoder, StepDecoder


@dataclass
class SamplingOptions(GSPOSampling):
    """How completions are sampled: the recipe's sampling fields (declared once, in ``GSPOSampling``) + the seed."""

    seed: int = 0

    @classmethod
    def from_recipe(cls, recipe: GSPOSampling, seed: int) -> SamplingOptions:
        """The options of a recipe config (every ``GSPOSampling`` field copied)."""
        return cls(**{f.name: getattr(recipe, f.name) for f in fields(GSPOSampling)}, seed=seed)


@dataclass
class PromptBatch:
    """B prompts (left-padded) with their audio, and what the rewards need to know about each row."""

    samples: list[Sample]
    input_ids: torch.Tensor  # (B, P)
    attention_mask: torch.Tensor  # (B, P)
    input_features: torch.Tensor  # (B, 128, T)
    input_features_mask: torch.Tensor  # (B, T)
    forced_language: list[str | None]
    hotwords: list[tuple[str, ...]]
    max_new_tokens: int

    def to(self, device: torch.device | str) -> PromptBatch:
        for name in ("input_ids", "attention_mask", "input_features", "input_features_mask"):
            setattr(self, name, getattr(self, name).to(device))
        return self


@dataclass
class Rollouts:
    """G completions per prompt; row ``b*G + g`` is completion g of prompt b (groups are contiguous)."""

    prompts: PromptBatch
    group_size: int
    completion_ids: torch.Tensor  # (B*G, C) padded with the pad id after the end token
    completion_mask: torch.Tensor  # (B*G, C) 1 on generated tokens up to and including the end token
    texts: list[str]
    truncated: list[bool]
    extra: dict[str, float] = field(default_factory=dict)
    prompt_state: PromptState | None = None
    """The B prompts as prefilled by the weights that sampled them (HF engine, shared prefix); None otherwise."""
    sampled_logprobs: torch.Tensor | None = None
    """``(B*G, C)`` log-probs of the sampled tokens under the sampler's ``logits / temperature`` (0 at padding), when
    the engine reports them (a vLLM engine: ``logprobs=0`` with ``logprobs_mode="processed_logprobs"``)."""
    sampled_logprobs_in_process: bool = False
    """True when ``sampled_logprobs`` were computed by the training model itself, in this process, with its current
    weights, precision and eval mode (the HF engine): then they are the behaviour log-probs a recomputing pass would
    give, up to float round-off, and the trainer uses them by default (``recipe.sampler_logprobs_in_process``)."""


@contextmanager
def sampling_rng(seed: int, rank: int, rollout: int, device: torch.device | str) -> Iterator[None]:
    """Seed torch's RNG from (seed, rank, rollout) for one generation, and restore it afterwards.

    Why: sampling from the global stream makes a rollout depend on every draw before it (dropout, data
    loader seeds), so a resumed run sampled other completions than the uninterrupted one. Seeded per
    rollout, the completions depend only on the weights and the rollout index, and the global stream
    (dropout in the updates) is left exactly as it was.
    """
    device = torch.device(device)
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        s = zlib.crc32(f"sampling/{seed}/{rank}/{rollout}".encode())
        torch.random.default_generator.manual_seed(s)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(s)
        yield


def build_prompts(
    processor: Qwen3ASRProcessor, samples: Sequence[Sample], opts: SamplingOptions, step: int
) -> PromptBatch:
    """Prompts for a rollout batch; forced language and hot-word context drawn per (seed, step, index)."""
    forced: list[str | None] = []
    contexts: list[str] = []
    hotwords: list[tuple[str, ...]] = []
    for s in samples:
        rng = random.Random(zlib.crc32(f"rollout/{opts.seed}/{step}/{s.index}".encode()))
        lang = s.utt.language
        forced.append(lang if lang is not None and rng.random() < opts.forced_language_prob else None)
        words: tuple[str, ...] = ()
        if s.utt.context:
            context = s.utt.context
        elif lang is not None and rng.random() < opts.context_prob:
            own = candidate_words(s.utt.text, lang)
            words = tuple(rng.sample(own, min(len(own), rng.randint(1, 3)))) if own else ()
            context = ", ".join(words)
        else:
            context = ""
        contexts.append(context)
        hotwords.append(words)
    inputs = processor(
        text=[asr_prompt(c, f) for c, f in zip(contexts, forced, strict=True)],
        audio=[s.audio for s in samples],
        padding_side="left",
        sampling_rate=SAMPLE_RATE,
    )
    longest = max(len(s.audio) for s in samples) / SAMPLE_RATE
    budget = int(opts.tokens_per_second * longest) + opts.min_new_tokens
    return PromptBatch(
        list(samples),
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["input_features"],
        inputs["input_features_mask"].long(),
        forced,
        hotwords,
        budget,
    )


def prompt_embeddings(model: torch.nn.Module, prompts: PromptBatch) -> torch.Tensor:
    """``(B, P, H)`` prompt embeddings; the audio encoder runs once over each utterance (:func:`audio_embeddings`)."""
    inner = model.model
    embeds = inner.get_input_embeddings()(prompts.input_ids)  # (B, P, H)
    slots = prompts.input_ids == model.config.audio_token_id  # (B, P)
    audio = audio_embeddings(model, prompts.input_features.to(embeds.dtype), prompts.input_features_mask, slots.sum(-1))
    return embeds.masked_scatter(slots.unsqueeze(-1), audio.to(embeds.dtype))


def audio_embeddings(
    model: torch.nn.Module, features: torch.Tensor, features_mask: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """``(N_audio, H)`` projected audio of B utterances in row order, the encoder run once per group of utterances
    with the same number of encoder chunks, on those chunks only.

    Why: the encoder convolves every ``2 * n_window``-frame chunk of its ``(B, mels, T)`` input, padding included,
    and a batch is padded to its longest clip; with the demo's 0.5-3.4 s clips, ~40 % of a rollout batch's chunks
    were padding. An utterance's output depends on its own frames only (chunks are convolved independently,
    attention is windowed within the utterance), so grouping changes no result beyond float round-off.
    ``tokens`` (B,) are the rows' audio placeholder counts, which split each group's output into rows.
    """
    inner = model.model
    chunk = 2 * inner.audio_tower.n_window
    chunks = ((features_mask.sum(-1) + chunk - 1) // chunk).clamp(min=1)  # (B,)
    kinds = chunks.unique().tolist()
    if len(kinds) == 1 and kinds[0] * chunk == features.shape[-1]:
        return inner.get_audio_features(features, features_mask).pooler_output  # (N_audio, H)
    rows: list[torch.Tensor | None] = [None] * features.shape[0]
    for n in kinds:
        idx = (chunks == n).nonzero().squeeze(1)
        width = n * chunk
        out = inner.get_audio_features(features[idx, :, :width], features_mask[idx, :width]).pooler_output
        for row, part in zip(idx.tolist(), out.split(tokens[idx].tolist()), strict=True):
            rows[row] = part
    return torch.cat(rows)  # type: ignore[arg-type]


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what generation uses)."""
    pos = mask.long().cumsum(-1) - 1  # (N, L)
    return pos.clamp(min=0)


@dataclass
class PromptState:
    """The prefilled prompts of B utterances: what every continuation of a prompt shares.

    ``keys``/``values`` hold one ``(B, kv_heads, P, head_dim)`` tensor per decoder layer, ``last_hidden``
    the final hidden state at the last prompt position (it predicts the first completion token), ``mask``
    the ``(B, P)`` prompt attention mask. Valid only for the weights that computed it: the trainer uses a
    rollout's state for the behaviour log-probs (same weights, no update in between) and then drops it.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last_hidden: torch.Tensor  # (B, H)
    mask: torch.Tensor  # (B, P)

    def select(self, rows: Sequence[int]) -> PromptState:
        """The state of a subset of prompts (a minibatch); the shared left-padding columns stay (masked)."""
        if list(rows) == list(range(self.mask.shape[0])):
            return self
        idx = torch.tensor(list(rows), device=self.mask.device)
        return PromptState(
            [k[idx] for k in self.keys], [v[idx] for v in self.values], self.last_hidden[idx], self.mask[idx]
        )

    def expanded_cache(self, group_size: int, config: object) -> DynamicCache:
        """A fresh ``DynamicCache`` with every prompt repeated ``group_size`` times (rows ``b*G + g``).

        Fresh because decoding appends to the cache: the state itself is never modified, so it can serve
        several passes. ``repeat_interleave`` keeps the autograd graph, so in the update pass the gradient
        of all G continuations flows back into the one prefill.
        """
        data = [
            (k.repeat_interleave(group_size, 0), v.repeat_interleave(group_size, 0))
            for k, v in zip(self.keys, self.values, strict=True)
        ]
        return DynamicCache(data, config=config)


def cache_usable(model: torch.nn.Module) -> bool:
    """False while gradient checkpointing is active (a training-mode model with checkpointed decoder layers):
    transformers then drops every cache, because the backward replay would append to it a second time. The
    shared-prefix path needs a cache, so callers fall back to the plain path in that case."""
    if not model.training:
        return True
    return not any(getattr(m, "gradient_checkpointing", False) for m in model.model.language_model.modules())


def _check_cacheable(model: torch.nn.Module) -> None:
    text = model.config.get_text_config(decoder=True)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(
            f"recipe.shared_prefix=true needs full-attention decoder layers (a repeated prompt cache), this model has "
            f"{sorted(kinds)}; set recipe.shared_prefix=false"
        )


def prefill(model: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor) -> PromptState:
    """Run the decoder over ``(B, P, H)`` prompt embeddings once and keep its cache (grad as the context allows)."""
    _check_cacheable(model)
    out = model.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask), use_cache=True
    )
    cache = out.past_key_values
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return PromptState(keys, values, out.last_hidden_state[:, -1], mask)


def completion_logprobs(
    model: torch.nn.Module,
    rollouts: Rollouts,
    temperature: float,
    rows: Sequence[int] | None = None,
    shared_prefix: bool = True,
    prompt_state: PromptState | None = None,
) -> torch.Tensor:
    """``(R, C)`` log-probabilities of the sampled tokens under ``model`` (0 at padded positions).

    ``rows`` selects prompts (indices into the B prompts; their G completions are taken together), so a
    minibatch re-encodes only its own utterances. ``shared_prefix`` prefills each prompt once and runs the
    G completions over its repeated cache; otherwise each of the R rows runs prompt + completion.
    ``prompt_state`` (all B prompts, computed by *these* weights) skips the encoder and the prefill. Under active
    gradient checkpointing (no cache can be kept) the plain path is used whatever ``shared_prefix`` says.
    """
    g = rollouts.group_size
    prompt_rows = list(range(len(rollouts.prompts.samples))) if rows is None else list(rows)
    comp_rows = torch.tensor([b * g + k for b in prompt_rows for k in range(g)], device=rollouts.completion_ids.device)
    comp_ids = rollouts.completion_ids[comp_rows]  # (R, C)
    comp_mask = rollouts.completion_mask[comp_rows]  # (R, C)
    tokens = model.get_input_embeddings()(comp_ids)  # (R, C, H)
    if prompt_state is None and not cache_usable(model):
        shared_prefix = False  # gradient checkpointing: no cache can be kept, full sequences instead
    if shared_prefix or prompt_state is not None:
        if prompt_state is not None:
            state = prompt_state.select(prompt_rows)
        else:
            sub = _subset(rollouts.prompts, prompt_rows)
            state = prefill(model, prompt_embeddings(model, sub), sub.attention_mask)
        mask = torch.cat([state.mask.repeat_interleave(g, 0), comp_mask], dim=1)  # (R, P+C)
        p = state.mask.shape[1]
        hidden = model.model.language_model(
            inputs_embeds=tokens.to(state.last_hidden.dtype),
            attention_mask=mask,
            position_ids=position_ids(mask)[:, p:],
            past_key_values=state.expanded_cache(g, model.config),
            use_cache=True,
        ).last_hidden_state  # (R, C, H)
        first = state.last_hidden.repeat_interleave(g, 0).unsqueeze(1)  # (R, 1, H): predicts completion token 0
        before = torch.cat([first, hidden[:, :-1]], dim=1)  # (R, C, H): state that predicts each completion token
    else:
        sub = _subset(rollouts.prompts, prompt_rows)
        prompt = prompt_embeddings(model, sub).repeat_interleave(g, 0)  # (R, P, H)
        embeds = torch.cat([prompt, tokens.to(prompt.dtype)], dim=1)  # (R, P+C, H)
        mask = torch.cat([sub.attention_mask.repeat_interleave(g, 0), comp_mask], dim=1)  # (R, P+C)
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
        ).last_hidden_state  # (R, P+C, H)
        p = sub.input_ids.shape[1]
        before = hidden[:, p - 1 : p - 1 + comp_ids.shape[1]]  # (R, C, H)
    valid = comp_mask.bool()  # (R, C)
    logits = model.lm_head(before[valid]).float() / temperature  # (N, V)
    picked = torch.log_softmax(logits, -1).gather(-1, comp_ids[valid].unsqueeze(-1)).squeeze(-1)  # (N,)
    out = torch.zeros(comp_ids.shape, dtype=picked.dtype, device=picked.device)  # (R, C)
    out[valid] = picked
    return out


def _subset(prompts: PromptBatch, rows: Sequence[int]) -> PromptBatch:
    if list(rows) == list(range(len(prompts.samples))):
        return prompts
    idx = torch.tensor(list(rows), device=prompts.input_ids.device)
    # drop columns that are padding for every selected row (left padding: leading columns)
    mask = prompts.attention_mask[idx]
    first = int((mask.sum(0) > 0).nonzero()[0])
    return PromptBatch(
        [prompts.samples[r] for r in rows],
        prompts.input_ids[idx, first:],
        mask[:, first:],
        prompts.input_features[idx],
        prompts.input_features_mask[idx],
        [prompts.forced_language[r] for r in rows],
        [prompts.hotwords[r] for r in rows],
        prompts.max_new_tokens,
    )


def logits_warpers(opts: GSPOSampling) -> LogitsProcessorList:
    """The sampling transforms ``generate(do_sample=True, ...)`` applies for these options, in its order."""
    warpers = LogitsProcessorList()
    if opts.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(opts.temperature))
    if opts.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=opts.top_k))
    if opts.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=opts.top_p))
    return warpers


class HFStepDecoder:
    """Decode steps through the transformers forward with a ``DynamicCache`` (``recipe.fast_decode=false``).

    The reference for :class:`qwen3asr_train.rl.fast_decode.LeanDecoder`: same interface (``select`` rows,
    ``step`` one token per row), one full ``language_model`` call per step.
    """

    def __init__(self, model: torch.nn.Module, state: PromptState) -> None:
        self.lm = model.model.language_model
        self.cache = state.expanded_cache(1, model.config)  # one cache row per distinct prefix
        self.mask = state.mask  # (U, P+t)

    def select(self, parent: torch.Tensor) -> None:
        """Keep rows ``parent`` of the cache (repeats copy a row)."""
        self.cache.batch_select_indices(parent)
        self.mask = self.mask[parent]

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """``(U, H)`` input embeddings of one new token per row -> ``(U, H)`` final hidden states."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)  # (U, P+t+1)
        return self.lm(
            inputs_embeds=embeds[:, None],
            attention_mask=self.mask,
            position_ids=position_ids(self.mask)[:, -1:],
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state[:, -1]


def step_decoder(model: torch.nn.Module, state: PromptState, max_new_tokens: int, fast: bool) -> StepDecoder:
    """The lean decode step (``fast``, :class:`LeanDecoder`) or the transformers forward over ``state``'s prompts."""
    if fast:
        return LeanDecoder(model.model.language_model, state, max_new_tokens)
    return HFStepDecoder(model, state)


@torch.no_grad()
def sample_from_prompts(
    model: torch.nn.Module,
    prompts: PromptBatch,
    opts: SamplingOptions,
    end_ids: Sequence[int],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, PromptState]:
    """``(B*G, C)`` sampled token ids (pad after a row's end token), their ``(B*G, C)`` log-probabilities under
    ``logits / temperature`` (what :func:`completion_logprobs` computes; top-k/top-p do not enter them; 0 after
    the end token) and the prompts' state, with one prefill per prompt.

    Each step: logits of the last token (float32) → temperature/top-k/top-p → softmax → one
    ``torch.multinomial`` draw per row; finished rows get ``pad_id``; stop when every row has ended or
    after ``prompts.max_new_tokens``. That is ``generate``'s sampling step for step (same RNG draws, same
    shapes).

    The decoder runs once per distinct *live prefix* (prompt + tokens so far, not yet ended), not once per row:
    the G samples of a prompt share one decoder row until their tokens differ (ASR samples often agree on
    ``language X<asr_text>`` and on most words), a row is copied only when its samples split, and a prefix that
    ended is dropped from the decoder. Rows gather their logits from their prefix. Ended rows still take part in
    the ``(B*G, V)`` draw with placeholder logits (their token is replaced by ``pad_id``), because
    ``torch.multinomial`` draws random numbers for every row: so the live rows' draws are those of the
    B·G-row loop. ``opts.fast_decode`` picks :class:`LeanDecoder` over the transformers forward.
    """
    g = opts.group_size
    state = prefill(model, prompt_embeddings(model, prompts), prompts.attention_mask)
    rows = state.mask.shape[0] * g
    device = state.mask.device
    decoder = step_decoder(model, state, prompts.max_new_tokens, opts.fast_decode)
    embed = model.get_input_embeddings()
    hidden = state.last_hidden  # (U, H): one row per live prefix
    node = torch.arange(state.mask.shape[0], device=device).repeat_interleave(g)  # (B*G,): row -> its prefix
    warpers = logits_warpers(opts)
    ends = torch.tensor(list(end_ids), device=device)
    live = torch.ones(rows, dtype=torch.bool, device=device)  # (B*G,): not yet ended
    generated: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    vocab = 0
    for step in range(prompts.max_new_tokens):
        if step > 0:
            # the new live prefixes: distinct (old prefix, token) pairs of the rows that have not ended
            alive = live.nonzero().squeeze(1)  # (L,)
            keys, inverse = torch.unique(node[alive] * vocab + generated[-1][alive], return_inverse=True)  # (U',)
            parent, token = keys // vocab, keys % vocab  # (U',)
            if parent.numel() != hidden.shape[0] or not torch.equal(
                parent, torch.arange(parent.numel(), device=device)
            ):
                decoder.select(parent)
            node = torch.zeros_like(node)  # ended rows point at prefix 0: placeholder logits, never used
            node[alive] = inverse
            hidden = decoder.step(embed(token).to(hidden.dtype))  # (U', H)
        logits = model.lm_head(hidden).float()  # (U, V)
        vocab = logits.shape[-1]
        # temperature, top-k and top-p act on each row alone and never read the tokens so far, so warping the U
        # prefixes' logits and then gathering rows gives every row what warping its own copy gives
        probs = torch.softmax(warpers(None, logits), dim=-1)[node]  # (B*G, V)
        token = torch.multinomial(probs, num_samples=1).squeeze(1)  # (B*G,)
        token = torch.where(live, token, pad_id)
        generated.append(token)
        logp = torch.log_softmax(logits / opts.temperature, -1)[node, token]  # (B*G,)
        logprobs.append(torch.where(live, logp, 0.0))
        live = live & ~torch.isin(token, ends)
        if not bool(live.any()):
            break
    return torch.stack(generated, dim=1), torch.stack(logprobs, dim=1), state


class RolloutEngine(Protocol):
    """Produces G completions per prompt with the current policy.

    ``generate`` returns :class:`Rollouts` (groups contiguous; ``completion_mask`` up to and including the end
    token); it may attach ``prompt_state`` only when that state was computed by the training model's current
    weights in this process. ``sync_weights`` is called after every optimizer step.
    """

    def generate(self, model: torch.nn.Module, prompts: PromptBatch, opts: SamplingOptions) -> Rollouts: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


class HFGenerateEngine:
    """Sampling with the training model itself (encoder once per utterance; prefill once per prompt when shared,
    except under active gradient checkpointing, where it samples with ``generate`` as the plain path does)."""

    def __init__(self, processor: Qwen3ASRProcessor) -> None:
        tok = processor.tokenizer
        self.tokenizer = tok
        self.end_ids = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]
        self.pad_id = tok.pad_token_id

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: generation uses the training model itself."""

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: PromptBatch, opts: SamplingOptions) -> Rollouts:
        g = opts.group_size
        state = sampled = None
        if opts.shared_prefix and cache_usable(model):
            out, sampled, state = sample_from_prompts(model, prompts, opts, self.end_ids, self.pad_id)  # (B*G, C)
        else:
            embeds = prompt_embeddings(model, prompts).repeat_interleave(g, 0)  # (B*G, P, H)
            mask = prompts.attention_mask.repeat_interleave(g, 0)  # (B*G, P)
            out = model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                do_sample=True,
                temperature=opts.temperature,
                top_p=opts.top_p,
                top_k=opts.top_k,
                max_new_tokens=prompts.max_new_tokens,
                eos_token_id=self.end_ids,
                pad_token_id=self.pad_id,
            )  # (B*G, C): only new tokens when generating from embeddings
        ends = torch.isin(out, torch.tensor(self.end_ids, device=out.device))  # (B*G, C)
        seen_end = ends.long().cumsum(-1)  # (B*G, C)
        comp_mask = ((seen_end == 0) | (ends & (seen_end == 1))).long()  # up to and including the first end
        truncated = (~ends.any(-1)).tolist()
        ids = out.masked_fill(comp_mask == 0, self.pad_id)
        texts = [
            self.tokenizer.decode(row[m.bool()], skip_special_tokens=True)
            for row, m in zip(ids, comp_mask, strict=True)
        ]
        if sampled is not None:
            sampled = sampled.masked_fill(comp_mask == 0, 0.0)
        return Rollouts(
            prompts,
            g,
            ids,
            comp_mask,
            texts,
            truncated,
            prompt_state=state,
            sampled_logprobs=sampled,
            sampled_logprobs_in_process=sampled is not None and full_precision(model),
        )


def full_precision(model: torch.nn.Module) -> bool:
    """True when ``model`` computes in plain float32 here: float32 weights, no autocast, and on CUDA no TF32 matmuls.

    Why: the sampler's log-probs come from one-token decode steps, a recomputing pass from one teacher-forced
    forward; in float32 the two differ by float round-off (~1e-6, far inside the 3e-4 clip), but in bfloat16 or
    TF32 by ~1e-3, which the sequence ratio would read as policy change. Only in float32 are they used as the
    behaviour log-probs without ``recipe.sampler_logprobs=true``.
    """
    weight = model.get_input_embeddings().weight
    if weight.dtype != torch.float32 or torch.is_autocast_enabled(weight.device.type):
        return False
    return weight.device.type != "cuda" or torch.get_float32_matmul_precision() == "highest"
