"""Forced-aligner evaluation: non-autoregressive decoding of every word's slots, AAS and artifacts.

Every word is slotted (as at inference), the logits' argmax at the ``<timestamp>`` positions × 80 ms is
repaired to a monotonic sequence exactly as upstream does, and compared with the reference word times:
the accumulated average shift (AAS, mean |pred − ref| over word starts and ends, ms) and the shares of
boundaries within 20 / 50 / 100 ms, per set and language, and the AAS by the boundary's time in the clip
(0-1, 1-2, 2-5, 5-10, 10-30, >30 s: does the error grow with time?). The same numbers are computed for the
no-model energy baseline (words spread over the detected speech region by character count): a result
only means something if it beats it. Work is sharded by batch over ranks and gathered, like ASR decoding.

Clips longer than the model's classes address (``num_labels`` × 80 ms: 30 s for a 375-class model) are
aligned in pieces: cut in the middle of the widest pause between two reference words in the second half of
each window, aligned separately, times offset back. This is the information a segment-level transcript
gives a long-audio pipeline (upstream aligns ASR chunks of ≤180 s with each chunk's own text); the cut
points come from the reference, so the chunked number measures the aligner, not a segmenter.

Artifacts per set: ``alignments-<set>.json`` (per-utterance predictions and references),
``textgrids-<set>/<id>.TextGrid`` (predicted and reference tiers), ``plots-<set>/<id>.png`` for the first
utterance of every language of the set (``eval/plots.py``: legend, labels that never overlap, the
utterance's AAS in the title); over all sets: ``alignment_summary.{json,md}`` (per language, and by time in
the clip next to the energy baseline), ``aas_by_time.png`` (the same by-time numbers as bars) and
``unit_policy.json`` (per language: rows whose words were already the aligner's units, re-cut, skipped).
The summary also lists each set's worst utterances (:func:`worst_utterances_table`) and plots the worst one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import Qwen3ASRProcessor

from qwen3asr_train.config.recipes import DecodeConfig, chain_vote_shares_valid
from qwen3asr_train.data.aligner import AlignerCollator, UnitPolicyReport, max_addressable_seconds, usable_samples
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import AlignedWord
from qwen3asr_train.data.prompts import TIMESTAMP
from qwen3asr_train.eval.alignment import (
    TIME_BIN_LABELS,
    AlignmentStats,
    boundary_errors_ms,
    decode_slots,
    energy_baseline,
    find_pauses,
    slots_to_spans,
    time_drift_ratio,
    write_alignments_json,
    write_textgrid,
)
from qwen3asr_train.eval.decode import duration_batches
from qwen3asr_train.eval.plots import one_per_language, plot_alignment

log = logging.getLogger(__name__)


def pieces_at(sample: Sample, cuts: Sequence[tuple[float, int]]) -> list[tuple[float, Sample]]:
    """``[(offset s, piece)]`` of ``sample`` cut at ``cuts``: ``(cut seconds, index of the piece's last word)``
    in increasing order; the last piece runs to the end of the audio with the remaining words. Words and audio
    are shifted to each piece's start, so every piece is an ordinary sample (its text is its words joined)."""
    words = sample.utt.words or []
    total = sample.audio.size / SAMPLE_RATE
    pieces: list[tuple[float, Sample]] = []
    t0, first = 0.0, 0
    for cut, last in [*cuts, (total, len(words) - 1)]:
        a, b = int(round(t0 * SAMPLE_RATE)), int(round(cut * SAMPLE_RATE))
        chosen = words[first : last + 1]
        shifted = [AlignedWord(w.word, max(0.0, w.start - t0), max(0.0, w.end - t0)) for w in chosen]
        utt = replace(
            sample.utt,
            id=f"{sample.utt.id}@{t0:.2f}",
            duration=(b - a) / SAMPLE_RATE,
            text=" ".join(w.word for w in chosen),
            words=shifted,
        )
        pieces.append((a / SAMPLE_RATE, Sample(utt, sample.audio[a:b], sample.index)))
        t0, first = b / SAMPLE_RATE, last + 1
    return pieces


def split_long_sample(sample: Sample, max_seconds: float) -> list[tuple[float, Sample]]:
    """``[(offset s, piece)]``: ``sample`` itself when it fits in ``max_seconds``, else pieces cut between words.

    Each cut is the middle of the widest gap between consecutive reference words among the cuts that keep
    the piece within ``max_seconds`` and past half of it (the latest such cut if no gap lies past half).
    Words and audio are shifted to the piece's start, so each piece is an ordinary sample.

    Raises:
        ValueError: no cut between words keeps a piece within ``max_seconds`` (one word spans the window).
    """
    total = sample.audio.size / SAMPLE_RATE
    words = sample.utt.words or []
    if total <= max_seconds:
        return [(0.0, sample)]
    cuts: list[tuple[float, int]] = []
    t0, first = 0.0, 0
    while first < len(words) and total - t0 > max_seconds:
        candidates: list[tuple[float, float, int]] = []  # (gap, cut, index of the piece's last word)
        for k in range(first, len(words) - 1):
            cut = (words[k].end + words[k + 1].start) / 2
            if cut - t0 > max_seconds:
                break
            candidates.append((words[k + 1].start - words[k].end, cut, k))
        if not candidates:
            raise ValueError(
                f"{sample.utt.source or sample.utt.id}: no pause between words within {max_seconds:g} s of "
                f"{t0:.2f} s; cannot cut the {total:.1f} s clip into pieces the aligner's classes address"
            )
        late = [c for c in candidates if c[1] - t0 >= max_seconds / 2]
        _, cut, last = max(late) if late else candidates[-1]
        cuts.append((round(cut * SAMPLE_RATE) / SAMPLE_RATE, last))
        t0, first = cuts[-1][0], last + 1
    return pieces_at(sample, cuts)


def refine_cuts(
    audio: np.ndarray, coarse: Sequence[tuple[float, float]], window_s: float, min_pause_s: float = 0.1
) -> list[tuple[float, int]]:
    """Where to cut a long clip for the refinement pass, from the audio and a first-pass alignment only.

    Returns ``[(cut seconds, index of the piece's last word)]`` (for :func:`pieces_at`) so that every piece is
    at most ``window_s`` long where the audio allows. Each cut is the centre of the widest pause
    (:func:`~qwen3asr_train.eval.alignment.find_pauses`) in the second half of the current window that has
    first-pass word centres on both sides; the words go to the side of the cut their first-pass centre lies
    on. Without such a pause anywhere in the window, the cut falls midway between the last first-pass word
    that ends inside the window and the next one. Why pauses and word centres: a first pass that is a few
    hundred ms off on a long clip still puts almost every word on the right side of a pause between
    utterances, and a piece no longer than the training clips is aligned at the short-clip accuracy.
    """
    total = audio.size / SAMPLE_RATE
    n = len(coarse)
    centres = np.array([(a + b) / 2 for a, b in coarse], dtype=np.float64)  # (W,)
    pauses = find_pauses(audio, min_pause_s)
    cuts: list[tuple[float, int]] = []
    t0, first = 0.0, 0
    while total - t0 > window_s and first < n - 1:
        options: list[tuple[int, float, float, int]] = []  # (in second half, width, cut, words before it)
        for a, b in pauses:
            cut = (a + b) / 2
            before = int(np.searchsorted(centres, cut))  # words whose centre lies before the cut
            if t0 < cut <= t0 + window_s and first < before < n:
                options.append((int(cut - t0 >= window_s / 2), b - a, cut, before))
        if options:
            _, _, cut, before = max(options)
        else:
            ends = [k for k in range(first, n - 1) if coarse[k][1] <= t0 + window_s]
            if not ends:
                break  # one first-pass word spans the window: the rest stays one piece
            k = ends[-1]
            cut, before = min((coarse[k][1] + coarse[k + 1][0]) / 2, t0 + window_s), k + 1
            if cut <= t0:
                break
        cut = round(cut * SAMPLE_RATE) / SAMPLE_RATE
        cuts.append((cut, before - 1))
        t0, first = cut, before
    return cuts


def _window_piece(sample: Sample, t0: float, t1: float, first: int, count: int) -> Sample:
    """The audio ``[t0, t1)`` s of ``sample`` with its words ``first .. first + count - 1`` (text only: their
    times are placeholders, so a chained pass never reads the reference)."""
    a, b = int(round(t0 * SAMPLE_RATE)), int(round(t1 * SAMPLE_RATE))
    chosen = (sample.utt.words or [])[first : first + count]
    utt = replace(
        sample.utt,
        id=f"{sample.utt.id}@{a / SAMPLE_RATE:.2f}",
        duration=(b - a) / SAMPLE_RATE,
        text=" ".join(w.word for w in chosen),
        words=[AlignedWord(w.word, 0.0, 0.0) for w in chosen],
    )
    return Sample(utt, sample.audio[a:b], sample.index)


CHAIN_GUARD_SECONDS = 0.2
"""Chained windows: a word is accepted only if it ends at least this long before its window's end."""


@dataclass(frozen=True)
class ChainSettings:
    """Chained-window alignment of long clips (:func:`chain_align`; ``decode.align_chain_*`` in configs).

    Defaults are the settings measured best on the synthetic 30 s set (docs/results.md, 2026-12-03 ninth and
    tenth sessions) with aligners trained on 3 s windows (``recipe.span_window_seconds=3``), three seeds."""

    seconds: float = 0.0
    """Window length; 0 = no chaining (a clip is aligned in one piece)."""
    fill: float = 0.5
    """Words given to a window = the clip's mean words per second x ``seconds`` x this."""
    accept: float = 0.375
    """Words are accepted while they end in this first share of their window (the votes' middle share)."""
    back_s: float = 0.15
    """The next window starts this long before its anchor (the first re-given word's start, or the last
    accepted word's end when ``overlap`` is 0)."""
    overlap: int = 1
    """The last this many accepted words are given again to the next window."""
    snap: bool = True
    """A next window that would open inside a pause opens ``back_s`` before the pause's end."""
    votes: int = 6
    """Whole chains run, their ``accept`` shares evenly spread over ``accept +- accept_spread``; each word
    gets the median of the chains in its earliest group (``vote_tolerance_s``). 1 = one chain at ``accept``."""
    accept_spread: float = 0.125
    """Half-width of the votes' accept shares."""
    vote_tolerance_s: float = 0.2
    """A word's earliest group: the chains that start it at most this long after the earliest of them."""

    def check(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range."""
        if self.seconds < 0:
            raise ValueError(f"chain window {self.seconds:g} s must be >= 0")
        if not 0 < self.fill <= 1:
            raise ValueError(f"chain fill {self.fill:g} must be in (0, 1]")
        if not 0 < self.accept <= 1:
            raise ValueError(f"chain accept {self.accept:g} must be in (0, 1]")
        if self.back_s < 0 or self.overlap < 0:
            raise ValueError(f"chain back {self.back_s:g} s and overlap {self.overlap} must be >= 0")
        if self.votes < 1 or self.vote_tolerance_s < 0:
            raise ValueError(f"chain votes {self.votes} must be >= 1 and tolerance {self.vote_tolerance_s:g} s >= 0")
        if not chain_vote_shares_valid(self.accept, self.accept_spread, self.votes):
            raise ValueError(
                f"chain accept {self.accept:g} +- {self.accept_spread:g} must stay in (0, 1] (and the spread >= 0)"
            )

    @classmethod
    def from_decode(cls, decode: DecodeConfig) -> ChainSettings:
        """The settings of ``decode.align_chain_*``."""
        return cls(
            seconds=decode.align_chain_seconds,
            fill=decode.align_chain_fill,
            accept=decode.align_chain_accept,
            back_s=decode.align_chain_back_seconds,
            overlap=decode.align_chain_overlap,
            snap=decode.align_chain_snap,
            votes=decode.align_chain_votes,
            accept_spread=decode.align_chain_accept_spread,
            vote_tolerance_s=decode.align_chain_vote_tolerance_seconds,
        )


def earliest_group(chains: Sequence[Sequence[tuple[float, float]]], tolerance_s: float) -> list[tuple[float, float]]:
    """One clip's words from several chains: each word's median (start, end) over the chains whose start for
    it is at most ``tolerance_s`` after the earliest start (:func:`chain_align`, ``votes``)."""
    out: list[tuple[float, float]] = []
    for spans in zip(*chains, strict=True):
        times = np.asarray(spans, dtype=np.float64)  # (V, 2)
        group = times[times[:, 0] <= times[:, 0].min() + tolerance_s]
        start, end = np.median(group, axis=0).tolist()
        out.append((float(start), float(end)))
    return out


@torch.no_grad()
def chain_align(
    model: torch.nn.Module,
    processor: Qwen3ASRProcessor,
    samples: Sequence[Sample],
    chain: ChainSettings,
    max_batch_seconds: float = 240.0,
    max_batch_size: int = 32,
    decode: str = "argmax",
) -> list[list[tuple[float, float]]]:
    """Align long clips as a chain of short windows, each started where the previous one's words ended.

    Why: a small aligner is accurate in the first seconds of a clip and drifts later (docs/aligner.md), so
    a long recording is aligned as windows of at most ``chain.seconds``, each one short-clip-like. Window
    *r* of a clip covers the audio ``[t0, t0 + seconds)`` and is given the next ``m`` unaligned words, ``m``
    the clip's mean words per second x ``seconds`` x ``fill`` (so the words fit in the window even where the
    speech is ``1 / fill`` times slower than average); its words are accepted in order while they end in the
    first ``accept`` share of the window and at least :data:`CHAIN_GUARD_SECONDS` before its end (at least one word per
    window, so the chain always advances; the last words of a window are the least sure, and a misplaced
    anchor would start the next window in the wrong place), and the next window starts ``back_s`` before the
    last accepted word's end. The last window takes all remaining words. No reference time is read: only the audio and the word texts. The aligner must have
    been trained on partial transcripts (``recipe.span_prob``): a window's audio goes on past its words.

    ``overlap`` = *k* > 0 re-gives the last *k* accepted words to the next window, which then starts
    ``back_s`` before the first of them (their new times are discarded; only the words after them are
    accepted). Why: without it, one window whose last accepted word ends a few hundred ms late starts the
    next window after its first word's onset, and the error carries to the end of the clip; with it, the
    next window's first *new* word is preceded by whole words it is told about, so an anchor that is late
    by less than those words' length no longer cuts into the words still to align.

    ``snap``: a next window whose start falls inside a pause of the audio (:func:`find_pauses`, ≥ 100 ms)
    starts ``back_s`` before that pause's end instead. Why: no word starts inside a pause, and an aligner
    trained with at most ``recipe.span_lead_seconds`` of audio before a window's first word places that word
    too early when the window opens on a longer silence (between utterances), pulling the chain early.

    ``votes`` = *V* > 1 runs *V* whole chains, their ``accept`` shares evenly spaced over
    ``accept +- accept_spread``, and gives each word the median of its *earliest group*: the chains that
    start it no more than ``vote_tolerance_s`` after the earliest of them. Why: the aligner only finds a
    window's first word when the window opens 0.05-0.2 s before it (measured, docs/aligner.md); a window
    opened inside its anchor word (the anchor placed late) maps every word onto the next onset, and the
    chain stays late from there, one word or more. Chains with other accept shares take other anchors, so
    they go off at other words, and at any word the chains still on track are the earliest ones. (A plain
    median is outvoted once half the chains are off; measured far worse on one seed.) The earliest group,
    not the earliest chain, so one chain's ordinary early error is not taken alone.

    The chains run in lockstep: the windows of every clip and every chain at the same chain position go to
    the model together (batched by :func:`_align_units`), and a window that several chains open identically
    (same clip, start, first word and word count: always the first window, often the windows after a pause
    snap or where two accept shares take the same anchor) is aligned once and shared, since the model's
    output depends on nothing else. So *V* votes cost less than *V* single chains (measured in
    docs/results.md), with the same result as combining *V* chains run one by one (tested).
    """
    num_classes = int(model.config.num_labels)
    limit = max_addressable_seconds(num_classes) - 0.04
    if not 0 < chain.seconds <= limit:
        raise ValueError(f"chain window {chain.seconds:g} s must be in (0, {limit:g}] s (the classes' range)")
    chain.check()
    window_s, fill, back_s = chain.seconds, chain.fill, chain.back_s
    if chain.votes > 1:  # whole chains at other accept shares; each word from its earliest group of chains
        shares = np.linspace(chain.accept - chain.accept_spread, chain.accept + chain.accept_spread, chain.votes)
    else:
        shares = np.asarray([chain.accept])
    guard_s = CHAIN_GUARD_SECONDS
    loose = AlignerCollator(processor, num_classes, slot_prob=1.0, seed=0, check_units=False)
    # out[v][i]: chain v's accepted (start, end) for clip i
    out: list[list[list[tuple[float, float]]]] = [[[] for _ in samples] for _ in shares]
    # (chain, clip) -> (window start s, first word given, how many of the given words were accepted already)
    state = {(v, i): (0.0, 0, 0) for v in range(len(shares)) for i, s in enumerate(samples) if s.utt.words}
    pauses: dict[int, list[tuple[float, float]]] = {}  # clip -> its pauses, found once, shared by the chains
    asked = run = 0
    while state:
        units: list[tuple[int, float, Sample]] = []  # distinct windows: (unit index, start s, piece)
        unit_of: dict[tuple[int, int], int] = {}  # (chain, clip) -> its window's unit
        known: dict[tuple[int, int, int, int], int] = {}  # (clip, start sample, first, count) -> unit
        final: dict[tuple[int, int], bool] = {}
        for (v, i), (t0, first, again) in state.items():
            sample = samples[i]
            total = sample.audio.size / SAMPLE_RATE
            words = sample.utt.words or []
            rate = len(words) / max(total, 1e-6)
            last_window = total - t0 <= window_s
            count = len(words) - first if last_window else again + max(1, round(rate * window_s * fill))
            count = min(count, len(words) - first)
            final[(v, i)] = last_window
            key = (i, round(t0 * SAMPLE_RATE), first, count)  # the same window gives the same times
            if key not in known:
                known[key] = len(units)
                units.append((len(units), t0, _window_piece(sample, t0, min(total, t0 + window_s), first, count)))
            unit_of[(v, i)] = known[key]
        spans = _align_units(model, processor, loose, units, len(units), max_batch_seconds, max_batch_size, decode)
        asked += len(unit_of)
        run += len(units)
        for (v, i), j in unit_of.items():
            t0, first, again = state[(v, i)]
            got = spans[j][again:]  # the re-given words' new times are not used
            if final[(v, i)]:
                out[v][i] += got
                del state[(v, i)]
                continue
            keep = 0
            limit = t0 + min(window_s - guard_s, float(shares[v]) * window_s)
            while keep < len(got) and got[keep][1] <= limit:
                keep += 1
            keep = max(keep, 1)
            out[v][i] += got[:keep]
            nxt = first + again + keep
            if nxt >= len(samples[i].utt.words or []):
                del state[(v, i)]
                continue
            k = min(chain.overlap, nxt)
            start = (out[v][i][nxt - k][0] if k else got[keep - 1][1]) - back_s
            if chain.snap:
                if i not in pauses:
                    pauses[i] = find_pauses(samples[i].audio)
                start = max([start] + [b - back_s for a, b in pauses[i] if a <= start < b])
            state[(v, i)] = (round(max(t0 + 0.01, start) * SAMPLE_RATE) / SAMPLE_RATE, nxt - k, k)  # on a sample
    log.debug(
        "chained alignment: %d clips, %d chain(s), %d windows of <= %g s (%d distinct, run)",
        len(samples),
        len(shares),
        asked,
        window_s,
        run,
    )
    if len(shares) == 1:
        return out[0]
    return [earliest_group([chain_out[i] for chain_out in out], chain.vote_tolerance_s) for i in range(len(samples))]


@torch.no_grad()
def align(
    model: torch.nn.Module,
    processor: Qwen3ASRProcessor,
    samples: Sequence[Sample],
    max_batch_seconds: float = 240.0,
    max_batch_size: int = 32,
    chunk_long: bool = False,
    decode: str = "argmax",
    refine_seconds: float = 0.0,
    chain: ChainSettings | None = None,
) -> list[list[tuple[float, float]]]:
    """Predicted (start, end) seconds of every word of every sample, sharded over ranks when distributed.

    ``chunk_long``: align clips longer than the classes address in pieces cut between reference words
    (:func:`split_long_sample`; evaluation only, the samples' word units are checked by the caller);
    without it such a clip raises a clear error. ``decode``: the slot decoder
    (:data:`~qwen3asr_train.eval.alignment.DECODE_METHODS`). ``refine_seconds`` > 0: a clip longer than that
    is aligned twice, the second time in pieces of at most that length cut at pauses between the first
    pass's words (:func:`refine_cuts`; no reference times used), so long recordings get the accuracy the
    model has on clips of its training length. ``chain`` with ``seconds`` > 0: a clip longer than that is
    aligned as a chain of windows of that length (:func:`chain_align`; no reference times used, any length),
    instead of in one piece.
    """
    chain_seconds = chain.seconds if chain is not None else 0.0
    if refine_seconds > 0 and chain_seconds > 0:
        raise ValueError("choose one long-clip pass: refine_seconds or chain seconds, not both")
    num_classes = int(model.config.num_labels)
    collator = AlignerCollator(processor, num_classes, slot_prob=1.0, seed=0, check_units=not chunk_long)
    limit = max_addressable_seconds(num_classes) - 0.04  # the last half bin clips to the last class
    if chain_seconds > 0:
        longer = [i for i, s in enumerate(samples) if s.audio.size / SAMPLE_RATE > chain_seconds]
        if longer:
            chosen = set(longer)
            rest = [i for i in range(len(samples)) if i not in chosen]
            picked = [samples[i] for i in rest]
            short = (
                align(model, processor, picked, max_batch_seconds, max_batch_size, chunk_long, decode) if rest else []
            )
            chained = chain_align(
                model,
                processor,
                [samples[i] for i in longer],
                chain,
                max_batch_seconds,
                max_batch_size,
                decode,
            )
            out: list[list[tuple[float, float]]] = [[] for _ in samples]
            for i, spans in zip(rest, short, strict=True):
                out[i] = spans
            for i, spans in zip(longer, chained, strict=True):
                out[i] = spans
            log.info("chained alignment: %d clips over %g s", len(longer), chain_seconds)
            return out
    units: list[tuple[int, float, Sample]] = []  # (sample index, offset s, piece)
    for i, sample in enumerate(samples):
        pieces = split_long_sample(sample, limit) if chunk_long else [(0.0, sample)]
        units += [(i, offset, piece) for offset, piece in pieces]
    out = _align_units(model, processor, collator, units, len(samples), max_batch_seconds, max_batch_size, decode)
    if refine_seconds <= 0:
        return out
    second: list[tuple[int, float, Sample]] = []
    for i, sample in enumerate(samples):
        if sample.audio.size / SAMPLE_RATE > refine_seconds and len(out[i]) > 1:
            cuts = refine_cuts(sample.audio, out[i], refine_seconds)
            if cuts:
                second += [(i, offset, piece) for offset, piece in pieces_at(sample, cuts)]
    if second:
        loose = AlignerCollator(processor, num_classes, slot_prob=1.0, seed=0, check_units=False)
        refined = _align_units(model, processor, loose, second, len(samples), max_batch_seconds, max_batch_size, decode)
        for i in {i for i, _, _ in second}:
            out[i] = refined[i]
        log.info(
            "refinement pass: %d clips over %g s aligned again in %d pieces",
            len({i for i, _, _ in second}),
            refine_seconds,
            len(second),
        )
    return out


def _align_units(
    model: torch.nn.Module,
    processor: Qwen3ASRProcessor,
    collator: AlignerCollator,
    units: Sequence[tuple[int, float, Sample]],
    num_samples: int,
    max_batch_seconds: float,
    max_batch_size: int,
    decode: str,
) -> list[list[tuple[float, float]]]:
    """Align ``units`` (sample index, offset s, piece in time order) and join each sample's pieces."""
    timestamp_id = processor.tokenizer.convert_tokens_to_ids(TIMESTAMP)
    plan = duration_batches([p.audio.size / SAMPLE_RATE for _, _, p in units], max_batch_seconds, max_batch_size)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    local: list[tuple[int, list[tuple[float, float]]]] = []
    try:
        for batch_ids in plan[rank::world]:
            batch = collator([units[j][2] for j in batch_ids])
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "input_features_mask")}
            inputs["input_features"] = batch["input_features"].to(device, next(model.parameters()).dtype)
            logits = model(**inputs).logits  # (B, L, C)
            decoded = decode_slots(logits, inputs["input_ids"], timestamp_id, method=decode)
            for j, seconds in zip(batch_ids, decoded, strict=True):
                offset = units[j][1]
                local.append((j, [(round(a + offset, 3), round(b + offset, 3)) for a, b in slots_to_spans(seconds)]))
    finally:
        model.train(was_training)
    if world > 1:
        gathered: list[list[tuple[int, list[tuple[float, float]]]]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, local)
        local = [pair for part in gathered for pair in part]
    spans = dict(local)
    out: list[list[tuple[float, float]]] = [[] for _ in range(num_samples)]
    for j, (i, _, _) in enumerate(units):  # pieces are in time order within a sample
        out[i] += spans[j]
    return out


