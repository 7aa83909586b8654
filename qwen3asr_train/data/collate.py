"""SFT batches: prompt/target token ids built by position, audio features, and labels.

Batch schema (one micro-batch; ``B`` rows, ``L`` tokens, ``T`` mel frames, a multiple of 100)::

    input_ids             (B, L)      long   prompt + target, audio pad expanded, padded with the pad id
    attention_mask        (B, L)      long   1 on real tokens
    labels                (B, L)      long   target ids at target positions, -100 on prompt/audio/padding
                                             (aligned with input_ids; the loss shifts by one)
    input_features        (B, 128, T) float  log-mel (per-utterance max normalisation, as upstream)
    input_features_mask   (B, T)      long   1 on valid frames
    num_target_tokens     int                labelled tokens in this micro-batch
    window_target_tokens  int                labelled tokens in the whole accumulation window
    position              (epoch, micro index within the rank's epoch)

Why build ids by position: the prompt is tokenised alone (exactly what inference feeds the model), the
target alone (how the model must write it), and the labels are the target's positions by construction.
This cannot mask the wrong tokens when rows are padded on either side — the upstream recipe's
prefix-length mask does under its processor's default left padding.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import Qwen3ASRProcessor

from qwen3asr_train.config.schema import SFTAugmentation
from qwen3asr_train.data.audio import SAMPLE_RATE, audio_tokens_for_frames
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import Utterance
from qwen3asr_train.data.prompts import AUDIO_PAD, asr_prompt, asr_target
from qwen3asr_train.data.sampler import Window
from qwen3asr_train.languages import CER_LANGUAGES
from qwen3asr_train.tools.segment import NO_SPACE_LANGUAGES

if TYPE_CHECKING:
    from qwen3asr_train.data.transforms import Augmenter

IGNORE_INDEX = -100

MEL_CHUNK_FRAMES = 100
"""Mel frames per encoder chunk (2 × ``n_window`` = 100 in every released Qwen3-ASR model): the convolutions
run on whole chunks, the last one of a clip zero-padded."""


@dataclass
class SFTOptions(SFTAugmentation):
    """The recipe's augmentation probabilities (declared once, in ``SFTAugmentation``), the seed their draws
    derive from, and the padding side."""

    padding_side: str = "right"
    seed: int = 0

    @classmethod
    def from_recipe(cls, recipe: SFTAugmentation, seed: int) -> SFTOptions:
        """The options of a recipe config (every ``SFTAugmentation`` field copied)."""
        return cls(**{f.name: getattr(recipe, f.name) for f in fields(SFTAugmentation)}, seed=seed)


@dataclass(frozen=True)
class RowPlan:
    """What one row becomes: its context, whether the language is forced, its target, and (streaming cut) the
    number of audio samples kept (``None``: the whole clip)."""

    context: str
    forced_language: bool
    no_speech: bool
    language: str | None
    text: str
    cut_samples: int | None = None


@dataclass(frozen=True)
class StreamingCut:
    """A streaming-enhancement sample: the audio ends at ``chunks`` × the chunk length; ``text`` is the words
    that end at or before that point."""

    chunks: int
    seconds: float
    text: str


def streaming_cut(utt: Utterance, chunk_seconds: float, rng: random.Random) -> StreamingCut | None:
    """Cut ``utt`` at a chunk boundary drawn uniformly from those strictly inside the clip.

    Why: a streaming decoder re-decodes a growing prefix of the audio every chunk (``eval/streaming.py``), so
    the model must learn to transcribe audio that stops mid-utterance — and to write only what it has heard.
    The target is the words whose end time is at or before the cut, joined as the language writes words
    (without spaces in Chinese, Cantonese, Japanese and Thai). ``None`` for a row without word times or too
    short to have a boundary inside it (it stays whole); the draw is one ``randint`` from ``rng``.
    """
    if not utt.words:
        return None
    boundaries = math.ceil(utt.duration / chunk_seconds - 1e-9) - 1  # k × chunk < duration for k = 1..boundaries
    if boundaries < 1:
        return None
    k = rng.randint(1, boundaries)
    seconds = k * chunk_seconds
    words = [w.word for w in utt.words if w.end <= seconds + 1e-9]
    return StreamingCut(k, seconds, ("" if utt.language in NO_SPACE_LANGUAGES else " ").join(words))


def pad_rows(
    rows: Sequence[tuple[list[int], list[int]]], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, attention_mask)``, each ``(B, L)``, from per-row ids and aligned labels.

    Rows are placed at the right (``side="left"``, the generation convention) or left end of the padded
    length; labels move with their tokens, so a label mask can never shift by the padding.
    """
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    attention = torch.zeros((len(rows), length), dtype=torch.long)  # (B, L)
    for i, (ids, labs) in enumerate(rows):
        if len(ids) != len(labs):
            raise ValueError(f"row {i}: {len(ids)} ids but {len(labs)} labels")
        start = length - len(ids) if side == "left" else 0
        input_ids[i, start : start + len(ids)] = torch.tensor(ids)
        labels[i, start : start + len(ids)] = torch.tensor(labs)
        attention[i, start : start + len(ids)] = 1
    return input_ids, labels, attention


