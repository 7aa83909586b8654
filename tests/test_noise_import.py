"""``qwen3asr-data import-noise``: a MUSAN-style folder -> a noise manifest that ``data.augment`` reads.

Checked against the folder the test builds (file lengths it chose), the augmenter's own noise reader, and a
second run (idempotent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3asr_train.data.transforms import read_noise_manifests
from qwen3asr_train.testing import write_clip
from qwen3asr_train.tools.cli import main

REPO = Path(__file__).resolve().parents[1]


def musan(root: Path) -> Path:
    """noise/ (two files), music/ (one 7 s file), speech/ (one file), a README, a corrupt wav, a 0.02 s wav."""
    write_clip(root / "noise" / "free-sound" / "noise-0001.wav", 2.0, seed=1)
    write_clip(root / "noise" / "sound-bible" / "noise-0002.wav", 1.5, seed=2)
    write_clip(root / "music" / "fma" / "music-0001.wav", 7.0, seed=3)
    write_clip(root / "speech" / "librivox" / "speech-0001.wav", 1.0, seed=4)
    write_clip(root / "noise" / "tiny.wav", 0.02, seed=5)
    (root / "noise" / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    (root / "README").write_text("MUSAN", encoding="utf-8")
    return root


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_import_noise_rows_pieces_rejects_and_reader(tmp_path: Path, capsys) -> None:
    folder = musan(tmp_path / "musan")
    out = tmp_path / "noise"
    args = ["import-noise", str(folder), "--exclude", "speech/*", "--max-seconds", "3", "--out-dir", str(out)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["audio_files"], summary["excluded_files"], summary["ignored_files"]) == (6, 1, 1)
    got = rows(out / "manifest.jsonl")
    # sorted paths; the 7 s file in ceil(7 / 3) = 3 equal pieces of 7/3 s
    assert [(r["id"], r.get("offset", 0.0), r["duration"]) for r in got] == [
        ("music/fma/music-0001-0000", 0.0, 2.333),
        ("music/fma/music-0001-0001", 2.333, 2.333),
        ("music/fma/music-0001-0002", 4.667, 2.333),
        ("noise/free-sound/noise-0001", 0.0, 2.0),
        ("noise/sound-bible/noise-0002", 0.0, 1.5),
    ]
    assert all(r["no_speech"] and r["text"] == "" for r in got)
    rejects = {Path(r["file"]).name: r["reason"] for r in rows(out / "rejects.jsonl")}
    assert rejects == {"broken.wav": "audio_unreadable", "tiny.wav": "audio_too_short"}
    # what data.augment reads: every row, headers checked, the pieces inside their file
    clips = read_noise_manifests([out / "manifest.jsonl"])
    assert [(Path(c.audio).name, round(c.offset, 3), round(c.duration, 3)) for c in clips] == [
        ("music-0001.wav", 0.0, 2.333),
        ("music-0001.wav", 2.333, 2.333),
        ("music-0001.wav", 4.667, 2.333),
        ("noise-0001.wav", 0.0, 2.0),
        ("noise-0002.wav", 0.0, 1.5),
    ]
    # idempotent: a second run writes the same bytes
    first = [(out / n).read_bytes() for n in ("manifest.jsonl", "rejects.jsonl")]
    assert main(args) == 0
    capsys.readouterr()
    assert [(out / n).read_bytes() for n in ("manifest.jsonl", "rejects.jsonl")] == first


def test_import_noise_whole_files_and_missing_folder(tmp_path: Path, capsys) -> None:
    folder = musan(tmp_path / "musan")
    out = tmp_path / "all"
    assert main(["import-noise", str(folder), "--out-dir", str(out)]) == 0
    capsys.readouterr()
    got = {r["id"]: r["duration"] for r in rows(out / "manifest.jsonl")}
    assert got == {
        "music/fma/music-0001": 7.0,
        "noise/free-sound/noise-0001": 2.0,
        "noise/sound-bible/noise-0002": 1.5,
        "speech/librivox/speech-0001": 1.0,
    }
    assert main(["import-noise", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "x")]) == 1


def test_import_noise_help_and_shortcut() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "data_tools" / "import_noise.py"), "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert (
        done.stdout.startswith("usage: qwen3asr-data import-noise")
        and "example: qwen3asr-data import-noise" in done.stdout
    )


@pytest.mark.parametrize("max_seconds", [0.0, 2.5])
def test_noise_manifest_feeds_the_augmenter(tmp_path: Path, capsys, max_seconds: float) -> None:
    """The imported manifest drives ``data.augment`` noise: a noisy row differs from the clean one."""
    import numpy as np

    from qwen3asr_train.config.data import AugmentConfig
    from qwen3asr_train.data.transforms import build_augmenter

    folder = musan(tmp_path / "musan")
    out = tmp_path / "noise"
    assert main(["import-noise", str(folder), "--max-seconds", str(max_seconds), "--out-dir", str(out)]) == 0
    capsys.readouterr()
    cfg = AugmentConfig(noise_prob=1.0, noise_manifests=[str(out / "manifest.jsonl")], snr_db=[10.0, 10.0])
    cfg.validate()
    augmenter = build_augmenter(cfg, "sft", seed=0)
    clean = (0.1 * np.sin(np.linspace(0, 200, 16000))).astype(np.float32)
    noisy = augmenter.waveform(clean, 0, 3)
    noise = noisy - clean
    snr = 10 * np.log10(np.sum(clean**2) / np.sum(noise**2))
    assert abs(snr - 10.0) < 0.5
