"""Forced-aligner evaluation: slot decoding, accumulated average shift (AAS), writers, and model-free baselines.

Decoding is upstream's (``qwen_asr`` ``align`` = transformers ``decode_forced_alignment``): argmax class at
each ``<timestamp>`` slot, times ``segment_ms``, then the monotonic repair ``_fix_timestamps`` (imported
from transformers, not copied, so a fix there reaches us). Scores follow the paper: AAS = mean
|pred - ref| in ms over all boundaries (every slotted word's start and end).

Why baselines live here: on clean, silence-padded synthetic speech, spreading the words over the region
where the energy is high already scores ~80 ms (learnability.md). An aligner number means something only
next to :func:`energy_baseline` and :func:`uniform_baseline` on the same set.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.models.qwen3_asr.processing_qwen3_asr import _fix_timestamps

from qwen3asr_train.config.recipes import ALIGN_DECODE_METHODS
from qwen3asr_train.data.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

Span = tuple[float, float]
"""``(start, end)`` of one word in seconds."""

THRESHOLDS_MS: tuple[float, ...] = (20.0, 50.0, 100.0)

TIME_BINS_S: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0, float("inf"))
"""Edges of the AAS-by-time bins (seconds into the clip of the *reference* boundary): 0-1, 1-2, 2-5, 5-10,
10-30, >30 s. Why: an aligner that has not learnt absolute time is accurate early in a clip and drifts later;
the overall AAS of short clips hides that, the per-bin AAS shows it."""


def time_bin_label(lo: float, hi: float) -> str:
    """``"0-1 s"``, ..., ``">30 s"`` for the bin ``[lo, hi)``."""
    return f">{lo:g} s" if hi == float("inf") else f"{lo:g}-{hi:g} s"


TIME_BIN_LABELS: tuple[str, ...] = tuple(
    time_bin_label(a, b) for a, b in zip(TIME_BINS_S[:-1], TIME_BINS_S[1:], strict=True)
)


DECODE_METHODS: tuple[str, ...] = ALIGN_DECODE_METHODS
"""Slot decoders: ``argmax`` is upstream's (argmax class per slot, then its monotonic repair); ``monotonic``
is the most probable non-decreasing class sequence under the slots' softmax (:func:`monotonic_classes`);
``centroid`` is ``argmax`` with each slot moved to the probability-weighted mean of its argmax bin and the two
bins beside it (:func:`centroid_refine`)."""

CENTROID_HALF_WIDTH = 1
"""``centroid`` decoding averages over the argmax bin and this many bins on each side."""


def centroid_refine(probs: np.ndarray, ms: np.ndarray, segment_ms: float) -> np.ndarray:
    """Slot times (ms) moved inside their bin neighbourhood to the probability-weighted mean bin.

    Why: upstream's decoding returns whole 80 ms bins, so even a perfect bin choice is off by 20 ms on average
    (a uniform error of +-40 ms). Where the model splits its probability between two neighbouring bins, the
    weighted mean of the argmax bin and its neighbours says where between them the boundary lies. Only slots
    that the monotonic repair left on their own argmax are moved (a repaired slot has no mass of its own there),
    and the result is made non-decreasing again, so word order holds.

    Args:
        probs: ``(S, C)`` softmax of the slots' logits.
        ms: ``(S,)`` the ``argmax`` decoding's times in ms (after the repair).
        segment_ms: milliseconds per class.
    """
    out = np.asarray(ms, dtype=np.float64).copy()
    n_classes = probs.shape[1]
    arg = probs.argmax(-1)
    for s, value in enumerate(out):
        c = int(arg[s])
        if abs(value - c * segment_ms) > 1e-6:  # moved by the repair: keep it
            continue
        lo, hi = max(0, c - CENTROID_HALF_WIDTH), min(n_classes, c + CENTROID_HALF_WIDTH + 1)
        weights = probs[s, lo:hi]
        out[s] = float((weights * np.arange(lo, hi)).sum() / weights.sum()) * segment_ms
    return np.maximum.accumulate(out)


def monotonic_classes(log_probs: np.ndarray) -> np.ndarray:
    """``(S,)`` classes ``c_1 <= ... <= c_S`` maximising ``sum_s log_probs[s, c_s]`` (exact dynamic programme).

    Why: upstream takes each slot's argmax and then repairs order violations (longest increasing subsequence
    + interpolation), which uses one number per slot. On long clips the slot distributions of a small aligner
    are often multi-modal (the same word sound earlier or later in the clip); the joint maximum under the
    order constraint picks, for every slot, the mode that agrees with its neighbours. O(S x C) time.

    Args:
        log_probs: ``(S, C)`` per-slot log-probabilities (log-softmax of the logits at the slots).
    """
    scores = np.asarray(log_probs, dtype=np.float64)
    n_slots, n_classes = scores.shape
    if n_slots == 0:
        return np.zeros(0, dtype=np.int64)
    best = scores[0].copy()  # (C,) best total of slots 0..s with slot s in class c
    back = np.zeros((n_slots, n_classes), dtype=np.int64)  # argmax over c' <= c of the previous row
    index = np.arange(n_classes)
    for s in range(1, n_slots):
        run_arg = np.maximum.accumulate(np.where(best == np.maximum.accumulate(best), index, 0))  # (C,)
        back[s] = run_arg
        best = scores[s] + best[run_arg]
    out = np.zeros(n_slots, dtype=np.int64)
    out[-1] = int(np.argmax(best))
    for s in range(n_slots - 1, 0, -1):
        out[s - 1] = back[s, out[s]]
    return out


def decode_slots(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    timestamp_token_id: int,
    segment_ms: float = 80.0,
    method: str = "argmax",
) -> list[list[float]]:
    """Seconds at each ``<timestamp>`` slot of each row, in slot order.

    Args:
        logits: ``(B, L, C)`` token-classification logits.
        input_ids: ``(B, L)`` the ids the logits were computed from (any padding side).
        timestamp_token_id: id of ``<timestamp>`` (read it from the tokenizer or ``model.config``).
        segment_ms: milliseconds per class.
        method: ``argmax`` (upstream's decoding, after its monotonic repair), ``monotonic``
            (:func:`monotonic_classes`) or ``centroid`` (:func:`centroid_refine`); see :data:`DECODE_METHODS`.

    Returns the values rounded to the millisecond as upstream does (``round(ms / 1000, 3)``); a row without
    slots gives ``[]`` (``_fix_timestamps`` itself fails on an empty row).
    """
    if method not in DECODE_METHODS:
        raise ValueError(f"unknown slot decoding {method!r}; expected one of {DECODE_METHODS}")
    out: list[list[float]] = []
    for row in range(logits.shape[0]):
        slot_logits = logits[row][input_ids[row] == timestamp_token_id]  # (S, C)
        if slot_logits.shape[0] == 0:
            out.append([])
            continue
        if method in ("argmax", "centroid"):
            ms = (slot_logits.argmax(-1).float() * segment_ms).cpu().numpy()  # (S,)
            fixed = np.asarray(_fix_timestamps(ms), dtype=np.float64)
            if method == "centroid":
                probs = torch.softmax(slot_logits.double(), dim=-1).cpu().numpy()
                fixed = centroid_refine(probs, fixed, segment_ms)
            out.append([round(float(v) / 1000.0, 3) for v in fixed])
        else:
            log_probs = torch.log_softmax(slot_logits.double(), dim=-1).cpu().numpy()  # (S, C)
            out.append([round(float(c) * segment_ms / 1000.0, 3) for c in monotonic_classes(log_probs)])
    return out


def slots_to_spans(seconds: Sequence[float]) -> list[Span]:
    """Pair slot values as (start, end) per word: slot 2k is word k's start, 2k+1 its end."""
    if len(seconds) % 2:
        raise ValueError(f"odd number of slots ({len(seconds)})")
    return [(seconds[i], seconds[i + 1]) for i in range(0, len(seconds), 2)]


def boundary_errors_ms(pred: Sequence[Span], ref: Sequence[Span]) -> np.ndarray:
    """``(2W,)`` |pred - ref| in ms over every start and end (rounded to 1e-6 ms so 50 ms stays 50 ms)."""
    if len(pred) != len(ref):
        raise ValueError(f"{len(pred)} predicted spans for {len(ref)} reference spans")
    diff = np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(ref, dtype=np.float64)).reshape(-1) * 1000.0
    return np.round(diff, 6)