def score_alignments(
    set_name: str,
    samples: Sequence[Sample],
    predictions: Sequence[Sequence[tuple[float, float]]],
    stats: AlignmentStats,
    baseline: AlignmentStats,
) -> None:
    """Add a set's predictions (and the energy baseline) to the accumulators."""
    for sample, pred in zip(samples, predictions, strict=True):
        words = [w.word for w in sample.utt.words or []]
        ref = [(w.start, w.end) for w in sample.utt.words or []]
        stats.add(sample.utt.id, words, pred, ref, set_name, sample.utt.language)
        baseline.add(sample.utt.id, words, energy_baseline(sample.audio, words), ref, set_name, sample.utt.language)


def write_alignment_reports(
    out_dir: Path,
    sets: dict[str, list[Sample]],
    predictions: dict[str, list[Any]],
    stats: AlignmentStats,
    baseline: AlignmentStats,
    max_textgrids: int = 50,
    plots_per_language: int = 1,
    title: str | None = None,
    unit_report: UnitPolicyReport | None = None,
) -> dict[str, Any]:
    """Per-set JSON/TextGrids/plots, the summary tables and the by-time chart; returns the summary.

    ``plots_per_language``: alignment plots of the first N utterances of every language of a set and, when
    N > 0, of the set's worst utterance (largest summed error);
    ``title``: model and step, for the table and the plots; ``unit_report``: the word-unit policy's counts
    (``summary["unit_policy"]`` and ``unit_policy.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plotted: dict[str, list[Path]] = {}
    for name, samples in sets.items():
        per_set = AlignmentStats()
        per_set.records = [r for r in stats.records if r["set"] == name]
        write_alignments_json(out_dir / f"alignments-{name}.json", per_set)
        to_plot = set(one_per_language(samples, lambda s: s.utt.language, plots_per_language))
        # and the utterance with the largest summed error (a long clip gone off), when plots are on
        worst = max(per_set.records, key=_summed_error_ms)["id"] if per_set.records and plots_per_language else None
        for k, (sample, pred) in enumerate(zip(samples, predictions[name], strict=True)):
            words = [w.word for w in sample.utt.words or []]
            ref = [(w.start, w.end) for w in sample.utt.words or []]
            safe = sample.utt.id.replace("/", "_")
            if k < max_textgrids:
                write_textgrid(
                    out_dir / f"textgrids-{name}" / f"{safe}.TextGrid",
                    words,
                    pred,
                    len(sample.audio) / SAMPLE_RATE,
                    ref,
                )
            if k in to_plot or sample.utt.id == worst:
                aas = _utterance_aas_ms(pred, ref)
                heading = f"{name} / {sample.utt.language}: {sample.utt.id} (AAS {aas:.0f} ms)"
                plotted.setdefault(name, []).append(
                    plot_alignment(
                        out_dir / f"plots-{name}" / f"{safe}.png",
                        sample.audio,
                        words,
                        pred,
                        ref,
                        title=f"{heading}\n{title}" if title else heading,
                    )
                )
    summary = {"model": stats.summary(), "energy_baseline": baseline.summary()}
    if unit_report is not None:
        summary["unit_policy"] = unit_report.as_dict()
        unit_report.write(out_dir / "unit_policy.json")
    (out_dir / "alignment_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "| set | language | AAS ms | median ms | ≤20 ms | ≤50 ms | ≤100 ms | boundaries | baseline AAS ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for set_name, langs in summary["model"].items():
        for lang, s in langs.items():
            b = summary["energy_baseline"][set_name][lang]
            lines.append(
                f"| {set_name} | {lang} | {s['aas_ms']:.1f} | {s['median_ms']:.1f} | "
                f"{100 * s['within_20ms']:.1f}% | {100 * s['within_50ms']:.1f}% | {100 * s['within_100ms']:.1f}% "
                f"| {s['boundaries']} | {b['aas_ms']:.1f} |"
            )
    table = "\n".join(lines) + "\n"
    time_table = by_time_table(summary)
    picture = plot_aas_by_time(out_dir / "aas_by_time.png", summary, title)
    links = [
        f"- {name}: " + ", ".join(f"[{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in paths)
        for name, paths in plotted.items()
    ]
    heading = f"# Alignment evaluation: {title}\n\n" if title else ""
    plots_md = "\nAlignment plots (one utterance per language):\n\n" + "\n".join(links) + "\n" if links else ""
    time_md = (
        "\nAAS (ms) by the boundary's time in the clip (boundaries in brackets); ratio = worst bin / first second:\n\n"
        + time_table
        + (f"\n![AAS by time in the clip]({picture.name})\n" if picture is not None else "")
        + "\nMean signed error of the model (pred − ref, ms; negative = placed too early) by the same bins:\n\n"
        + bias_by_time_table(summary)
    )
    units_md = _unit_policy_md(summary.get("unit_policy"))
    worst_md = worst_utterances_table(stats.records)
    (out_dir / "alignment_summary.md").write_text(heading + table + time_md + worst_md + units_md + plots_md)
    log.info("alignment summary:\n%s\nby time in the clip:\n%s", table, time_table)
    return summary


def _summed_error_ms(record: dict[str, Any]) -> float:
    """Sum of |pred - ref| over one utterance record's word starts and ends, in ms."""
    words = record["words"]
    pred = [(w["start"], w["end"]) for w in words]
    return float(boundary_errors_ms(pred, [(w["ref_start"], w["ref_end"]) for w in words]).sum())


