"""Training-audio augmentation shared by the SFT and aligner collators: noise, speed, volume, SpecAugment.

The signal processing is torchaudio's (``functional.add_noise``, ``functional.speed``, ``functional.gain``,
``transforms.FrequencyMasking`` / ``TimeMasking``); this module only decides, per row, what to apply.

Reproducible: every draw comes from :func:`~qwen3asr_train.data.collate.row_rng` keyed by (seed, epoch,
dataset index) and a stream name per transform, so a resumed run repeats them, another epoch draws anew,
and switching one transform on does not change another's draws. torchaudio's masking draws from torch's
global generator; it runs inside ``torch.random.fork_rng`` seeded from the row's stream, so the global
generator (and with it the rest of training) is untouched.

Order on the waveform: speed, then volume, then noise (the SNR is measured against the audio as the model
hears it). SpecAugment runs on the log-mel features of the batch, inside each row's valid frames, with the
row's mean feature value as the mask value (the features are not zero-mean).

Speed perturbation changes tempo and pitch together (resampling, as Kaldi's 3-way perturbation); the
utterance's duration and its word times are divided by the factor. For the aligner, a factor that would make
the clip longer than the time classes address is not applied to that row (the row keeps factor 1).
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchaudio

from qwen3asr_train.config.data import AugmentConfig
from qwen3asr_train.data.audio import SAMPLE_RATE, AudioError, audio_info, load_audio
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import AlignedWord, ManifestError

log = logging.getLogger(__name__)


def _rng(seed: int, epoch: int, index: int, stream: str) -> random.Random:
    """The collators' per-row RNG (imported late: collate.py imports this module)."""
    from qwen3asr_train.data.collate import row_rng

    return row_rng(seed, epoch, index, stream)


@dataclass(frozen=True)
class NoiseClip:
    """One noise segment: file, offset and length in seconds."""

    audio: str
    offset: float
    duration: float