@dataclass
class _Group:
    errors: list[np.ndarray] = field(default_factory=list)
    times: list[np.ndarray] = field(default_factory=list)  # reference time (s) of each boundary in ``errors``
    signed: list[np.ndarray] = field(default_factory=list)  # pred - ref (ms) of each boundary in ``errors``
    words: int = 0
    utterances: int = 0


@dataclass
class AlignmentStats:
    """Accumulates boundary errors per (set, language) and keeps per-utterance records.

    ``summary()`` gives, per set and language (and ``"all"`` languages of a set, micro-averaged):
    ``aas_ms`` (mean |pred - ref|), ``median_ms``, ``within_{X}ms`` (share of boundaries with error <= X),
    the counts, and ``by_time``: ``{bin label: {"aas_ms", "boundaries"}}`` over :data:`TIME_BINS_S` by the
    reference boundary's time in the clip (bins without boundaries are left out), each bin also with
    ``bias_ms``, the mean *signed* error pred − ref (and ``bias_ms`` over the whole set). Why the sign: an
    aligner that has not learnt absolute time tends to place late words too early (toward the times it saw
    most), which |error| alone cannot tell from scatter. Errors are kept (24 bytes per boundary with their
    times and signs) so medians and bins are exact.
    """

    thresholds_ms: tuple[float, ...] = THRESHOLDS_MS
    records: list[dict[str, Any]] = field(default_factory=list)
    _groups: dict[tuple[str, str], _Group] = field(default_factory=lambda: defaultdict(_Group))

    def add(
        self,
        utt_id: str,
        words: Sequence[str],
        pred: Sequence[Span],
        ref: Sequence[Span],
        set_name: str = "eval",
        language: str | None = None,
    ) -> float:
        """Score one utterance; returns its AAS in ms."""
        if len(words) != len(pred):
            raise ValueError(f"{utt_id}: {len(words)} words for {len(pred)} predicted spans")
        errors = boundary_errors_ms(pred, ref)  # (2W,)
        group = self._groups[(set_name, language or "None")]
        group.errors.append(errors)
        group.times.append(np.asarray(ref, dtype=np.float64).reshape(-1))
        group.signed.append(signed_errors_ms(pred, ref))
        group.words += len(words)
        group.utterances += 1
        aas = float(errors.mean()) if errors.size else 0.0
        self.records.append(
            {
                "id": utt_id,
                "set": set_name,
                "language": language,
                "aas_ms": round(aas, 3),
                "words": [
                    {"word": w, "start": p[0], "end": p[1], "ref_start": r[0], "ref_end": r[1]}
                    for w, p, r in zip(words, pred, ref, strict=True)
                ],
            }
        )
        return aas

    def _scores(self, groups: Sequence[_Group]) -> dict[str, float | int]:
        errors = np.concatenate([e for g in groups for e in g.errors]) if groups else np.zeros(0)
        scores: dict[str, float | int] = {
            "aas_ms": float(errors.mean()) if errors.size else float("nan"),
            "median_ms": float(np.median(errors)) if errors.size else float("nan"),
        }
        for x in self.thresholds_ms:
            scores[f"within_{x:g}ms"] = float((errors <= x).mean()) if errors.size else float("nan")
        scores.update(
            boundaries=int(errors.size),
            words=sum(g.words for g in groups),
            utterances=sum(g.utterances for g in groups),
        )
        times = np.concatenate([t for g in groups for t in g.times]) if groups else np.zeros(0)
        signed = np.concatenate([d for g in groups for d in g.signed]) if groups else np.zeros(0)
        scores["bias_ms"] = float(signed.mean()) if signed.size else float("nan")
        scores["by_time"] = by_time(errors, times, signed)
        return scores

    def summary(self) -> dict[str, dict[str, dict[str, float | int]]]:
        """``{set: {language | "all": scores}}`` (see the class docstring)."""
        out: dict[str, dict[str, dict[str, float | int]]] = {}
        for set_name in sorted({s for s, _ in self._groups}):
            langs = sorted(lang for s, lang in self._groups if s == set_name)
            out[set_name] = {lang: self._scores([self._groups[(set_name, lang)]]) for lang in langs}
            out[set_name]["all"] = self._scores([self._groups[(set_name, lang)] for lang in langs])
        return out


