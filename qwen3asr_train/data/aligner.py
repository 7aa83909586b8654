"""Forced-aligner training data: time classes, word-unit checks, long-form concatenation, and the collator.

Batch schema (one micro-batch; ``B`` rows, ``L`` tokens, ``T`` mel frames, a multiple of 100)::

    input_ids             (B, L)      long   audio slot (pad expanded) + words + <timestamp> slots, padded
    attention_mask        (B, L)      long   1 on real tokens
    labels                (B, L)      long   time class of the slot at <timestamp> positions, -100 elsewhere
                                             (NOT shifted: the slot's own logits predict its class)
    input_features        (B, 128, T) float  log-mel (same feature-extractor call as SFT and inference)
    input_features_mask   (B, T)      long   1 on valid frames
    num_slots             int                labelled slots in this micro-batch (the loss normaliser; also
                                             given as ``num_target_tokens`` for the window collator)
    slotted_words         list[list[tuple[str, float, float]]]  per row, (word, start s, end s) of the
                                             reference words that got slots, in slot order (slot 2k = start,
                                             2k+1 = end of word k) — for evaluation. Plain tuples, not
                                             AlignedWord: Lightning's batch transfer rejects frozen dataclasses
    ids, languages        list[str]          utterance ids and languages (per-language alignment scores)
    audio_seconds         float              unpadded audio in the batch

Why the string is built like inference: the aligner sees ``<|audio_start|><|audio_pad|><|audio_end|>``
followed by the words concatenated *without spaces*, each timed word followed by its start and end
``<timestamp>`` (:func:`qwen3asr_train.data.prompts.aligner_input`). We tokenise that whole string exactly
as the transformers processor does and only then expand the audio pad, so with every word slotted the
ids equal ``processor(text=[aligner_input(words)], audio=...)`` (tested).

Why dynamic slot insertion: the paper trains with slots inserted at random words so that, at inference,
slots can be placed anywhere (every word, every sentence, ...). Each word gets its pair of slots with
probability ``slot_prob``, drawn from an RNG of (seed, epoch, dataset index) so a resumed run repeats the
same draws; evaluation uses ``slot_prob=1.0`` (every word slotted, like inference).
"""

from __future__ import annotations

import json
import logging
import math
import random
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from transformers import Qwen3ASRProcessor

from qwen3asr_train.data.audio import SAMPLE_RATE, audio_tokens_for_frames
from qwen3asr_train.data.collate import IGNORE_INDEX, mel_features, model_inputs, pad_rows, row_rng
from qwen3asr_train.data.dataset import Sample, UtteranceDataset
from qwen3asr_train.data.manifest import AlignedWord, ManifestError, SkipReport, Utterance
from qwen3asr_train.data.prompts import AUDIO_PAD, TIMESTAMP, aligner_input
from qwen3asr_train.data.word_units import clean_token, split_words
from qwen3asr_train.languages import CER_LANGUAGES, FORCED_ALIGNER_LANGUAGES

if TYPE_CHECKING:
    from qwen3asr_train.data.transforms import Augmenter

log = logging.getLogger(__name__)

SEGMENT_MS = 80.0
"""Milliseconds per time class (``timestamp_segment_time`` of the released aligner)."""


LATE_OPEN_KEEP_SECONDS = 0.05
"""A span opened inside its first word (``span_late_prob``) keeps at least this much of that word."""

SHIFT_MARGIN_SECONDS = 0.05
"""A negative time shift keeps at least this much audio before the first word."""


def max_addressable_seconds(num_classes: int, segment_ms: float = SEGMENT_MS) -> float:
    """Longest audio whose times the classes can express (5000 classes x 80 ms = 400 s)."""
    return num_classes * segment_ms / 1000.0


def time_to_class(seconds: float, segment_ms: float = SEGMENT_MS, *, num_classes: int) -> int:
    """The time class of ``seconds``: round-half-up of ``t / segment_ms``, clipped to ``num_classes - 1``.

    Why round (nearest bin) and not floor: decoding maps class ``c`` to ``c x 80 ms`` (upstream ``align``).
    With rounding, class ``c`` holds the times in ``[c x 80 - 40, c x 80 + 40)`` ms, so the decoded value is
    the centre of its bin and the expected |error| of a perfect classifier is 20 ms (the quantisation floor)
    with no bias. With floor, class ``c`` holds ``[c x 80, c x 80 + 80)``: every prediction would be early by
    40 ms on average. Times in the last half bin (or beyond) clip to the last class.
    """
    if seconds < 0:
        raise ValueError(f"negative time {seconds} s")
    ms = round(seconds * 1000.0, 6)  # 0.12 * 1000 = 120.00000000000001: drop float noise before rounding
    return min(math.floor(ms / segment_ms + 0.5), num_classes - 1)


