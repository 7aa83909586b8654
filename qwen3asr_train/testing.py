"""Test factories shipped with the package (as lhotse does): small audio files and manifests.

Why in the package: downstream users and our own tests need the same quick, offline fixtures.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu one two three four five six seven"
).split()


def write_clip(path: Path, seconds: float, seed: int, rate: int = 16000, channels: int = 1) -> Path:
    """A clip of tone bursts in noise (not speech; exercises decoding, resampling and features)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    wav = 0.05 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t)
    data = np.stack([wav] * channels, axis=1) if channels > 1 else wav
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data.astype(np.float32), rate, subtype="PCM_16")
    return path


def write_manifest(
    directory: str | Path,
    num: int = 8,
    seed: int = 0,
    min_seconds: float = 0.6,
    max_seconds: float = 2.5,
    language: str = "English",
    shape: str = "structured",
    name: str = "train.jsonl",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``num`` clips and a manifest (``structured`` or upstream ``text``-prefixed rows)."""
    directory = Path(directory)
    rng = random.Random(seed)
    rows = []
    for i in range(num):
        seconds = round(rng.uniform(min_seconds, max_seconds), 3)
        wav = write_clip(directory / "wavs" / f"{Path(name).stem}-{i:04d}.wav", seconds, seed * 1000 + i)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        if shape == "upstream":
            row: dict[str, Any] = {"audio": str(wav), "text": f"language {language}<asr_text>{text}"}
        else:
            row = {
                "id": f"{Path(name).stem}-{i:04d}",
                "audio": str(wav),
                "text": text,
                "language": language,
                "duration": seconds,
            }
        row.update(extra or {})
        rows.append(row)
    path = directory / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
