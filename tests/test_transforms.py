"""Augmentation layer (data/transforms.py): noise at the requested SNR (measured), speed perturbation moving
word times (hand computation + where the sound actually moved), reproducibility from (seed, epoch, index),
SpecAugment inside the valid frames, per-stage switch, and bit-identical batches when everything is off."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from qwen3asr_train.config.base import ConfigError
from qwen3asr_train.config.data import AugmentConfig
from qwen3asr_train.data.aligner import AlignerCollator
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.collate import SFTCollator, SFTOptions
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import AlignedWord, Utterance
from qwen3asr_train.data.transforms import Augmenter, build_augmenter, read_noise_manifests
from tests.conftest import make_config, tiny_sft_overrides

NUM_CLASSES = 64


def tone(seconds: float, freq: float = 400.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise_manifest(root: Path, seconds: float = 3.0) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    sf.write(
        str(root / "noise.wav"),
        (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32),
        SAMPLE_RATE,
        subtype="FLOAT",
    )
    path = root / "noise.jsonl"
    path.write_text(json.dumps({"audio": "noise.wav", "no_speech": True, "text": ""}) + "\n")
    return path


def sample(index: int, audio: np.ndarray, words: list[AlignedWord] | None = None, text: str = "alpha bravo") -> Sample:
    utt = Utterance(f"u{index}", "x.wav", audio.size / SAMPLE_RATE, text, "English", words=words, source=f"m:{index}")
    return Sample(utt, audio, index)


# ------------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("snr", [0.0, 7.5, 20.0])
def test_noise_is_added_at_the_requested_snr(tmp_path: Path, snr: float) -> None:
    cfg = AugmentConfig(noise_prob=1.0, noise_manifests=[str(noise_manifest(tmp_path))], snr_db=[snr, snr])
    aug = Augmenter(cfg, seed=0, noise=read_noise_manifests(cfg.noise_manifests))
    clean = tone(1.5)
    noisy = aug.add_noise(clean, epoch=0, index=3)
    added = noisy.astype(np.float64) - clean
    measured = 10 * np.log10(np.sum(clean.astype(np.float64) ** 2) / np.sum(added**2))
    assert measured == pytest.approx(snr, abs=0.01)
    assert np.std(added) > 0 and abs(np.corrcoef(added, clean)[0, 1]) < 0.1  # noise, not a scaled copy


def test_noise_snr_draws_cover_the_range(tmp_path: Path) -> None:
    cfg = AugmentConfig(noise_prob=1.0, noise_manifests=[str(noise_manifest(tmp_path))], snr_db=[5.0, 15.0])
    aug = Augmenter(cfg, seed=0, noise=read_noise_manifests(cfg.noise_manifests))
    clean = tone(0.5)
    snrs = []
    for i in range(30):
        added = aug.add_noise(clean, 0, i).astype(np.float64) - clean
        snrs.append(10 * np.log10(np.sum(clean.astype(np.float64) ** 2) / np.sum(added**2)))
    assert 5.0 - 0.01 <= min(snrs) and max(snrs) <= 15.0 + 0.01 and max(snrs) - min(snrs) > 5


def test_bad_noise_manifest_fails_at_start_naming_the_line(tmp_path: Path) -> None:
    path = noise_manifest(tmp_path)
    path.write_text(path.read_text() + json.dumps({"audio": "gone.wav"}) + "\n")
    with pytest.raises(Exception, match=r"noise.jsonl:2"):
        read_noise_manifests([path])


# ------------------------------------------------------------------------------------------- speed
def test_speed_perturbation_moves_word_times() -> None:
    """Factor 1.1: every time t becomes t / 1.1 (hand computation), and the sound really moved there."""
    audio = np.zeros(2 * SAMPLE_RATE, np.float32)
    burst_at = (0.5, 1.2)  # a loud burst marks the start of each word
    for s in burst_at:
        audio[int(s * SAMPLE_RATE) : int((s + 0.1) * SAMPLE_RATE)] = tone(0.1, 300.0, 0.8)
    words = [AlignedWord("alpha", 0.5, 0.9), AlignedWord("bravo", 1.2, 1.6)]
    aug = Augmenter(AugmentConfig(speed_prob=1.0, speed_factors=[1.1]), seed=0)
    out = aug.sample(sample(0, audio, words), epoch=0)
    expected = [("alpha", 0.5 / 1.1, 0.9 / 1.1), ("bravo", 1.2 / 1.1, 1.6 / 1.1)]
    assert [(w.word, w.start, w.end) for w in out.utt.words] == [
        (w, pytest.approx(s, abs=1e-9), pytest.approx(e, abs=1e-9)) for w, s, e in expected
    ]
    assert out.audio.size == pytest.approx(audio.size / 1.1, abs=2)
    assert out.utt.duration == out.audio.size / SAMPLE_RATE
    # onsets measured in the perturbed audio sit at the moved word starts (within 2 ms)
    loud = np.abs(out.audio) > 0.2
    onsets = [i for i in range(1, loud.size) if loud[i] and not loud[max(0, i - 200) : i].any()]
    assert [o / SAMPLE_RATE for o in onsets] == [pytest.approx(s, abs=0.002) for _, s, _ in expected]
    # and the pitch went up by the factor: 300 Hz -> 330 Hz
    seg = out.audio[onsets[0] : onsets[0] + 1400]
    peak = np.argmax(np.abs(np.fft.rfft(seg, 16 * SAMPLE_RATE))) / 16
    assert peak == pytest.approx(330.0, abs=3.0)


def test_aligner_speed_never_exceeds_the_addressable_length() -> None:
    aug = Augmenter(AugmentConfig(speed_prob=1.0, speed_factors=[0.9]), seed=0)
    s = sample(0, tone(2.0), [AlignedWord("alpha", 0.2, 1.8)])
    assert aug.sample(s, 0, max_seconds=2.1).audio.size == s.audio.size  # 2.22 s would not fit: factor 1
    assert aug.sample(s, 0, max_seconds=5.0).audio.size == pytest.approx(s.audio.size / 0.9, abs=2)


# ------------------------------------------------------------------------------------ reproducibility
def _all_on(tmp_path: Path) -> AugmentConfig:
    return AugmentConfig(
        noise_prob=1.0,
        noise_manifests=[str(noise_manifest(tmp_path))],
        speed_prob=1.0,
        volume_prob=1.0,
        spec_augment_prob=1.0,
    )


def test_reproducible_from_seed_epoch_index(tmp_path: Path, tiny_model_and_processor) -> None:
    _, processor = tiny_model_and_processor
    cfg = _all_on(tmp_path)
    samples = [sample(i, tone(0.8 + 0.3 * i, 200 + 50 * i)) for i in range(3)]

    def batch(seed: int, epoch: int) -> dict:
        torch.manual_seed(1234)
        collator = SFTCollator(processor, SFTOptions(seed=seed), augment=build_augmenter(cfg, "sft", seed))
        return collator(samples, epoch)

    def waves(seed: int, epoch: int) -> list[np.ndarray]:
        aug = build_augmenter(cfg, "sft", seed)
        return [aug.waveform(s.audio, epoch, s.index) for s in samples]

    assert all(np.array_equal(a, b) for a, b in zip(waves(0, 1), waves(0, 1), strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(waves(0, 1), waves(0, 2), strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(waves(0, 1), waves(5, 1), strict=True))
    first, again = batch(0, 1), batch(0, 1)
    assert torch.equal(first["input_features"], again["input_features"])
    assert not torch.equal(first["input_features"], batch(0, 2)["input_features"])
    state = torch.get_rng_state()
    batch(0, 3)
    torch.manual_seed(1234)
    assert torch.equal(state, torch.get_rng_state())  # SpecAugment's draws leave the global RNG alone


def test_spec_augment_masks_only_valid_frames() -> None:
    aug = Augmenter(AugmentConfig(spec_augment_prob=1.0, time_mask_max_fraction=1.0, time_mask_width=20), seed=0)
    feats = torch.randn(2, 128, 300)
    mask = torch.zeros(2, 300, dtype=torch.long)
    mask[0, :300], mask[1, :180] = 1, 1
    out = aug.features(feats, mask, epoch=0, indices=[0, 1])
    assert torch.equal(out[1, :, 180:], feats[1, :, 180:])  # padding untouched
    changed = out != feats  # (B, mel, T)
    assert changed.any()
    for b, valid in ((0, 300), (1, 180)):
        fill = feats[b, :, :valid].mean()
        assert torch.allclose(out[b][changed[b]], fill.expand(int(changed[b].sum())))
        rows = changed[b].any(dim=1)  # masked mel bins (full-width frequency masks) or any time-masked column
        cols = changed[b].all(dim=0)
        assert rows.any() and (cols.sum() <= 2 * 20)


# ------------------------------------------------------------------------------------- switches
def test_off_by_default_gives_bit_identical_batches(tiny_model_and_processor) -> None:
    _, processor = tiny_model_and_processor
    samples = [sample(i, tone(0.6 + 0.25 * i, 250 + 40 * i)) for i in range(3)]
    default = AugmentConfig()
    assert build_augmenter(default, "sft", 0) is None and build_augmenter(default, "aligner", 0) is None
    plain = SFTCollator(processor, SFTOptions(seed=0))(samples, 2)
    zero = SFTCollator(processor, SFTOptions(seed=0), augment=Augmenter(default, 0))(samples, 2)
    assert plain.keys() == zero.keys()
    for key, value in plain.items():
        assert torch.equal(value, zero[key]) if isinstance(value, torch.Tensor) else value == zero[key]


def test_aligner_batches_off_and_on(tmp_path: Path) -> None:
    from qwen3asr_train.config.schema import ModelConfig
    from qwen3asr_train.model.builder import build_model

    _, processor = build_model(ModelConfig(source="tiny", task="aligner", num_labels=NUM_CLASSES), seed=0)
    words = [AlignedWord("alpha", 0.1, 0.5), AlignedWord("bravo", 0.6, 1.0)]
    samples = [sample(i, tone(1.2, 300 + 30 * i), words) for i in range(2)]
    plain = AlignerCollator(processor, NUM_CLASSES, 1.0, 0)(samples, 1)
    zero = AlignerCollator(processor, NUM_CLASSES, 1.0, 0, augment=Augmenter(AugmentConfig(), 0))(samples, 1)
    for key, value in plain.items():
        assert torch.equal(value, zero[key]) if isinstance(value, torch.Tensor) else value == zero[key]
    fast = Augmenter(AugmentConfig(speed_prob=1.0, speed_factors=[1.25]), 0)
    sped = AlignerCollator(processor, NUM_CLASSES, 1.0, 0, augment=fast)(samples, 1)
    assert sped["slotted_words"][0] == [("alpha", 0.1 / 1.25, 0.5 / 1.25), ("bravo", 0.6 / 1.25, 1.0 / 1.25)]
    # labels are the moved times' 80 ms classes: 0.08->1, 0.4->5, 0.48->6, 0.8->10
    assert [c for c in sped["labels"][0].tolist() if c != -100] == [1, 5, 6, 10]


def test_stage_switch_and_config_checks(tmp_path: Path) -> None:
    only_aligner = AugmentConfig(stages=["aligner"], volume_prob=0.5)
    assert not only_aligner.active("sft") and only_aligner.active("aligner")
    assert build_augmenter(only_aligner, "sft", 0) is None
    cfg = make_config(
        [
            "recipe=sft",
            "model=tiny",
            "data.train=x.jsonl",
            f"run_dir={tmp_path}",
            "trainer.max_steps=1",
            "data.augment.speed_prob=0.5",
        ]
    )
    assert cfg.data.augment.speed_prob == 0.5 and cfg.data.augment.noise_prob == 0.0
    with pytest.raises(ConfigError, match="data.augment.noise_manifests"):
        make_config(
            [
                "recipe=sft",
                "model=tiny",
                "data.train=x.jsonl",
                f"run_dir={tmp_path}",
                "trainer.max_steps=1",
                "data.augment.noise_prob=0.5",
            ]
        )
    with pytest.raises(ConfigError, match="data.augment.stages"):
        make_config(
            [
                "recipe=sft",
                "model=tiny",
                "data.train=x.jsonl",
                f"run_dir={tmp_path}",
                "trainer.max_steps=1",
                "data.augment.stages=[asr]",
            ]
        )


def test_sft_trains_with_every_transform_on(manifest_dir: Path, tmp_path: Path) -> None:
    from qwen3asr_train.stages import sft

    noise = noise_manifest(tmp_path / "noise")
    run_dir = tmp_path / "run"
    overrides = tiny_sft_overrides(
        manifest_dir,
        run_dir,
        "trainer.max_steps=2",
        "data.augment.noise_prob=0.5",
        f"data.augment.noise_manifests={noise}",
        "data.augment.speed_prob=0.5",
        "data.augment.volume_prob=0.5",
        "data.augment.spec_augment_prob=0.5",
    )
    sft.run(make_config(overrides))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