def check_word_units(utt: Utterance, language: str | None = None) -> None:
    """Raise ``ValueError`` unless ``utt.words`` are exactly ``split_words(utt.text, language)``.

    Why: the aligner must be trained on the units inference will cut the same text into; a unit inference
    never produces (``"don't"`` vs ``"dont"``, ``"你好"`` vs ``"你"``, ``"好"``) teaches slots it never sees.
    ``language`` defaults to the utterance's language.
    """
    if utt.words is None:
        raise ValueError(f"{utt.source or utt.id}: utterance {utt.id!r} has no word times ('words')")
    expected = split_words(utt.text, language if language is not None else utt.language)
    got = [w.word for w in utt.words]
    if got != expected:
        first = next(
            (k for k, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected))
        )
        raise ValueError(
            f"{utt.source or utt.id}: word units of {utt.id!r} differ from split_words(text) at unit {first}: "
            f"manifest {got[first : first + 3]} vs text {expected[first : first + 3]} ({len(got)} vs {len(expected)} "
            f"units); re-cut the word times with qwen3asr-data textgrid-to-manifest or fix the transcript"
        )


def _join_texts(text: str, units: list[str], right: Utterance, language: str | None) -> str | None:
    """``text`` (whose units are ``units``) joined with ``right.text`` so that the units concatenate;
    ``None`` when no separator keeps them.

    Character languages are tried without a separator first (a space in Chinese text is unnatural), then
    with one; space-delimited languages only with a space. The check is ``split_words`` on the whole
    joined text, so a Japanese/Korean tokenizer that would merge across the seam is caught.
    """
    assert right.words is not None
    expected = units + [w.word for w in right.words]
    for sep in ("", " ") if language in CER_LANGUAGES else (" ",):
        joined = text.rstrip() + sep + right.text.lstrip()
        if split_words(joined, language) == expected:
            return joined
    return None


def _merge(group: list[Sample], text: str, gap: np.ndarray) -> Sample:
    """One sample from consecutive samples: audio with ``gap`` between pieces, word times shifted."""
    if len(group) == 1:
        return group[0]
    pieces: list[np.ndarray] = []
    words: list[AlignedWord] = []
    offset = 0  # samples before the current piece
    for k, sample in enumerate(group):
        if k:
            pieces.append(gap)
            offset += gap.size
        assert sample.utt.words is not None
        shift = offset / SAMPLE_RATE
        words.extend(AlignedWord(w.word, w.start + shift, w.end + shift) for w in sample.utt.words)
        pieces.append(sample.audio)
        offset += sample.audio.size
    audio = np.concatenate(pieces).astype(np.float32)  # (N,)
    ids = [s.utt.id for s in group]
    dialects = {s.utt.dialect for s in group}
    utt = replace(
        group[0].utt,
        id=f"concat-{zlib.crc32('|'.join(ids).encode()):08x}-{ids[0]}-n{len(ids)}",
        audio="<concatenated>",  # not a file: fails loudly if someone tries to reload it
        duration=audio.size / SAMPLE_RATE,
        text=text,
        words=words,
        offset=0.0,
        context="",
        dialect=dialects.pop() if len(dialects) == 1 else None,
        source=f"concatenation of {len(ids)} utterances ({group[0].utt.source} .. {group[-1].utt.source})",
    )
    return Sample(utt, audio, group[0].index)


