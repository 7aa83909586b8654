"""Streaming evaluation: what a model transcribes when audio arrives in chunks, decoded as upstream streams.

Why: the paper reports streaming next to offline recognition and trains for it (streaming-enhancement SFT,
``recipe.streaming_prob``). A model fine-tuned only on whole clips can lose far more under streaming than
its offline WER shows, so evaluation has to run the same procedure a deployment runs.

The procedure is upstream's streaming decoder (``qwen_asr`` 0.0.6, ``Qwen3ASRModel.streaming_transcribe`` and
``finish_streaming_transcribe``), re-implemented on our model and processor with transformers ``generate``:

* audio arrives in chunks of ``chunk_seconds``; after each full chunk, *all* audio so far is decoded again
  from the start (no padding); at the end the remaining shorter tail is decoded the same way. A clip of
  ``N`` samples therefore takes ``ceil(N / chunk)`` steps; step ``j`` sees ``audio[:min((j + 1) * chunk, N)]``;
* the prompt is the normal ASR prompt (with ``language X<asr_text>`` when the language is forced) followed
  by a *prefix* the model continues from. For the first ``unfixed_chunks`` steps the prefix is empty; later,
  the previous step's output text (prefix + generated, special tokens dropped) is tokenised again, its last
  ``unfixed_tokens`` tokens are dropped, and the rest is decoded back to text — dropping one more token
  while that text contains U+FFFD (a character split between tokens);
* the output of a step is prefix + generated text; the last step's output is the hypothesis.

One difference from upstream, on purpose: upstream's final flush cuts the prefix with ``max(1, n - k)``
tokens and no U+FFFD check; we cut it like every other step, so a flush can never start from half a
character. Everything else (including re-tokenising the text rather than reusing generated ids) follows
upstream.

Decoding runs the utterances of a set in lock-step: step ``j`` of every utterance that has one is decoded in
duration batches (left-padded, as :mod:`qwen3asr_train.eval.decode`), since each step depends only on the
same utterance's previous step. A streaming result is a :class:`DecodeResult` like an offline one, so it is
scored by the same parser and aggregator (:func:`qwen3asr_train.eval.report.score_results`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from qwen3asr_train.config.recipes import DecodeConfig, StreamingConfig
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.prompts import asr_prompt
from qwen3asr_train.eval.decode import decode_readable, duration_batches, end_token_ids, generate_ids
from qwen3asr_train.eval.metrics import MetricAggregator
from qwen3asr_train.eval.report import DecodeResult, score_results, summarize_set, write_set_reports

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """What one generate call wrote for one prompt: ``text`` as a streaming client sees it (special tokens
    dropped, what the next prefix is cut from), ``readable`` the same with split bytes shown as ``\\xNN``
    (what reports show, as offline decoding does), and whether an end token was reached."""

    text: str
    readable: str
    finished: bool


GenerateFn = Callable[[list[str], list[np.ndarray]], list[Generation]]
"""Continue each prompt (a string with one audio slot, possibly ending in a prefix) on its audio."""


@dataclass
class StreamState:
    """One utterance's streaming state between steps.

    ``raw`` is the last step's output (prefix + generated, special tokens dropped), ``hypothesis`` the same
    with readable bytes; ``prefixes`` and ``outputs`` keep every step's prefix and output for inspection.
    """

    num_samples: int
    chunk_samples: int
    step: int = 0
    raw: str = ""
    hypothesis: str = ""
    truncated: bool = False
    prefixes: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        """Full chunks plus the tail: ``ceil(N / chunk)`` (one step for any non-empty clip)."""
        return max(1, math.ceil(self.num_samples / self.chunk_samples))

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    def audio_end(self) -> int:
        """Samples the current step decodes (all audio received so far)."""
        return min((self.step + 1) * self.chunk_samples, self.num_samples)


def chunk_samples(opts: StreamingConfig) -> int:
    """Chunk length in samples at 16 kHz, rounded as upstream (at least one sample)."""
    return max(1, int(round(opts.chunk_seconds * SAMPLE_RATE)))


def rollback_prefix(tokenizer: Any, raw: str, step: int, opts: StreamingConfig) -> str:
    """The prefix of ``step``: empty for the first ``unfixed_chunks`` steps, else ``raw`` re-tokenised minus
    its last ``unfixed_tokens`` tokens (more while the decoded text holds U+FFFD), decoded back to text."""
    if step < opts.unfixed_chunks:
        return ""
    ids = tokenizer.encode(raw, add_special_tokens=False)
    drop = opts.unfixed_tokens
    while True:
        end = max(0, len(ids) - drop)
        if end == 0:
            return ""
        prefix = tokenizer.decode(ids[:end])
        if "\ufffd" not in prefix:
            return prefix
        drop += 1


def run_streams(
    audios: Sequence[np.ndarray],
    prompts: Sequence[str],
    generate: GenerateFn,
    tokenizer: Any,
    opts: StreamingConfig,
    batch_plan: Callable[[list[int]], list[list[int]]] | None = None,
) -> list[StreamState]:
    """Stream every audio through ``generate`` (see the module docstring); returns the final states in order.

    ``prompts[i]`` is utterance i's prompt without prefix. ``batch_plan`` groups the utterances active at a
    step (lengths in samples -> batches of positions); default: each utterance alone.
    """
    if len(audios) != len(prompts):
        raise ValueError(f"{len(audios)} audios but {len(prompts)} prompts")
    empty = [i for i, a in enumerate(audios) if len(a) == 0]
    if empty:
        raise ValueError(f"streaming needs audio: utterance(s) {empty[:5]} are empty")
    size = chunk_samples(opts)
    states = [StreamState(num_samples=len(a), chunk_samples=size) for a in audios]
    plan = batch_plan or (lambda lengths: [[k] for k in range(len(lengths))])
    while True:
        active = [i for i, s in enumerate(states) if not s.done]
        if not active:
            return states
        ends = [states[i].audio_end() for i in active]
        for batch in plan(ends):
            members = [active[k] for k in batch]
            prefixes = [rollback_prefix(tokenizer, states[i].raw, states[i].step, opts) for i in members]
            outs = generate(
                [prompts[i] + p for i, p in zip(members, prefixes, strict=True)],
                [audios[i][: states[i].audio_end()] for i in members],
            )
            if len(outs) != len(members):
                raise RuntimeError(f"generate returned {len(outs)} outputs for {len(members)} prompts")
            for i, prefix, out in zip(members, prefixes, outs, strict=True):
                state = states[i]
                state.raw = prefix + out.text
                state.hypothesis = prefix + out.readable
                state.truncated = not out.finished
                state.prefixes.append(prefix)
                state.outputs.append(state.raw)
                state.step += 1


def hf_generate(model: torch.nn.Module, processor: Any, opts: DecodeConfig) -> GenerateFn:
    """A :data:`GenerateFn` on a transformers model: left-padded batch, greedy (or beam) search, the
    generation budget bounded by the longest audio of the batch exactly as offline decoding bounds it."""
    tok = processor.tokenizer
    end_ids = end_token_ids(processor)

    def generate(prompts: list[str], audios: list[np.ndarray]) -> list[Generation]:
        return [
            Generation(
                text=tok.decode(ids, skip_special_tokens=True),
                readable=decode_readable(tok, ids),
                finished=any(t in end_ids for t in ids),
            )
            for ids in generate_ids(model, processor, prompts, audios, opts)
        ]

    return generate


def decode_streaming(
    model: torch.nn.Module,
    processor: Any,
    samples: Sequence[Sample],
    decode_opts: DecodeConfig | None = None,
    opts: StreamingConfig | None = None,
) -> list[DecodeResult]:
    """Final streaming hypotheses of ``samples`` (in order) as :class:`DecodeResult` records.

    Prompts, forced language and context follow ``decode_opts`` as offline decoding does; each step's
    utterances are batched by ``decode_opts.max_batch_seconds``/``max_batch_size``.
    """
    decode_opts = decode_opts or DecodeConfig()
    opts = opts or StreamingConfig()
    forced = [s.utt.language if decode_opts.forced_language and s.utt.language else None for s in samples]
    prompts = [
        asr_prompt(s.utt.context if decode_opts.use_context else "", f) for s, f in zip(samples, forced, strict=True)
    ]

    def plan(lengths: list[int]) -> list[list[int]]:
        seconds = [n / SAMPLE_RATE for n in lengths]
        return duration_batches(seconds, decode_opts.max_batch_seconds, decode_opts.max_batch_size)

    was_training = model.training
    model.eval()
    try:
        states = run_streams(
            [s.audio for s in samples],
            prompts,
            hf_generate(model, processor, decode_opts),
            processor.tokenizer,
            opts,
            plan,
        )
    finally:
        model.train(was_training)
    return [
        DecodeResult(
            id=s.utt.id,
            language=s.utt.language,
            reference=s.utt.text,
            hypothesis=state.hypothesis,
            audio_seconds=len(s.audio) / SAMPLE_RATE,
            truncated=state.truncated,
            forced_language=f,
            dialect=s.utt.dialect,
        )
        for s, state, f in zip(samples, states, forced, strict=True)
    ]


def decode_streaming_distributed(
    model: torch.nn.Module, processor: Any, samples: Sequence[Sample], *options: Any
) -> list[DecodeResult]:
    """:func:`decode_streaming` (``options``: its decode and streaming options) with every rank taking every
    world-th utterance; all ranks get all results.

    Utterances, not batches, are dealt out (a step's batches change as utterances finish); batch-mates only
    touch a row through padding, which the encoder masks (``docs/decisions.md``).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decode_streaming(model, processor, samples, *options)
    rank, world = dist.get_rank(), dist.get_world_size()
    indices = list(range(rank, len(samples), world))
    local = decode_streaming(model, processor, [samples[i] for i in indices], *options) if indices else []
    gathered: list[list[tuple[int, DecodeResult]]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, list(zip(indices, local, strict=True)))
    merged = dict(pair for part in gathered for pair in part)
    return [merged[i] for i in range(len(samples))]


# ------------------------------------------------------------------------------------------ report


def _rate(entry: Mapping[str, Any]) -> tuple[str, float | None]:
    """(metric, rate) of a language entry; the no-speech group reports its hallucination rate."""
    if entry["ref_units"]:
        return entry["metric"], entry["rate"]
    return "halluc.", entry["hallucination_rate"]


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.2f}"