def mel_features(
    feature_extractor: Any, audios: Sequence[np.ndarray], augment: Any, epoch: int, indices: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Log-mel features of a batch, right-padded with their mask (``attention_mask``), SpecAugment applied when
    an augmenter is given (its draws keyed by epoch and row index). Padding and truncation as upstream calls it."""
    feats = feature_extractor(
        list(audios),
        sampling_rate=SAMPLE_RATE,
        padding=True,
        truncation=False,
        return_attention_mask=True,
        return_tensors="pt",
    )
    if augment is not None:
        feats["input_features"] = augment.features(feats["input_features"], feats["attention_mask"], epoch, indices)
    return feats


def model_inputs(
    input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor, feats: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """The batch keys every collator gives the model and the loss normaliser (``num_target_tokens``: labelled
    positions, what the window collator sums per optimizer step), and the counts the throughput metrics use
    (plain ints computed here on the CPU, so logging them costs no device sync): ``num_real_tokens`` (decoder
    tokens that are not padding), ``num_audio_tokens`` (encoder output tokens), ``num_audio_chunks`` (the
    100-frame chunks the encoder's convolutions run on)."""
    frames = feats["attention_mask"].sum(-1).tolist()
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "input_features": feats["input_features"],
        "input_features_mask": feats["attention_mask"].long(),
        "num_target_tokens": int((labels != IGNORE_INDEX).sum()),
        "num_real_tokens": int(attention.sum()),
        "num_audio_tokens": sum(audio_tokens_for_frames(int(f)) for f in frames),
        "num_audio_chunks": sum(-(-int(f) // MEL_CHUNK_FRAMES) for f in frames),
    }


def row_rng(seed: int, epoch: int, index: int, stream: str = "") -> random.Random:
    """Augmentation choices depend only on (seed, epoch, dataset index): resumed runs repeat them exactly.

    ``stream`` names an independent sequence for the same row (e.g. the aligner's time shift beside its
    slot draws), so adding one augmentation does not change the draws of another.
    """
    key = f"{seed}/{epoch}/{index}" + (f"/{stream}" if stream else "")
    return random.Random(zlib.crc32(key.encode()))


def candidate_words(text: str, language: str | None) -> list[str]:
    """Hot-word candidates of a transcript: words of 3+ characters, or 2–4 character spans for CJK."""
    if language in CER_LANGUAGES and " " not in text.strip():
        chars = text.strip()
        return [chars[i : i + n] for n in (2, 3, 4) for i in range(0, max(len(chars) - n + 1, 0), n)]
    return [w.strip(".,!?;:\"'()") for w in text.split() if len(w.strip(".,!?;:\"'()")) >= 3]


class SFTCollator:
    """Turns decoded samples into SFT micro-batches (see the module docstring for the schema)."""

    def __init__(
        self,
        processor: Qwen3ASRProcessor,
        options: SFTOptions,
        distractor_pool: Sequence[str] = (),
        augment: Augmenter | None = None,
    ) -> None:
        """``augment``: the training-audio transforms (``data/transforms.py``); None for clean batches."""
        self.tokenizer = processor.tokenizer
        self.augment = augment
        self.feature_extractor = processor.feature_extractor
        self.options = options
        self.distractors = list(distractor_pool)
        self.audio_pad_id = self.tokenizer.convert_tokens_to_ids(AUDIO_PAD)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None or self.pad_id == self.tokenizer.convert_tokens_to_ids("<|im_end|>"):
            raise ValueError("the tokenizer's pad token must exist and differ from <|im_end|> (the target's end)")

    # ------------------------------------------------------------------ per-row plan
    def plan(self, sample: Sample, epoch: int) -> RowPlan:
        """Decide this row's augmentations from its own RNG (see :func:`row_rng`)."""
        o = self.options
        rng = row_rng(o.seed, epoch, sample.index)
        utt = sample.utt
        no_speech = utt.no_speech or rng.random() < o.no_speech_prob
        language, text = (None, "") if no_speech else (utt.language, utt.text)
        cut = None
        if not no_speech and o.streaming_prob > 0:  # its own stream: the other draws stay as they were
            cut_rng = row_rng(o.seed, epoch, sample.index, "streaming")
            if cut_rng.random() < o.streaming_prob:
                cut = streaming_cut(utt, o.streaming_chunk_seconds, cut_rng)
        if cut is not None:
            text = cut.text
        context = ""
        if utt.context and rng.random() < o.manifest_context_prob:
            context = utt.context
        elif rng.random() < o.context_prob:
            context = self._hotwords(rng, "" if no_speech else text, language)
        forced = language is not None and rng.random() < o.forced_language_prob
        cut_samples = None if cut is None else int(round(cut.seconds * SAMPLE_RATE))
        return RowPlan(context, forced, no_speech, language, text, cut_samples)

    def _hotwords(self, rng: random.Random, text: str, language: str | None) -> str:
        own = candidate_words(text, language)
        hot = rng.sample(own, min(len(own), rng.randint(1, self.options.hotwords_max))) if own else []
        k = rng.randint(0, self.options.distractors_max)
        distract = rng.sample(self.distractors, min(k, len(self.distractors))) if self.distractors else []
        words = [w for w in dict.fromkeys(hot + distract)]
        rng.shuffle(words)
        return ", ".join(words)

    def _audio(self, sample: Sample, plan: RowPlan, epoch: int) -> np.ndarray:
        if plan.cut_samples is not None:
            return sample.audio[: plan.cut_samples]
        if not plan.no_speech or sample.utt.no_speech:
            return sample.audio
        gen = np.random.default_rng(zlib.crc32(f"noise/{self.options.seed}/{epoch}/{sample.index}".encode()))
        level = 10 ** gen.uniform(-4, -1.5)  # from near-silence to audible noise
        return (gen.standard_normal(len(sample.audio)) * level).astype(np.float32)

    # ------------------------------------------------------------------ tokens
    def token_ids(self, plan: RowPlan, n_audio: int) -> tuple[list[int], list[int]]:
        """(prompt ids with the audio pad expanded to ``n_audio``, target ids)."""
        forced_lang = plan.language if plan.forced_language else None
        prompt = self.tokenizer.encode(asr_prompt(plan.context, forced_lang), add_special_tokens=False)
        if prompt.count(self.audio_pad_id) != 1:
            raise ValueError("the context must not contain the audio placeholder token")
        k = prompt.index(self.audio_pad_id)
        prompt = prompt[:k] + [self.audio_pad_id] * n_audio + prompt[k + 1 :]
        target = self.tokenizer.encode(
            asr_target(plan.language, plan.text, plan.forced_language), add_special_tokens=False
        )
        return prompt, target

    def __call__(self, samples: Sequence[Sample], epoch: int = 0) -> dict:
        if not samples:
            raise ValueError("empty micro-batch")
        plans = [self.plan(s, epoch) for s in samples]
        audios = [self._audio(s, p, epoch) for s, p in zip(samples, plans, strict=True)]
        if self.augment is not None:
            audios = [self.augment.waveform(a, epoch, s.index) for a, s in zip(audios, samples, strict=True)]
        feats = mel_features(self.feature_extractor, audios, self.augment, epoch, [s.index for s in samples])
        frames = feats["attention_mask"].sum(-1).tolist()
        rows = [self.token_ids(p, audio_tokens_for_frames(int(f))) for p, f in zip(plans, frames, strict=True)]
        input_ids, labels, attention = pad_rows(
            [(p + t, [IGNORE_INDEX] * len(p) + t) for p, t in rows], self.pad_id, self.options.padding_side
        )
        return {
            **model_inputs(input_ids, attention, labels, feats),
            "audio_seconds": float(sum(len(a) for a in audios) / SAMPLE_RATE),
            "num_no_speech": sum(p.no_speech for p in plans),
            "ids": [s.utt.id for s in samples],
        }


class WindowCollator:
    """Collates a :class:`Window` into its micro-batches and tags each with the window's token count.

    ``collator(samples, epoch)`` builds one micro-batch with ``num_target_tokens`` (SFT: target tokens;
    aligner: timestamp slots).
    """

    def __init__(self, collator: Callable[..., dict]) -> None:
        self.collator = collator

    def __call__(self, item: tuple[Window, list[list[Sample]], int]) -> list[dict]:
        window, micro_samples, skipped = item
        batches = []
        for j, samples in enumerate(micro_samples):
            if not samples:
                raise RuntimeError(
                    f"every utterance of a micro-batch was unreadable (epoch {window.epoch}, micro-batch "
                    f"{window.first_micro + j}); see the warnings above"
                )
            batch = self.collator(samples, window.epoch)
            batch["position"] = (window.epoch, window.first_micro + j)
            batch["skipped_audio"] = skipped if j == 0 else 0
            batches.append(batch)
        total = sum(b["num_target_tokens"] for b in batches)
        for batch in batches:
            batch["window_target_tokens"] = total
            batch["window_size"] = len(batches)
        return batches