def concat_utterances(
    samples: Sequence[Sample],
    max_seconds: float,
    gap_seconds: float = 0.0,
    *,
    num_classes: int,
    segment_ms: float = SEGMENT_MS,
) -> list[Sample]:
    """Greedily concatenate consecutive samples into long-form training items of at most ``max_seconds``.

    Why: the aligner must time words minutes into a clip (upstream aligns chunks of up to 180 s), but
    corpora are mostly short utterances; concatenation makes long inputs with exact word times. A sample
    joins the current group when its language matches, the joined text still splits into the concatenated
    units (see :func:`_join_texts`), and the group's audio (plus ``gap_seconds`` of silence between pieces)
    stays within ``max_seconds``. Concatenation never makes an item exceed ``max_seconds``; an input that
    is already longer is passed through alone (logged). The new sample keeps the first piece's dataset
    index (groups are disjoint, so indices stay unique for the slot RNG) and gets a new id.

    Raises:
        ValueError: an input longer than the classes can address (``num_classes x segment_ms``), or
            ``max_seconds`` itself beyond that, or an input without word times or with mismatching units.
    """
    limit = max_addressable_seconds(num_classes, segment_ms)
    if max_seconds > limit + 1e-3:  # LongFormDataset passes its limit + 1e-6 against float round-off
        raise ValueError(f"max_seconds={max_seconds} exceeds the {limit:g} s that {num_classes} classes address")
    gap = np.zeros(int(round(gap_seconds * SAMPLE_RATE)), dtype=np.float32)
    out: list[Sample] = []
    group: list[Sample] = []
    text, units, length = "", [], 0  # the group's joined text, its units, its samples (gaps included)
    for sample in samples:
        utt = sample.utt
        seconds = sample.audio.size / SAMPLE_RATE
        if seconds > limit:
            raise ValueError(
                f"{utt.source or utt.id}: {seconds:.2f} s of audio exceeds the {limit:g} s that "
                f"{num_classes} time classes of {segment_ms:g} ms can address"
            )
        check_word_units(utt)
        assert utt.words is not None
        if group and utt.language == group[0].utt.language:
            if length + gap.size + sample.audio.size <= max_seconds * SAMPLE_RATE:
                joined = _join_texts(text, units, utt, utt.language)
                if joined is not None:
                    group.append(sample)
                    text, units = joined, units + [w.word for w in utt.words]
                    length += gap.size + sample.audio.size
                    continue
        if group:
            out.append(_merge(group, text, gap))
        if seconds > max_seconds:
            log.warning("%s: %.2f s is longer than max_seconds=%g; kept alone", utt.id, seconds, max_seconds)
        group, text, units, length = [sample], utt.text, [w.word for w in utt.words], sample.audio.size
    if group:
        out.append(_merge(group, text, gap))
    log.debug("concatenated %d utterances into %d items of <= %g s", len(samples), len(out), max_seconds)
    return out


