"""Batched decoding for evaluation: left-padded prompts, KV-cached greedy (or beam) generation.

Why our own loop rather than a pipeline: evaluation must use exactly the training prompt format
(:mod:`qwen3asr_train.data.prompts`), bound ``max_new_tokens`` by the audio duration (a looping model
must not decode 4,096 tokens per clip), report whether a hypothesis was truncated, and shard the work
across ranks with the same result as one process. Hypotheses are returned *raw* (``language X<asr_text>
text``); scoring parses them without repairing repetitions.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import Qwen3ASRProcessor

from qwen3asr_train.config.schema import DecodeConfig
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.prompts import ENDOFTEXT, IM_END, asr_prompt
from qwen3asr_train.data.sampler import pack_by_duration
from qwen3asr_train.eval.report import DecodeResult

log = logging.getLogger(__name__)


DecodeOptions = DecodeConfig
"""Decoding options are the ``DecodeConfig`` schema itself (``evaluation.decode`` / ``recipe.decode``)."""


@functools.cache
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def decode_readable(tokenizer: Any, ids: Sequence[int]) -> str:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, except that bytes which do not form UTF-8 characters
    are shown as ``\\xNN`` instead of U+FFFD.

    Why: an untrained or confused model emits byte tokens that split characters; ``decode`` turns each into
    "\ufffd", which hides what the model wrote (and reads as garbage in the logged samples).
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in text:
        return text
    special = set(tokenizer.all_special_ids)
    added = tokenizer.get_added_vocab()
    decoder = _byte_decoder()
    pieces: list[str] = []
    pending = bytearray()
    for token_id in ids:
        if token_id in special:
            continue
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        if token in added or any(c not in decoder for c in token):
            pieces.append(pending.decode("utf-8", errors="backslashreplace"))
            pending.clear()
            pieces.append(token)
        else:
            pending += bytes(decoder[c] for c in token)
    pieces.append(pending.decode("utf-8", errors="backslashreplace"))
    return "".join(pieces)


def duration_batches(durations: Sequence[float], max_seconds: float, max_size: int) -> list[list[int]]:
    """Indices sorted by duration, cut into batches of at most ``max_seconds`` padded seconds / ``max_size``
    items. Deterministic, so every rank of a sharded evaluation computes the same plan."""
    order = sorted(range(len(durations)), key=lambda i: (durations[i], i))
    return pack_by_duration(order, durations, max_seconds, max_size)


def _batches(samples: Sequence[Sample], opts: DecodeOptions) -> list[list[int]]:
    return duration_batches([s.utt.duration for s in samples], opts.max_batch_seconds, opts.max_batch_size)


def end_token_ids(processor: Qwen3ASRProcessor) -> list[int]:
    """``<|im_end|>`` and ``<|endoftext|>``: generation stops at either."""
    tok = processor.tokenizer
    return [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    processor: Qwen3ASRProcessor,
    prompts: Sequence[str],
    audios: Sequence[np.ndarray],
    opts: DecodeOptions,
) -> list[list[int]]:
    """The new token ids of a left-padded batch, greedy (or beam) search, the budget bounded by the longest
    audio (``tokens_per_second`` × seconds + ``min_new_tokens``, capped): offline and streaming decoding alike."""
    param = next(model.parameters())
    inputs = processor(text=list(prompts), audio=list(audios), padding_side="left", sampling_rate=SAMPLE_RATE).to(
        param.device
    )
    inputs["input_features"] = inputs["input_features"].to(param.dtype)
    longest = max(len(a) for a in audios) / SAMPLE_RATE
    budget = min(opts.max_new_tokens_cap, math.ceil(opts.tokens_per_second * longest) + opts.min_new_tokens)
    end_ids = end_token_ids(processor)
    out = model.generate(
        **inputs,
        max_new_tokens=budget,
        do_sample=False,
        num_beams=opts.num_beams,
        eos_token_id=end_ids,
        pad_token_id=end_ids[1],
    )
    return out[:, inputs["input_ids"].shape[1] :].tolist()


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    processor: Qwen3ASRProcessor,
    samples: Sequence[Sample],
    opts: DecodeOptions | None = None,
    batches: list[list[int]] | None = None,
) -> list[DecodeResult]:
    """Decode ``samples`` with ``model`` on its current device; returns results in sample order.

    ``batches`` (indices into ``samples``) defaults to duration-sorted batches; only the listed samples
    are decoded (the distributed path passes each rank its share of one global batch plan).
    """
    opts = opts or DecodeOptions()
    tok = processor.tokenizer
    end_ids = end_token_ids(processor)
    was_training = model.training
    model.eval()
    results: dict[int, DecodeResult] = {}
    try:
        for batch in _batches(samples, opts) if batches is None else batches:
            rows = [samples[i] for i in batch]
            forced = [r.utt.language if opts.forced_language and r.utt.language else None for r in rows]
            prompts = [
                asr_prompt(r.utt.context if opts.use_context else "", f) for r, f in zip(rows, forced, strict=True)
            ]
            new = generate_ids(model, processor, prompts, [r.audio for r in rows], opts)
            for k, (i, row) in enumerate(zip(batch, rows, strict=True)):
                ids = new[k]
                finished = any(t in end_ids for t in ids)
                text = decode_readable(tok, ids)
                results[i] = DecodeResult(
                    id=row.utt.id,
                    language=row.utt.language,
                    reference=row.utt.text,
                    hypothesis=text,
                    audio_seconds=len(row.audio) / SAMPLE_RATE,
                    truncated=not finished,
                    forced_language=forced[k],
                    dialect=row.utt.dialect,
                )
    finally:
        model.train(was_training)
    return [results[i] for i in sorted(results)]


def decode_distributed(
    model: torch.nn.Module,
    processor: Qwen3ASRProcessor,
    samples: Sequence[Sample],
    opts: DecodeOptions | None = None,
) -> list[DecodeResult]:
    """Every rank decodes every world-th batch of one global batch plan; all ranks get all results in order.

    Sharding whole batches (not utterances) keeps each batch's composition — and so its padding, features
    and outputs — identical to a single-process run.
    """
    opts = opts or DecodeOptions()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decode(model, processor, samples, opts)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = _batches(samples, opts)[rank::world]
    indices = sorted(i for batch in mine for i in batch)
    local = decode(model, processor, samples, opts, batches=mine) if mine else []
    gathered: list[list[tuple[int, DecodeResult]]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, list(zip(indices, local, strict=True)))
    merged = dict(pair for part in gathered for pair in part)
    return [merged[i] for i in range(len(samples))]