def signed_errors_ms(pred: Sequence[Span], ref: Sequence[Span]) -> np.ndarray:
    """``(2W,)`` pred - ref in ms over every start and end (negative: placed too early)."""
    if len(pred) != len(ref):
        raise ValueError(f"{len(pred)} predicted spans for {len(ref)} reference spans")
    diff = (np.asarray(pred, dtype=np.float64) - np.asarray(ref, dtype=np.float64)).reshape(-1) * 1000.0
    return np.round(diff, 6)


def by_time(
    errors_ms: np.ndarray, times_s: np.ndarray, signed_ms: np.ndarray | None = None
) -> dict[str, dict[str, float | int]]:
    """AAS per :data:`TIME_BINS_S` bin of the boundaries' reference times: ``{label: {"aas_ms", "boundaries"}}``,
    non-empty bins only, in time order; with ``signed_ms`` (pred - ref) also each bin's ``bias_ms``."""
    out: dict[str, dict[str, float | int]] = {}
    for label, lo, hi in zip(TIME_BIN_LABELS, TIME_BINS_S[:-1], TIME_BINS_S[1:], strict=True):
        inside = (times_s >= lo) & (times_s < hi)
        if inside.any():
            out[label] = {"aas_ms": float(errors_ms[inside].mean()), "boundaries": int(inside.sum())}
            if signed_ms is not None:
                out[label]["bias_ms"] = float(signed_ms[inside].mean())
    return out