class AlignerCollator:
    """Turns decoded samples with word times into aligner micro-batches (schema in the module docstring)."""

    def __init__(
        self,
        processor: Qwen3ASRProcessor,
        num_classes: int,
        slot_prob: float,
        seed: int,
        segment_ms: float = SEGMENT_MS,
        padding_side: str = "left",
        check_units: bool = True,
        time_shift_seconds: float = 0.0,
        augment: Augmenter | None = None,
        span_prob: float = 0.0,
        span_lead_seconds: float = 0.3,
        span_window_seconds: float = 0.0,
        span_late_prob: float = 0.0,
    ) -> None:
        """``augment``: the training-audio transforms (``data/transforms.py``; speed moves the word times);
        None for clean batches. ``span_prob`` / ``span_lead_seconds`` / ``span_window_seconds`` /
        ``span_late_prob``: the partial-transcript augmentation (:meth:`spanned`)."""
        if not 0.0 <= span_late_prob <= 1.0:
            raise ValueError(f"span_late_prob must be in [0, 1], got {span_late_prob}")
        self.span_late_prob = span_late_prob
        if not 0.0 <= span_prob <= 1.0:
            raise ValueError(f"span_prob must be in [0, 1], got {span_prob}")
        if span_lead_seconds < 0:
            raise ValueError(f"span_lead_seconds must be >= 0, got {span_lead_seconds}")
        if span_window_seconds < 0:
            raise ValueError(f"span_window_seconds must be >= 0, got {span_window_seconds}")
        self.span_prob = span_prob
        self.span_lead_seconds = span_lead_seconds
        self.span_window_seconds = span_window_seconds
        if not 0.0 <= slot_prob <= 1.0:
            raise ValueError(f"slot_prob must be in [0, 1], got {slot_prob}")
        if time_shift_seconds < 0:
            raise ValueError(f"time_shift_seconds must be >= 0, got {time_shift_seconds}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be left|right, got {padding_side!r}")
        self.tokenizer = processor.tokenizer
        self.feature_extractor = processor.feature_extractor
        self.num_classes = num_classes
        self.slot_prob = slot_prob
        self.seed = seed
        self.segment_ms = segment_ms
        self.padding_side = padding_side
        self.check_units = check_units
        self.time_shift_seconds = time_shift_seconds
        self.augment = augment
        self.audio_pad_id = self.tokenizer.convert_tokens_to_ids(AUDIO_PAD)
        self.timestamp_id = self.tokenizer.convert_tokens_to_ids(TIMESTAMP)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None or self.pad_id == self.timestamp_id:
            raise ValueError("the tokenizer needs a pad token distinct from <timestamp>")
        self.max_seconds = max_addressable_seconds(num_classes, segment_ms)

    def slots(self, sample: Sample, epoch: int) -> list[bool]:
        """Which words get their two slots this epoch: each with ``slot_prob``, at least one per sample.

        The draw depends only on (seed, epoch, dataset index), so it changes from epoch to epoch and a
        resumed run repeats it. ``rng.random() < 1.0`` always holds, so ``slot_prob=1`` slots every word.
        """
        n = len(sample.utt.words or [])
        if n == 0:
            raise ValueError(f"{sample.utt.source or sample.utt.id}: no words to align")
        rng = row_rng(self.seed, epoch, sample.index)
        slotted = [rng.random() < self.slot_prob for _ in range(n)]
        if not any(slotted):
            slotted[rng.randrange(n)] = True
        return slotted

    def shifted(self, sample: Sample, epoch: int) -> Sample:
        """``sample`` moved in time by a draw from U(-s, +s), ``s = time_shift_seconds`` (training augmentation).

        Why: a small model otherwise ties each word's bin to where that word sat in the clips it was
        trained on and overfits a small corpus; moving the whole clip makes the absolute time a thing to
        read from the audio. A positive shift prepends that much digital silence; a negative one trims
        leading audio, but never closer than :data:`SHIFT_MARGIN_SECONDS` to the first word's start, so no
        word is cut. Word times move by the applied shift. The draw depends on (seed, epoch, index) only
        (its own RNG stream, independent of the slot draws), so a resumed run repeats it.
        """
        words = sample.utt.words or []
        if self.time_shift_seconds <= 0 or not words:
            return sample
        shift = row_rng(self.seed, epoch, sample.index, "shift").uniform(
            -self.time_shift_seconds, self.time_shift_seconds
        )
        if shift < 0:
            shift = -min(-shift, max(0.0, words[0].start - SHIFT_MARGIN_SECONDS))
        else:  # never past what the classes address
            shift = min(shift, max(0.0, self.max_seconds - sample.audio.size / SAMPLE_RATE - 0.01))
        n = int(round(abs(shift) * SAMPLE_RATE))
        if n == 0:
            return sample
        if shift > 0:
            audio = np.concatenate([np.zeros(n, dtype=sample.audio.dtype), sample.audio])
        else:
            audio = sample.audio[n:]
        delta = (n if shift > 0 else -n) / SAMPLE_RATE
        moved = [AlignedWord(w.word, w.start + delta, w.end + delta) for w in words]  # trim stops before word 0
        utt = replace(sample.utt, words=moved, duration=audio.size / SAMPLE_RATE)
        return Sample(utt, audio, sample.index)

    def spanned(self, sample: Sample, epoch: int) -> Sample:
        """With probability ``span_prob``: only a contiguous run of the words, the audio kept from just before
        the run's first word to the end of the clip (training augmentation).

        Why: chained-window alignment of long recordings (``eval/align_eval.py: chain_align``) feeds the
        aligner a window of audio that starts just before the next unaligned word (up to ``span_lead_seconds``
        earlier, possibly inside the previous word) and goes on past the last word it is given, because where
        the given words end is what the window is for. A model trained on whole transcripts only stretches
        the given words over the untranscribed speech. The run ``[a, b)`` is drawn uniformly (a ≥ 0, b > a,
        not the whole clip); when ``a > 0`` the audio starts ``U(0, span_lead_seconds)`` before word ``a``
        and the word times move with it. The draw has its own RNG stream per (seed, epoch, index).

        ``span_late_prob`` = *q* > 0: this share of the spans that start at a word ``a > 0`` open *inside* it
        instead, ``U(0, span_lead_seconds)`` after its start (keeping at least 50 ms of it); its start label
        is then the window's start (class 0). Why: a chain whose anchor was placed one word late opens its next
        window inside the re-given word; a model that has only seen windows opening before their first word
        maps that word onto the next onset and every later word one onset late, and the chain never recovers
        (docs/aligner.md). With *q* = 0 no draw is made, so runs without it keep their data.

        ``span_window_seconds`` = *W* > 0 also cuts the audio to at most *W* seconds from its start, as a chain
        window of *W* seconds is cut, and keeps only words that end inside it (``b`` drawn among those); a clip
        longer than *W* (a long-form item) is always cut so, whatever ``span_prob``. Why: a chain window cut
        from a long recording holds seconds of untranscribed speech after its words, across utterance and
        speaker changes; spans of short clips have at most the rest of one utterance there, and a model
        trained on those alone places a window's words 4x worse than a short clip's (docs/results.md).
        """
        words = sample.utt.words or []
        total = sample.audio.size / SAMPLE_RATE
        window = self.span_window_seconds
        cut = 0 < window < total and bool(words)  # a row without words is refused by slots(), naming its file
        if (self.span_prob <= 0 or len(words) < 2) and not cut:
            return sample
        rng = row_rng(self.seed, epoch, sample.index, "span")
        if rng.random() >= self.span_prob and not cut:
            return sample
        if not cut:
            while True:
                a = rng.randrange(len(words))
                b = rng.randrange(a + 1, len(words) + 1)
                if (a, b) != (0, len(words)):
                    break
            start = self._span_start(words, a, rng)
            stop = total
        else:
            for _ in range(100):
                a = rng.randrange(len(words))
                start = self._span_start(words, a, rng)
                stop = min(total, start + window)
                fit = 0  # words a, a+1, ... that end inside the window
                while a + fit < len(words) and words[a + fit].end <= stop:
                    fit += 1
                if fit:
                    break
            else:
                raise ValueError(
                    f"{sample.utt.source or sample.utt.id}: no word ends inside a {window:g} s window "
                    "(recipe.span_window_seconds is shorter than its words)"
                )
            b = rng.randrange(a + 1, a + fit + 1)
        n, m = int(round(start * SAMPLE_RATE)), int(round(stop * SAMPLE_RATE))
        delta = n / SAMPLE_RATE
        kept = [AlignedWord(w.word, max(0.0, w.start - delta), max(0.0, w.end - delta)) for w in words[a:b]]
        audio = sample.audio[n:m]
        utt = replace(sample.utt, words=kept, duration=audio.size / SAMPLE_RATE)
        return Sample(utt, audio, sample.index)

    def _span_start(self, words: Sequence[AlignedWord], a: int, rng: random.Random) -> float:
        """Where a span starting at word ``a`` opens (seconds): the clip's start for ``a = 0``; else up to
        ``span_lead_seconds`` before word ``a``, or, with probability ``span_late_prob``, up to that far
        inside it (:meth:`spanned`)."""
        if a == 0:
            return 0.0
        if self.span_late_prob > 0 and rng.random() < self.span_late_prob:
            depth = min(self.span_lead_seconds, words[a].end - words[a].start - LATE_OPEN_KEEP_SECONDS)
            return words[a].start + rng.uniform(0.0, max(0.0, depth))
        return max(0.0, words[a].start - rng.uniform(0.0, self.span_lead_seconds))

    def row(self, sample: Sample, slotted: list[bool], n_audio: int) -> tuple[list[int], list[int], list[AlignedWord]]:
        """(ids with the audio pad expanded to ``n_audio``, labels, the slotted reference words)."""
        words = sample.utt.words or []
        ids = self.tokenizer.encode(aligner_input([w.word for w in words], slotted), add_special_tokens=False)
        if ids.count(self.audio_pad_id) != 1:
            raise ValueError(f"{sample.utt.id}: expected one audio placeholder in the aligner input")
        k = ids.index(self.audio_pad_id)
        ids = ids[:k] + [self.audio_pad_id] * n_audio + ids[k + 1 :]
        timed = [w for w, s in zip(words, slotted, strict=True) if s]
        positions = [i for i, t in enumerate(ids) if t == self.timestamp_id]
        if len(positions) != 2 * len(timed):
            raise ValueError(f"{sample.utt.id}: {len(positions)} <timestamp> tokens for {len(timed)} slotted words")
        labels = [IGNORE_INDEX] * len(ids)
        for j, pos in enumerate(positions):  # slot 2k = start of word k, 2k+1 = its end
            word = timed[j // 2]
            labels[pos] = time_to_class(
                word.end if j % 2 else word.start, self.segment_ms, num_classes=self.num_classes
            )
        return ids, labels, timed

    def __call__(self, samples: Sequence[Sample], epoch: int = 0) -> dict:
        if not samples:
            raise ValueError("empty micro-batch")
        samples = [self.shifted(s, epoch) for s in samples]
        if self.augment is not None:
            samples = [self.augment.sample(s, epoch, self.max_seconds) for s in samples]
        for s in samples:
            if s.audio.size / SAMPLE_RATE > self.max_seconds:
                raise ValueError(
                    f"{s.utt.source or s.utt.id}: {s.audio.size / SAMPLE_RATE:.2f} s exceeds the {self.max_seconds:g} s "
                    f"that {self.num_classes} classes address"
                )
            if self.check_units:
                check_word_units(s.utt)
        # after the unit check: a span's words are a slice of checked units (its text is not re-cut)
        samples = [self.spanned(s, epoch) for s in samples]
        feats = mel_features(
            self.feature_extractor, [s.audio for s in samples], self.augment, epoch, [s.index for s in samples]
        )
        frames = feats["attention_mask"].sum(-1).tolist()  # (B,) valid mel frames
        rows = [
            self.row(s, self.slots(s, epoch), audio_tokens_for_frames(int(f)))
            for s, f in zip(samples, frames, strict=True)
        ]
        input_ids, labels, attention = pad_rows(
            [(ids, labs) for ids, labs, _ in rows], self.pad_id, self.padding_side
        )  # each (B, L)
        return {
            **model_inputs(input_ids, attention, labels, feats),  # num_target_tokens = slots: the loss normaliser
            "num_slots": int((labels != IGNORE_INDEX).sum()),
            "slotted_words": [[(w.word, w.start, w.end) for w in timed] for _, _, timed in rows],
            "ids": [s.utt.id for s in samples],
            "languages": [s.utt.language for s in samples],
            "audio_seconds": float(sum(s.audio.size for s in samples) / SAMPLE_RATE),
        }


class LongFormDataset(UtteranceDataset):
    """The utterances themselves, followed by groups of consecutive same-language utterances concatenated.

    A group item is decoded by loading its pieces and joining them with
    :func:`~qwen3asr_train.data.aligner.concat_utterances`; its duration (for batching) is known up front.
    """

    def __init__(
        self,
        base: UtteranceDataset,
        max_seconds: float,
        gap_seconds: float,
        num_classes: int,
        fraction: float = 1.0,
        window_seconds: float = 0.0,
    ) -> None:
        """``fraction`` keeps that share of the joined groups, evenly spread over the corpus (group ``g`` is
        kept when ``floor((g + 1) f) > floor(g f)``): fewer long items make a step cheaper and leave more of
        each batch to the short clips, while every absolute time up to ``max_seconds`` is still trained.
        ``window_seconds`` > 0: the collator cuts every item to a window of at most that length
        (``recipe.span_window_seconds``, :meth:`AlignerCollator.spanned`), so :meth:`durations` reports at
        most that much: the batch sampler fills batches with what the model will see, not the joined length."""
        if window_seconds < 0:
            raise ValueError(f"window_seconds must be >= 0, got {window_seconds}")
        self.window_seconds = window_seconds
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"long-form fraction must be in (0, 1], got {fraction}")
        super().__init__(base.utterances, base.on_bad_audio, base.hf_dataset, base.hf_audio_column)
        self.base = base
        self.max_seconds = max_seconds
        self.gap_seconds = gap_seconds
        self.num_classes = num_classes
        self.groups: list[list[int]] = []
        current: list[int] = []
        seconds = 0.0
        text, units = "", []  # the group's joined text and its units (the join rule of concat_utterances)
        for i, utt in enumerate(base.utterances):
            fits = current and utt.language == base.utterances[current[-1]].language
            if fits and seconds + gap_seconds + utt.duration <= max_seconds and utt.words is not None:
                joined = _join_texts(text, units, utt, utt.language)
                if joined is not None:  # a tokenizer (nagisa, soynlp) that merges across the seam ends the group
                    current.append(i)
                    seconds += gap_seconds + utt.duration
                    text, units = joined, units + [w.word for w in utt.words]
                    continue
            if len(current) > 1:
                self.groups.append(current)
            current, seconds = [i], utt.duration
            text, units = utt.text, [w.word for w in utt.words or []]
        if len(current) > 1:
            self.groups.append(current)
        formed = len(self.groups)
        if fraction < 1.0:
            self.groups = [
                g for k, g in enumerate(self.groups) if math.floor((k + 1) * fraction) > math.floor(k * fraction)
            ]
        log.info(
            "long-form training: %d concatenated items of up to %.0f s (%d formed, fraction %g)",
            len(self.groups),
            max_seconds,
            formed,
            fraction,
        )

    def __len__(self) -> int:
        return len(self.base) + len(self.groups)

    def durations(self) -> list[float]:
        joined = [
            sum(self.base.utterances[j].duration for j in g) + self.gap_seconds * (len(g) - 1) for g in self.groups
        ]
        every = self.base.durations() + joined
        return [min(d, self.window_seconds) for d in every] if self.window_seconds > 0 else every

    def load(self, index: int) -> Sample | None:
        if index < len(self.base):
            return self.base.load(index)
        pieces = [self.base.load(j) for j in self.groups[index - len(self.base)]]
        if any(p is None for p in pieces):
            return None
        merged = concat_utterances(pieces, self.max_seconds + 1e-6, self.gap_seconds, num_classes=self.num_classes)
        if len(merged) != 1:  # decoded lengths a little over the manifest durations: keep the longest part
            log.warning("long-form group %d split into %d items when decoded; using the longest", index, len(merged))
            merged = [max(merged, key=lambda m: m.audio.size)]
        return Sample(merged[0].utt, merged[0].audio, index)


