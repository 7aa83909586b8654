"""Audio decoding: any soundfile-readable file (or bytes) -> mono float32 at 16 kHz.

Why soundfile: it bundles libsndfile (wav, flac, ogg, mp3), so decoding needs no system library;
resampling uses torchaudio's windowed-sinc resampler. As upstream (``qwen_asr/inference/utils.py``):
channels are averaged, and a signal whose peak exceeds 1 is divided by its peak.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000
"""The model's input rate."""

DURATION_SLACK_SECONDS = 0.02
"""How far a manifest segment may run past the end of its file (rounded durations); beyond it is an error."""


class AudioError(RuntimeError):
    """Audio that cannot be read; the message names the file (and the manifest line when known)."""


def audio_info(path: str | Path) -> tuple[int, int]:
    """``(frames, sample_rate)`` from the file header (cheap: nothing is decoded)."""
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError for corrupt headers
        raise AudioError(f"{path}: cannot read audio header ({exc})") from exc
    return info.frames, info.samplerate


def load_audio(
    source: str | Path | bytes, offset: float = 0.0, duration: float | None = None, where: str = ""
) -> np.ndarray:
    """Decode ``duration`` seconds from ``offset`` of a file (or encoded bytes) to mono 16 kHz float32.

    Raises:
        AudioError: missing file, undecodable data, or a segment outside the file.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    label = f"{name}{f' ({where})' if where else ''}"
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise AudioError(f"{label}: audio file not found")
    try:
        handle = sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except Exception as exc:
        raise AudioError(f"{label}: cannot decode audio ({exc})") from exc
    with handle:
        rate = handle.samplerate
        start = int(round(offset * rate))
        frames = -1 if duration is None else int(round(duration * rate))
        # manifests round durations (to the millisecond, or a TextGrid's end time): tolerate 20 ms past the end
        slack = int(DURATION_SLACK_SECONDS * rate)
        if start >= handle.frames or (frames > 0 and start + frames > handle.frames + slack):
            raise AudioError(
                f"{label}: segment offset={offset:.3f}s duration={duration}s lies outside the file "
                f"({handle.frames / rate:.3f}s)"
            )
        try:
            handle.seek(start)
            data = handle.read(frames, dtype="float32", always_2d=True)
        except Exception as exc:
            raise AudioError(f"{label}: cannot decode audio ({exc})") from exc
    if data.shape[0] == 0:
        raise AudioError(f"{label}: no samples decoded")
    wav = data.mean(axis=1)
    if not np.all(np.isfinite(wav)):
        raise AudioError(f"{label}: audio contains NaN or infinite samples")
    if rate != SAMPLE_RATE:
        wav = resample(wav, rate)
    peak = float(np.abs(wav).max())
    if peak > 1.0:
        wav = wav / peak
    return np.ascontiguousarray(wav, dtype=np.float32)


def resample(wav: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Windowed-sinc resampling (torchaudio) of a mono signal."""
    out = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(wav)), rate, target)
    return out.numpy()


def audio_tokens_for_frames(frames: int, n_window: int = 50) -> int:
    """Audio tokens the encoder emits for ``frames`` valid mel frames (the transformers count).

    Each full ``2*n_window``-frame chunk (1 s) gives 13 tokens; a partial chunk of r frames gives
    ceil(ceil(ceil(r/2)/2)/2) (three stride-2 convolutions). Count frames from the feature extractor's
    mask, not from the sample count: the mask of a clip depends on how far its batch is padded.
    """
    chunk = 2 * n_window
    tail = frames % chunk
    if tail:
        for _ in range(3):
            tail = (tail - 1) // 2 + 1
    return (frames // chunk) * 13 + tail