def time_drift_ratio(bins: dict[str, dict[str, float | int]]) -> float:
    """Worst bin's AAS over the first bin's (``0-1 s``): 1.0 = flat over the clip; ``nan`` without a first bin."""
    first = bins.get(TIME_BIN_LABELS[0])
    if not first or not first["aas_ms"]:
        return float("nan")
    return max(float(b["aas_ms"]) for b in bins.values()) / float(first["aas_ms"])


# --------------------------------------------------------------------------------------------- writers


def write_alignments_json(path: str | Path, stats: AlignmentStats) -> Path:
    """``{"summary": ..., "utterances": [per-utterance records]}`` as UTF-8 JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"summary": stats.summary(), "utterances": stats.records}
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def _tier_entries(words: Sequence[str], spans: Sequence[Span], min_ms: float = 1.0) -> list[tuple[float, float, str]]:
    """Intervals Praat accepts: no empty or overlapping ones.

    Why the nudge: the aligner often puts a short word's start and end in the same 80 ms bin (zero length),
    and reference times may overlap by a millisecond; Praat (and praatio) reject both. An empty interval is
    widened to ``min_ms`` and later starts are pushed past earlier ends. The JSON keeps the exact values.
    """
    entries = []
    last_end = 0.0
    for word, (start, end) in zip(words, spans, strict=True):
        start = max(start, last_end)
        end = max(end, start + min_ms / 1000.0)
        entries.append((start, end, word))
        last_end = end
    return entries


def write_textgrid(
    path: str | Path,
    words: Sequence[str],
    pred: Sequence[Span],
    duration: float,
    ref: Sequence[Span] | None = None,
) -> Path:
    """A Praat TextGrid with a ``words`` interval tier (predicted) and, if given, a ``reference`` tier."""
    from praatio import textgrid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tiers = [("words", _tier_entries(words, pred))]
    if ref is not None:
        tiers.append(("reference", _tier_entries(words, ref)))
    end = max([duration] + [e for _, entries in tiers for _, e, _ in entries])
    grid = textgrid.Textgrid()
    for name, entries in tiers:
        grid.addTier(textgrid.IntervalTier(name, entries, 0.0, end))
    grid.save(str(path), format="long_textgrid", includeBlankSpaces=True)
    return path


def _spread(words: Sequence[str], start: float, end: float) -> list[Span]:
    """Contiguous spans over [start, end], each proportional to its word's character count."""
    weights = np.array([max(len(w), 1) for w in words], dtype=np.float64)
    edges = start + (end - start) * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
    return [(float(edges[i]), float(edges[i + 1])) for i in range(len(words))]