def slot_class_counts(dataset: UtteranceDataset, num_classes: int, segment_ms: float = SEGMENT_MS) -> np.ndarray:
    """``(num_classes,)`` slot labels per time class in one epoch of ``dataset`` with every word slotted.

    Why: the slot-time prior of the training data is steep (short clips dominate: a class late in a 30 s item
    gets ~10x fewer labels than an early one), and logit adjustment (``recipe.slot_prior_tau``) divides it out.
    Counted from the manifest times without decoding audio: a :class:`LongFormDataset`'s joined item offsets
    each piece by the manifest durations of the pieces before it plus the gaps (the decoded audio may differ by
    a few ms, well inside a class).
    """
    counts = np.zeros(num_classes, dtype=np.int64)

    def add(words: Sequence[AlignedWord] | None, shift: float) -> None:
        for w in words or []:
            for t in (w.start, w.end):
                counts[time_to_class(t + shift, segment_ms, num_classes=num_classes)] += 1

    utterances = dataset.base.utterances if isinstance(dataset, LongFormDataset) else dataset.utterances
    for utt in utterances:
        add(utt.words, 0.0)
    if isinstance(dataset, LongFormDataset):
        for group in dataset.groups:
            shift = 0.0
            for j in group:
                add(utterances[j].words, shift)
                shift += utterances[j].duration + dataset.gap_seconds
    return counts