def read_noise_manifests(paths: list[str | Path]) -> list[NoiseClip]:
    """Noise rows (``audio`` + optional ``offset``/``duration``; other fields ignored), headers checked now.

    Why a reader of its own: noise rows need no text or language, and a bad noise file must fail at start
    (naming file and line), not in a DataLoader worker mid-run.
    """
    clips: list[NoiseClip] = []
    for manifest in map(Path, paths):
        if not manifest.is_file():
            raise ManifestError(f"{manifest}: noise manifest not found", "manifest_missing")
        for line_no, raw in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
            if not raw.strip():
                continue
            where = f"{manifest}:{line_no}"
            try:
                row = json.loads(raw)
                audio = Path(row["audio"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ManifestError(f"{where}: noise rows need an 'audio' path ({exc})", "no_audio_field") from None
            path = audio if audio.is_absolute() else manifest.parent / audio
            try:
                frames, rate = audio_info(path)
            except AudioError as exc:
                raise ManifestError(f"{where}: {exc}", "audio_unreadable") from None
            offset = float(row.get("offset") or 0.0)
            duration = float(row.get("duration") or frames / rate - offset)
            if duration <= 0 or offset + duration > frames / rate + 0.02:
                raise ManifestError(
                    f"{where}: segment offset={offset} duration={duration} outside {path}", "bad_segment"
                )
            clips.append(NoiseClip(str(path), offset, duration))
    if not clips:
        raise ManifestError(f"{[str(p) for p in paths]}: no noise rows", "empty_manifest")
    log.info("noise: %d clips, %.2f h", len(clips), sum(c.duration for c in clips) / 3600)
    return clips


class Augmenter:
    """Applies the configured transforms to one row's waveform (and words) and to a batch's features."""

    def __init__(self, cfg: AugmentConfig, seed: int, noise: list[NoiseClip] | None = None) -> None:
        self.cfg = cfg
        self.seed = seed
        self.noise = noise or []
        if cfg.noise_prob > 0 and not self.noise:
            raise ValueError("data.augment.noise_prob > 0 needs noise clips (data.augment.noise_manifests)")
        self.freq_masking = torchaudio.transforms.FrequencyMasking(cfg.freq_mask_width)
        self.time_masking = torchaudio.transforms.TimeMasking(cfg.time_mask_width, p=cfg.time_mask_max_fraction)

    def rng(self, epoch: int, index: int, stream: str) -> random.Random:
        return _rng(self.seed, epoch, index, f"augment/{stream}")

    # ---------------------------------------------------------------- waveform
    def speed_factor(self, epoch: int, index: int) -> float:
        """This row's speed factor (1.0 when not perturbed)."""
        rng = self.rng(epoch, index, "speed")
        if rng.random() >= self.cfg.speed_prob:
            return 1.0
        return rng.choice(list(self.cfg.speed_factors))

    def speed(self, audio: np.ndarray, factor: float) -> np.ndarray:
        """``audio`` played ``factor`` times faster (torchaudio ``functional.speed``; length / factor)."""
        if factor == 1.0:
            return audio
        out, _ = torchaudio.functional.speed(torch.from_numpy(audio)[None], SAMPLE_RATE, factor)
        return out[0].numpy().astype(np.float32, copy=False)

    def volume(self, audio: np.ndarray, epoch: int, index: int) -> np.ndarray:
        rng = self.rng(epoch, index, "volume")
        if rng.random() >= self.cfg.volume_prob:
            return audio
        gain = rng.uniform(*self.cfg.volume_db)
        return torchaudio.functional.gain(torch.from_numpy(audio), gain).numpy().astype(np.float32, copy=False)

    def add_noise(self, audio: np.ndarray, epoch: int, index: int) -> np.ndarray:
        """Noise from a random clip at a random SNR (torchaudio ``functional.add_noise``)."""
        rng = self.rng(epoch, index, "noise")
        if rng.random() >= self.cfg.noise_prob:
            return audio
        clip = self.noise[rng.randrange(len(self.noise))]
        snr = rng.uniform(*self.cfg.snr_db)
        seconds = audio.size / SAMPLE_RATE
        start = clip.offset + rng.uniform(0.0, max(clip.duration - seconds, 0.0))
        noise = load_audio(clip.audio, start, min(seconds, clip.duration), where="noise")
        if noise.size < audio.size:  # a short noise clip repeats
            noise = np.resize(noise, audio.size)
        noise = noise[: audio.size]
        if not np.any(noise) or not np.any(audio):  # silent noise adds nothing; silent audio has no SNR
            return audio
        out = torchaudio.functional.add_noise(
            torch.from_numpy(audio)[None], torch.from_numpy(np.ascontiguousarray(noise))[None], torch.tensor([snr])
        )
        return out[0].numpy().astype(np.float32, copy=False)

    def waveform(self, audio: np.ndarray, epoch: int, index: int, factor: float | None = None) -> np.ndarray:
        """Speed, volume and noise for one row (``factor``: a speed factor already chosen, e.g. by the aligner)."""
        factor = self.speed_factor(epoch, index) if factor is None else factor
        audio = self.speed(audio, factor)
        audio = self.volume(audio, epoch, index)
        return self.add_noise(audio, epoch, index)

    def sample(self, sample: Sample, epoch: int, max_seconds: float | None = None) -> Sample:
        """``sample`` with its waveform augmented, its duration and word times following the speed factor.

        ``max_seconds``: a speed factor that would make the clip longer than this is not applied.
        """
        factor = self.speed_factor(epoch, sample.index)
        if max_seconds is not None and sample.audio.size / SAMPLE_RATE / factor > max_seconds:
            factor = 1.0
        audio = self.waveform(sample.audio, epoch, sample.index, factor)
        if factor == 1.0 and audio is sample.audio:
            return sample
        words = sample.utt.words
        if words is not None and factor != 1.0:
            words = [AlignedWord(w.word, w.start / factor, w.end / factor) for w in words]
        utt = replace(sample.utt, words=words, duration=audio.size / SAMPLE_RATE)
        return Sample(utt, audio, sample.index)

    # ---------------------------------------------------------------- features
    def features(self, feats: torch.Tensor, mask: torch.Tensor, epoch: int, indices: list[int]) -> torch.Tensor:
        """SpecAugment on ``feats`` (B, mel, T) within each row's valid frames (``mask`` (B, T)); a new tensor."""
        if self.cfg.spec_augment_prob <= 0:
            return feats
        out = feats.clone()
        for b, index in enumerate(indices):
            rng = self.rng(epoch, index, "specaugment")
            if rng.random() >= self.cfg.spec_augment_prob:
                continue
            valid = int(mask[b].sum())
            row = out[b, :, :valid]  # (mel, T_valid), a view: masking writes into ``out``
            fill = float(row.mean())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(f"{self.seed}/{epoch}/{index}/specaugment".encode()))
                masked = row[None]
                for _ in range(self.cfg.freq_masks):
                    masked = self.freq_masking(masked, fill)
                for _ in range(self.cfg.time_masks):
                    masked = self.time_masking(masked, fill)
            out[b, :, :valid] = masked[0]
        return out


def build_augmenter(cfg: AugmentConfig, stage: str, seed: int) -> Augmenter | None:
    """The augmenter of a training stage, or None when nothing is switched on for ``stage``."""
    if not cfg.active(stage):
        return None
    noise = read_noise_manifests(cfg.noise_manifests) if cfg.noise_prob > 0 else []
    log.info(
        "augmentation for %s: noise %.2f (SNR %s dB), speed %.2f %s, volume %.2f (%s dB), SpecAugment %.2f",
        stage,
        cfg.noise_prob,
        cfg.snr_db,
        cfg.speed_prob,
        cfg.speed_factors,
        cfg.volume_prob,
        cfg.volume_db,
        cfg.spec_augment_prob,
    )
    return Augmenter(cfg, seed, noise)