def uniform_baseline(audio: np.ndarray, words: Sequence[str], sample_rate: int = SAMPLE_RATE) -> list[Span]:
    """Words spread over the whole clip in proportion to their character counts (no model, no signal)."""
    return _spread(words, 0.0, len(audio) / sample_rate) if words else []


def _frame_db(
    audio: np.ndarray, sample_rate: int, frame_ms: float, hop_ms: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(starts, db, frame)``: each frame's first sample, its energy in dB, and the frame length in samples."""
    frame, hop = int(sample_rate * frame_ms / 1000), int(sample_rate * hop_ms / 1000)
    starts = np.arange(0, len(audio) - frame + 1, hop)  # (F,)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(audio, np.float64), frame)[starts]  # (F, frame)
    return starts, 10 * np.log10(np.mean(windows**2, axis=1) + 1e-12), frame


def _active_frames(db: np.ndarray, rel_db: float) -> np.ndarray | None:
    """Boolean ``(F,)`` frames above the speech threshold; ``None`` for digital silence.

    The threshold is ``rel_db`` below the loudest frame, but at least 6 dB above the noise floor (10th
    percentile frame) when the clip is noisy, so steady noise is not taken for speech.
    """
    peak, floor = float(db.max()), float(np.percentile(db, 10))
    if peak < -100:  # digital silence
        return None
    threshold = min(max(peak + rel_db, floor + 6.0), peak - 6.0)
    return db > threshold


def speech_region(
    audio: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    frame_ms: float = 25.0,
    hop_ms: float = 10.0,
    rel_db: float = -40.0,
) -> Span | None:
    """``(first, last)`` centre (s) of the frames whose energy is above the threshold (:func:`_active_frames`);
    ``None`` for silence."""
    if len(audio) < int(sample_rate * frame_ms / 1000):
        return None
    starts, db, frame = _frame_db(audio, sample_rate, frame_ms, hop_ms)
    active = _active_frames(db, rel_db)
    if active is None:
        return None
    idx = np.flatnonzero(active)
    centre = frame / 2  # an onset lies somewhere in the first active frame: its centre is the unbiased guess
    return float((starts[idx[0]] + centre) / sample_rate), float((starts[idx[-1]] + centre) / sample_rate)


def find_pauses(
    audio: np.ndarray,
    min_pause_s: float = 0.1,
    sample_rate: int = SAMPLE_RATE,
    frame_ms: float = 25.0,
    hop_ms: float = 10.0,
    rel_db: float = -40.0,
) -> list[Span]:
    """``(start, end)`` seconds of every run of sub-threshold frames of at least ``min_pause_s`` between the
    first and the last speech frame (the threshold of :func:`speech_region`), in time order.

    Why: cutting a long recording inside a pause never cuts a word; the refinement pass of the aligner's
    evaluation and transcription (``align(refine_seconds=...)``) cuts only there.
    """
    if len(audio) < int(sample_rate * frame_ms / 1000):
        return []
    starts, db, frame = _frame_db(audio, sample_rate, frame_ms, hop_ms)
    active = _active_frames(db, rel_db)
    if active is None:
        return []
    idx = np.flatnonzero(active)
    centres = (starts + frame / 2) / sample_rate  # (F,)
    out: list[Span] = []
    run_start: int | None = None
    for f in range(int(idx[0]), int(idx[-1]) + 1):
        if not active[f] and run_start is None:
            run_start = f
        elif active[f] and run_start is not None:
            a, b = float(centres[run_start]), float(centres[f - 1])
            if b - a + hop_ms / 1000 >= min_pause_s:
                out.append((a, b))
            run_start = None
    return out


def energy_baseline(audio: np.ndarray, words: Sequence[str], sample_rate: int = SAMPLE_RATE) -> list[Span]:
    """Words spread over the energy-detected speech region by character count (whole clip if none)."""
    if not words:
        return []
    region = speech_region(audio, sample_rate)
    if region is None:
        return uniform_baseline(audio, words, sample_rate)
    return _spread(words, *region)