UNIT_POLICIES = ("resplit", "skip", "strict")
"""What happens to a row whose word times are not cut into the aligner's word units (``recipe.on_unit_mismatch``):

- ``resplit`` (default): re-cut the times into the aligner's units when every unit boundary is also a
  boundary of the manifest's words (units made by merging whole words, or by dropping punctuation: the
  times stay exact); otherwise the row is skipped. Every outcome is counted per language.
- ``skip``: every mismatching row is skipped (counted per language).
- ``strict`` (alias ``error``): the first mismatching row raises, naming its file and line.
"""


@dataclass
class UnitPolicyReport:
    """Per-language counts of what the word-unit policy did: ``matched`` (units already right), ``resplit``
    (times re-cut exactly), ``skipped`` (dropped), per ``what`` (``train``, ``eval:<set>``...).

    Why per language: Japanese and Korean are cut by tokenizers (nagisa, soynlp) that MFA or a TTS front end
    do not follow, so mismatches concentrate in those languages; a run that silently drops half of its
    Japanese rows looks fine in the overall numbers. Written as ``unit_policy.json`` next to the results.
    """

    counts: dict[str, dict[str, Counter]] = field(default_factory=dict)

    def add(self, what: str, language: str | None, outcome: str) -> None:
        self.counts.setdefault(what, {}).setdefault(language or "None", Counter())[outcome] += 1

    def as_dict(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{what: {language: {"matched": n, "resplit": n, "skipped": n}}}`` (all three keys always present)."""
        return {
            what: {
                lang: {k: int(c.get(k, 0)) for k in ("matched", "resplit", "skipped")}
                for lang, c in sorted(langs.items())
            }
            for what, langs in self.counts.items()
        }

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def log(self, what: str) -> None:
        for lang, c in sorted(self.counts.get(what, {}).items()):
            if c.get("resplit", 0) or c.get("skipped", 0):
                log.warning(
                    "%s, %s: word units of %d rows re-cut to the aligner's units, %d rows skipped, %d already right",
                    what,
                    lang,
                    c.get("resplit", 0),
                    c.get("skipped", 0),
                    c.get("matched", 0),
                )


def _normalise_unit_policy(units: str) -> str:
    units = "strict" if units == "error" else units
    if units not in UNIT_POLICIES:
        raise ValueError(f"word-unit policy must be one of {UNIT_POLICIES} (or 'error' = strict), got {units!r}")
    return units


def resplit_words(utt: Utterance, language: str | None = None) -> list[AlignedWord] | None:
    """``utt.words`` re-cut into ``split_words(utt.text)`` units with exact times, or ``None`` when impossible.

    The manifest's words are cleaned like the aligner cleans units (punctuation, symbols dropped) and their
    characters compared with the units' characters. When both spell the same character sequence and every
    unit starts and ends on a manifest word's boundary, a unit's span runs from its first word's start to
    its last word's end (``well - known`` -> ``wellknown``; ``東京 都`` -> ``東京都``). A unit that would start
    or end *inside* a manifest word (``東京都`` -> ``東京``, ``都``) has no measured time: ``None``, and the caller
    skips the row rather than invent one. Manifest words that clean to nothing are dropped.
    """
    if utt.words is None:
        return None
    units = split_words(utt.text, language if language is not None else utt.language)
    pieces = [(clean_token(w.word), w) for w in utt.words]
    pieces = [(c, w) for c, w in pieces if c]
    if "".join(c for c, _ in pieces) != "".join(units):
        return None
    out: list[AlignedWord] = []
    k = 0  # next manifest piece
    for unit in units:
        taken, start, end = "", None, None
        while len(taken) < len(unit) and k < len(pieces):
            chars, word = pieces[k]
            taken += chars
            start = word.start if start is None else start
            end = word.end
            k += 1
        if taken != unit or start is None or end is None:  # the unit ends inside a manifest word
            return None
        out.append(AlignedWord(unit, start, end))
    return out if k == len(pieces) else None


def usable_for_alignment(
    items: Sequence[Utterance],
    policy: str,
    what: str,
    rejects: SkipReport | None = None,
    *,
    units: str = "resplit",
    report: UnitPolicyReport | None = None,
) -> list[Utterance]:
    """Utterances whose word times are in the aligner's word units, after the word-unit policy.

    ``policy`` (``error`` | ``skip``, the data's ``on_bad_row``) governs rows that cannot be aligned at all
    (no-speech rows, rows without word times). ``units`` (:data:`UNIT_POLICIES`) governs rows whose words
    differ from ``split_words(text)``: re-cut (returned with the re-cut words), skipped, or raised. Skipped
    rows are counted in ``rejects`` (reason ``unit_mismatch``, tagged with ``what``) and every outcome per
    language in ``report``; a warning line per language says what happened. By default nothing stops the run.

    Raises:
        ManifestError: ``policy="error"`` and a row without words, or ``units="strict"`` and a mismatching
            row (the message names ``file:line``).
    """
    units = _normalise_unit_policy(units)
    report = report if report is not None else UnitPolicyReport()
    kept, skipped = [], SkipReport()
    for utt in items:
        if utt.language is None or utt.words is None:
            message = (
                f"{utt.source}: no-speech rows have no words to align"
                if utt.language is None
                else f"{utt.source or utt.id}: utterance {utt.id!r} has no word times ('words')"
            )
            reason = "no_speech" if utt.language is None else "no_words"
            if policy == "error":
                raise ManifestError(message, reason)
            skipped.add(reason, message, utt.source)
            continue
        try:
            check_word_units(utt)
        except ValueError as exc:
            if units == "strict":
                raise ManifestError(f"{exc} (recipe.on_unit_mismatch=strict)", "unit_mismatch") from None
            words = resplit_words(utt) if units == "resplit" else None
            if words is None:
                skipped.add("unit_mismatch", f"{exc} [{utt.language}]", utt.source)
                report.add(what, utt.language, "skipped")
                continue
            report.add(what, utt.language, "resplit")
            kept.append(replace(utt, words=words))
            continue
        report.add(what, utt.language, "matched")
        kept.append(utt)
    skipped.log(what)
    report.log(what)
    if rejects is not None:
        rejects.extend(skipped, what)
    outside = sorted({u.language for u in kept} - set(FORCED_ALIGNER_LANGUAGES) - {None})
    if outside:
        log.warning("languages outside the released aligner's 11: %s (training a new language)", outside)
    return kept


def usable_samples(
    samples: Sequence[Sample],
    policy: str,
    what: str,
    rejects: SkipReport | None = None,
    *,
    units: str = "resplit",
    report: UnitPolicyReport | None = None,
) -> list[Sample]:
    """:func:`usable_for_alignment` for decoded samples (evaluation sets): re-cut rows keep their audio."""
    kept = usable_for_alignment(
        [s.utt for s in samples], policy, what, rejects, units=units, report=report
    )  # same order, subset
    by_id = {u.id: u for u in kept}
    return [Sample(by_id[s.utt.id], s.audio, s.index) for s in samples if s.utt.id in by_id]