def compare(
    offline: Mapping[str, Mapping[str, Any]], streaming: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``{set: {"languages": {lang: {...}}, "macro": {...}}}`` with offline and streaming rates side by side
    from two ``{set: summarize_set(...)}`` mappings."""
    table: dict[str, dict[str, Any]] = {}
    for name, s in streaming.items():
        if name not in offline:
            raise ValueError(f"set {name!r} has a streaming summary but no offline one")
        o = offline[name]
        languages = {}
        for lang, entry in s["languages"].items():
            metric, rate = _rate(entry)
            off_metric, off_rate = _rate(o["languages"][lang])
            if off_metric != metric:
                raise ValueError(f"set {name!r}, {lang}: offline scored {off_metric}, streaming {metric}")
            languages[lang] = {
                "metric": metric,
                "offline": off_rate,
                "streaming": rate,
                "ref_units": entry["ref_units"],
                "utterances": entry["utterances"],
                "streaming_truncated": entry["truncated"],
            }
        table[name] = {
            "languages": languages,
            "macro": {"offline": o["macro"], "streaming": s["macro"]},
            "corpus": {"offline": o["corpus"]["rate"], "streaming": s["corpus"]["rate"]},
        }
    return table


def format_comparison(table: Mapping[str, Mapping[str, Any]], opts: StreamingConfig) -> str:
    """A Markdown table: a row per set × language, then the set's corpus and macro rows."""
    lines = [
        f"Streaming: {opts.chunk_seconds:g} s chunks, audio re-fed from the start, first {opts.unfixed_chunks} "
        f"chunk(s) without prefix, last {opts.unfixed_tokens} token(s) unfixed.",
        "",
        "| set | language | metric | offline % | streaming % | Δ points | ref units | utts | streaming truncated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def delta(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{100 * (b - a):+.2f}"

    for name, entry in table.items():
        for lang, c in entry["languages"].items():
            lines.append(
                f"| {name} | {lang} | {c['metric']} | {_pct(c['offline'])} | {_pct(c['streaming'])} | "
                f"{delta(c['offline'], c['streaming'])} | {c['ref_units']} | {c['utterances']} | "
                f"{c['streaming_truncated']} |"
            )
        for row in ("corpus", "macro"):
            a, b = entry[row]["offline"], entry[row]["streaming"]
            lines.append(f"| {name} | **{row}** | er | {_pct(a)} | {_pct(b)} | {delta(a, b)} | | | |")
    return "\n".join(lines) + "\n"


def write_streaming_reports(
    out_dir: str | Path,
    offline: Mapping[str, Mapping[str, Any]],
    results_by_set: Mapping[str, Sequence[DecodeResult]],
    opts: StreamingConfig,
    title: str | None = None,
) -> dict[str, Any]:
    """Score streaming results like offline ones, write the per-set files under ``<out_dir>/streaming/`` and
    ``streaming_summary.{md,json}`` (offline and streaming side by side) in ``out_dir``; returns the JSON payload.

    ``offline`` is what :func:`qwen3asr_train.eval.report.write_reports` returned for the same sets.
    """
    out = Path(out_dir)
    aggregator = MetricAggregator()
    streaming: dict[str, dict[str, Any]] = {}
    for name, results in results_by_set.items():
        _, records = score_results(name, results, aggregator)
        streaming[name] = summarize_set(aggregator, name, records)
        write_set_reports(out / "streaming", name, records, streaming[name])
    table = compare(offline, streaming)
    settings = {
        "chunk_seconds": opts.chunk_seconds,
        "unfixed_chunks": opts.unfixed_chunks,
        "unfixed_tokens": opts.unfixed_tokens,
    }
    payload = {"title": title, "streaming": settings, "sets": table, "streaming_summary": streaming}
    heading = f"# Streaming vs offline: {title}\n\n" if title else "# Streaming vs offline\n\n"
    markdown = heading + format_comparison(table, opts)
    (out / "streaming_summary.md").write_text(markdown, encoding="utf-8")
    (out / "streaming_summary.json").write_text(
        json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    log.info("streaming vs offline:\n%s", markdown)
    return payload


__all__ = [
    "Generation",
    "StreamState",
    "decode_streaming",
    "decode_streaming_distributed",
    "hf_generate",
    "rollback_prefix",
    "run_streams",
    "write_streaming_reports",
]
