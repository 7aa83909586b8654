"""GSPO rollouts: prompts, G sampled transcripts per utterance, and sequence log-probabilities.

Why not ``generate(num_return_sequences=G)`` on the processor output: transformers repeats every input
tensor G times, ``input_features`` included, so the audio encoder runs G times per utterance. Here the encoder runs once per utterance: the prompt
embeddings (text embeddings with the projected audio scattered into the ``<|audio_pad|>`` slots) are
built once and repeated G times, and generation starts from ``inputs_embeds``.

Log-probabilities are recomputed by one teacher-forced pass with the same embeddings and position ids
(``cumsum(attention_mask) − 1``, as generation uses for left-padded prompts), dividing the logits by
the sampling temperature, and the LM head is evaluated only at completion positions.

Engines: :class:`HFGenerateEngine` (transformers ``generate``; CPU-testable) implements
:class:`RolloutEngine`. A vLLM engine would implement the same two methods (``generate`` and
``sync_weights``: load the updated weights, then reset the prefix cache); it is not shipped because
it cannot be tested without a GPU here.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch
from transformers import Qwen3ASRProcessor

from qwen3asr_train.config.schema import GSPOSampling
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.collate import candidate_words
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.prompts import ENDOFTEXT, IM_END, asr_prompt


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
    """``(B, P, H)`` prompt embeddings; the audio encoder runs once over the B utterances."""
    inner = model.model
    embeds = inner.get_input_embeddings()(prompts.input_ids)  # (B, P, H)
    features = prompts.input_features.to(embeds.dtype)
    audio = inner.get_audio_features(features, prompts.input_features_mask).pooler_output  # (N_audio, H)
    slots = (prompts.input_ids == model.config.audio_token_id).unsqueeze(-1)  # (B, P, 1)
    return embeds.masked_scatter(slots, audio.to(embeds.dtype))


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what generation uses)."""
    pos = mask.long().cumsum(-1) - 1  # (N, L)
    return pos.clamp(min=0)


def completion_logprobs(
    model: torch.nn.Module, rollouts: Rollouts, temperature: float, rows: Sequence[int] | None = None
) -> torch.Tensor:
    """``(R, C)`` log-probabilities of the sampled tokens under ``model`` (0 at padded positions).

    ``rows`` selects prompts (indices into the B prompts; their G completions are taken together), so a
    minibatch re-encodes only its own utterances.
    """
    g = rollouts.group_size
    prompt_rows = list(range(len(rollouts.prompts.samples))) if rows is None else list(rows)
    sub = _subset(rollouts.prompts, prompt_rows)
    comp_rows = torch.tensor([b * g + k for b in prompt_rows for k in range(g)], device=rollouts.completion_ids.device)
    comp_ids = rollouts.completion_ids[comp_rows]  # (R, C)
    comp_mask = rollouts.completion_mask[comp_rows]  # (R, C)
    prompt = prompt_embeddings(model, sub).repeat_interleave(g, 0)  # (R, P, H)
    tokens = model.get_input_embeddings()(comp_ids)  # (R, C, H)
    embeds = torch.cat([prompt, tokens.to(prompt.dtype)], dim=1)  # (R, P+C, H)
    mask = torch.cat([sub.attention_mask.repeat_interleave(g, 0), comp_mask], dim=1)  # (R, P+C)
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
    ).last_hidden_state  # (R, P+C, H)
    p = sub.input_ids.shape[1]
    before = hidden[:, p - 1 : p - 1 + comp_ids.shape[1]]  # (R, C, H): state that predicts each completion token
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


class RolloutEngine(Protocol):
    """Produces G completions per prompt with the current policy."""

    def generate(self, model: torch.nn.Module, prompts: PromptBatch, opts: SamplingOptions) -> Rollouts: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


class HFGenerateEngine:
    """Sampling with transformers ``generate`` from shared prompt embeddings (encoder once per utterance)."""

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
        return Rollouts(prompts, g, ids, comp_mask, texts, truncated)