def worst_utterances_table(records: Sequence[dict[str, Any]], count: int = 5, off_ms: float = 150.0) -> str:
    """Markdown: per set, the ``count`` utterances with the largest summed boundary error, each with its share
    of the set's summed error and the first word whose start is off by more than ``off_ms``.

    Why: a set's AAS is a mean over boundaries, and on long clips one clip whose alignment went off by a
    word and never came back (a chained window, docs/aligner.md) can carry most of it: a 30 s set of 12
    clips where one clip holds 59% of the error was measured. This table says so at a glance, and
    where that clip went off, instead of a bare mean."""
    by_set: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_set.setdefault(record["set"], []).append(record)
    lines = [
        f"\nWorst utterances per set (summed |error|; first word whose start is off by > {off_ms:g} ms):\n",
        "| set | utterance | words | AAS ms | share of the set's error | words off | first off: word, ref start s, error ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for set_name, rows in by_set.items():
        sums = [_summed_error_ms(r) for r in rows]
        total = sum(sums)
        for k in sorted(range(len(rows)), key=lambda k: -sums[k])[:count]:
            words = rows[k]["words"]
            off = [(j, w) for j, w in enumerate(words) if abs(w["start"] - w["ref_start"]) * 1000.0 > off_ms]
            first = (
                f'#{off[0][0]} "{off[0][1]["word"]}", {off[0][1]["ref_start"]:.2f}, '
                f"{1000.0 * (off[0][1]['start'] - off[0][1]['ref_start']):+.0f}"
                if off
                else "–"
            )
            share = f"{100.0 * sums[k] / total:.1f}%" if total > 0 else "–"
            lines.append(
                f"| {set_name} | {rows[k]['id']} | {len(words)} | {rows[k]['aas_ms']:.1f} | {share} | {len(off)} "
                f"| {first} |"
            )
    return "\n".join(lines) + "\n" if by_set else ""


def by_time_table(summary: dict[str, Any]) -> str:
    """Markdown: per set and language, the model's and the energy baseline's AAS in each time bin."""
    lines = [
        "| set | language | model | " + " | ".join(TIME_BIN_LABELS) + " | ratio |",
        "|---|---|---|" + "---|" * (len(TIME_BIN_LABELS) + 1),
    ]
    for set_name, langs in summary["model"].items():
        shown = ["all"] + [lang for lang in langs if lang != "all"] if len(langs) > 2 else ["all"]
        for lang in shown:
            for label, source in (("model", summary["model"]), ("energy baseline", summary["energy_baseline"])):
                bins = source[set_name][lang].get("by_time", {})
                cells = [
                    f"{bins[k]['aas_ms']:.1f} ({bins[k]['boundaries']})" if k in bins else "–" for k in TIME_BIN_LABELS
                ]
                ratio = time_drift_ratio(bins)
                lines.append(
                    f"| {set_name} | {lang} | {label} | "
                    + " | ".join(cells)
                    + f" | {'–' if math.isnan(ratio) else f'{ratio:.2f}'} |"
                )
    return "\n".join(lines) + "\n"


def bias_by_time_table(summary: dict[str, Any]) -> str:
    """Markdown: per set (all languages), the model's mean signed error pred − ref in each time bin (ms)."""
    lines = ["| set | " + " | ".join(TIME_BIN_LABELS) + " |", "|---|" + "---|" * len(TIME_BIN_LABELS)]
    for set_name, langs in summary["model"].items():
        bins = langs["all"].get("by_time", {})
        cells = [f"{bins[k]['bias_ms']:+.1f}" if "bias_ms" in bins.get(k, {}) else "–" for k in TIME_BIN_LABELS]
        lines.append(f"| {set_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _unit_policy_md(counts: dict[str, dict[str, dict[str, int]]] | None) -> str:
    if not counts:
        return ""
    lines = ["", "Word-unit policy (rows per language):", "", "| rows of | language | matched | re-cut | skipped |"]
    lines.append("|---|---|---|---|---|")
    for what, langs in counts.items():
        for lang, c in langs.items():
            lines.append(f"| {what} | {lang} | {c['matched']} | {c['resplit']} | {c['skipped']} |")
    return "\n".join(lines) + "\n"


def plot_aas_by_time(path: Path, summary: dict[str, Any], title: str | None = None) -> Path | None:
    """``aas_by_time.png``: per set, bars of the model's and the energy baseline's AAS in each time bin (all
    languages), a line per language when there are several; ``None`` when no set has a scored boundary.

    Why a picture: error that grows with the word's time in the clip is the signature of an aligner that has
    not learnt absolute time, and it is invisible in the overall AAS of short clips.
    """
    sets = [name for name, langs in summary["model"].items() if langs["all"].get("by_time")]
    if not sets:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 2.8 * len(sets) + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(sets), 1, squeeze=False)[:, 0]
    x = list(range(len(TIME_BIN_LABELS)))
    for ax, set_name in zip(axes, sets, strict=True):
        langs = summary["model"][set_name]
        for k, (label, source) in enumerate(
            (("model", summary["model"]), ("energy baseline", summary["energy_baseline"]))
        ):
            bins = source[set_name]["all"]["by_time"]
            values = [bins[b]["aas_ms"] if b in bins else 0.0 for b in TIME_BIN_LABELS]
            bars = ax.bar(
                [i + (k - 0.5) * 0.38 for i in x], values, width=0.36, label=label, alpha=0.85 if k == 0 else 0.5
            )
            for bar, b in zip(bars, TIME_BIN_LABELS, strict=True):
                if b in bins:
                    ax.annotate(
                        f"{bins[b]['aas_ms']:.0f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        textcoords="offset points",
                        xytext=(0, 2),
                        ha="center",
                        fontsize=7,
                    )
        if len(langs) > 2:
            for lang, scores in langs.items():
                if lang == "all":
                    continue
                bins = scores["by_time"]
                pts = [(i, bins[b]["aas_ms"]) for i, b in enumerate(TIME_BIN_LABELS) if b in bins]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, linewidth=1, label=f"model, {lang}")
        counts = langs["all"]["by_time"]
        ax.set_xticks(
            x, [f"{b}\n(n={counts[b]['boundaries']})" if b in counts else b for b in TIME_BIN_LABELS], fontsize=8
        )
        ax.set_ylabel(f"{set_name}: AAS (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xlabel("reference boundary's time in the clip")
    axes[0].set_title(f"AAS by time in the clip{': ' + title if title else ''}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png", bbox_inches="tight")
    return path


def _utterance_aas_ms(pred: Sequence[tuple[float, float]], ref: Sequence[tuple[float, float]]) -> float:
    """Mean |pred - ref| over the starts and ends of one utterance, in ms (the AAS of that utterance)."""
    errors = boundary_errors_ms(pred, ref)
    return float(errors.mean()) if errors.size else float("nan")


def _metric_bin(label: str) -> str:
    """``"0-1 s"`` -> ``"0to1s"``, ``">30 s"`` -> ``"over30s"`` (logger-safe metric name parts)."""
    return label.replace(" ", "").replace("-", "to").replace(">", "over")


def alignment_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``val/<set>/aas_ms``, ``val/<set>/within_{20,50,100}ms`` (all languages), per language AAS, baseline,
    ``val/<set>/aas_ms_<bin>`` per time bin (``0to1s`` ... ``over30s``) and ``val/<set>/aas_time_ratio``
    (worst bin / first second)."""
    metrics: dict[str, float] = {}
    for set_name, langs in summary["model"].items():
        overall = langs["all"]
        metrics[f"val/{set_name}/aas_ms"] = float(overall["aas_ms"])
        for key in ("within_20ms", "within_50ms", "within_100ms"):
            metrics[f"val/{set_name}/{key}"] = float(overall[key])
        metrics[f"val/{set_name}/baseline_aas_ms"] = float(summary["energy_baseline"][set_name]["all"]["aas_ms"])
        for label, scores in overall.get("by_time", {}).items():
            metrics[f"val/{set_name}/aas_ms_{_metric_bin(label)}"] = float(scores["aas_ms"])
        ratio = time_drift_ratio(overall.get("by_time", {}))
        if not math.isnan(ratio):
            metrics[f"val/{set_name}/aas_time_ratio"] = ratio
        for lang, scores in langs.items():
            if lang != "all" and len(langs) > 2:
                metrics[f"val/{set_name}/{lang}/aas_ms"] = float(scores["aas_ms"])
    return metrics


class AlignmentEvaluator:
    """The evaluation hook's evaluator for aligners (see :class:`qwen3asr_train.eval.hook.Evaluator`)."""

    def __init__(
        self,
        processor: Qwen3ASRProcessor,
        sets: dict[str, list[Sample]],
        max_batch_seconds: float = 240.0,
        max_batch_size: int = 32,
        unit_report: UnitPolicyReport | None = None,
        decode: str = "argmax",
        refine_seconds: float = 0.0,
        chain: ChainSettings | None = None,
    ) -> None:
        """``sets`` should have passed the word-unit policy (:func:`~qwen3asr_train.data.aligner.usable_samples`)
        with its counts in ``unit_report``. Rows whose words still differ from the aligner's units (a caller
        that kept the original rows of re-cut ones) are re-cut here, and skipped when that is impossible,
        counted in ``unit_report`` (a new one when none is given) so nothing stops the evaluation."""
        self.processor = processor
        self.unit_report = unit_report if unit_report is not None else UnitPolicyReport()
        self.sets = {
            name: usable_samples(samples, "skip", f"eval:{name}", units="resplit", report=self.unit_report)
            if unit_report is None
            else usable_samples(samples, "skip", f"eval:{name}", units="resplit")
            for name, samples in sets.items()
        }
        self.max_batch_seconds = max_batch_seconds
        self.max_batch_size = max_batch_size
        self.decode = decode
        self.refine_seconds = refine_seconds
        self.chain = chain
        self.title: str | None = None

    @classmethod
    def from_decode_config(
        cls,
        processor: Qwen3ASRProcessor,
        sets: dict[str, list[Sample]],
        decode: DecodeConfig,
        unit_report: UnitPolicyReport | None = None,
    ) -> AlignmentEvaluator:
        """The evaluator with the batching, slot decoding and long-clip pass of ``decode`` (``recipe.decode`` of
        ``recipe=eval``, ``evaluation.decode`` of the training hook)."""
        return cls(
            processor,
            sets,
            decode.max_batch_seconds,
            decode.max_batch_size,
            unit_report=unit_report,
            decode=decode.align_decode,
            refine_seconds=decode.align_refine_seconds,
            chain=ChainSettings.from_decode(decode),
        )

    def evaluate(self, model: torch.nn.Module, out_dir: Path, write: bool) -> dict[str, float]:
        predictions = {
            name: align(
                model,
                self.processor,
                samples,
                self.max_batch_seconds,
                self.max_batch_size,
                chunk_long=True,
                decode=self.decode,
                refine_seconds=self.refine_seconds,
                chain=self.chain,
            )
            for name, samples in self.sets.items()
        }
        if not write:
            return {}
        stats, baseline = AlignmentStats(), AlignmentStats()
        for name, samples in self.sets.items():
            score_alignments(name, samples, predictions[name], stats, baseline)
        summary = write_alignment_reports(
            out_dir, self.sets, predictions, stats, baseline, title=self.title, unit_report=self.unit_report
        )
        return alignment_metrics(summary)
