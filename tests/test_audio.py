"""Audio decoding against independent references: numpy for channel means and slices, the FFT for
resampled tones, and the transformers processor for the audio-token count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from qwen3asr_train.data.audio import SAMPLE_RATE, AudioError, audio_info, audio_tokens_for_frames, load_audio
from qwen3asr_train.data.dataset import UtteranceDataset, WindowDataset
from qwen3asr_train.data.manifest import Utterance
from qwen3asr_train.data.sampler import Window


def write_float_wav(path: Path, data: np.ndarray, rate: int) -> Path:
    """A 32-bit float WAV: stores the samples exactly (and may exceed [-1, 1])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data.astype(np.float32), rate, subtype="FLOAT")
    return path


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, rate: int, seed: int = 0, scale: float = 0.2) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(int(round(seconds * rate)))).astype(np.float32)


def peak_frequency(wav: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1.0 / rate)[np.argmax(spectrum)])


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("channels", [2, 3])
def test_multichannel_is_averaged_to_mono(tmp_path: Path, channels: int):
    rng = np.random.default_rng(channels)
    data = (0.3 * rng.standard_normal((16000, channels))).astype(np.float32)
    data[:, 0] += 0.2  # make the channels clearly different
    path = write_float_wav(tmp_path / "multi.wav", data, SAMPLE_RATE)
    out = load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    np.testing.assert_allclose(out, data.mean(axis=1), rtol=0, atol=1e-6)


def test_16k_mono_is_returned_unchanged(tmp_path: Path):
    data = noise(1.3, SAMPLE_RATE, seed=1)
    out = load_audio(write_float_wav(tmp_path / "a.wav", data, SAMPLE_RATE))
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, data)


def test_pcm16_decodes_to_float_in_unit_range(tmp_path: Path):
    data = tone(300, 0.5, SAMPLE_RATE, amplitude=0.8)
    path = tmp_path / "pcm.wav"
    sf.write(str(path), data, SAMPLE_RATE, subtype="PCM_16")
    out = load_audio(path)
    np.testing.assert_allclose(out, data, atol=1.0 / 32768)


@pytest.mark.parametrize("rate", [44100, 8000, 22050, 48000])
def test_resampled_to_16k_keeps_length_and_pitch(tmp_path: Path, rate: int):
    seconds = 1.5
    path = write_float_wav(tmp_path / f"tone{rate}.wav", tone(440.0, seconds, rate), rate)
    out = load_audio(path)
    assert out.dtype == np.float32
    assert abs(len(out) - seconds * SAMPLE_RATE) <= 1
    assert peak_frequency(out) == pytest.approx(440.0, abs=1.0)  # FFT bin width here is 0.67 Hz
    # the amplitude survives too (away from the filter's edge transients)
    assert np.abs(out[500:-500]).max() == pytest.approx(0.5, abs=0.01)


def test_stereo_at_44k_is_averaged_then_resampled(tmp_path: Path):
    rate = 44100
    left, right = tone(440.0, 1.0, rate, 0.4), tone(1000.0, 1.0, rate, 0.2)
    out = load_audio(write_float_wav(tmp_path / "st.wav", np.stack([left, right], axis=1), rate))
    assert abs(len(out) - SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(out))
    freqs = np.fft.rfftfreq(len(out), 1.0 / SAMPLE_RATE)
    top_two = sorted(freqs[np.argsort(spectrum)[-2:]])
    assert top_two == pytest.approx([440.0, 1000.0], abs=1.0)


def test_segment_equals_slice_of_full_decode(tmp_path: Path):
    path = write_float_wav(tmp_path / "a.wav", noise(2.0, SAMPLE_RATE, seed=2), SAMPLE_RATE)
    full = load_audio(path)
    np.testing.assert_array_equal(load_audio(path, offset=0.5, duration=0.75), full[8000:20000])
    np.testing.assert_array_equal(load_audio(path, offset=1.25), full[20000:])
    np.testing.assert_array_equal(load_audio(path, offset=0.0, duration=2.0), full)


def test_segment_of_resampled_file_matches_full_decode_inside(tmp_path: Path):
    rate = 44100
    path = write_float_wav(tmp_path / "a.wav", tone(440, 2.0, rate) + noise(2.0, rate, seed=3, scale=0.05), rate)
    full = load_audio(path)
    seg = load_audio(path, offset=0.5, duration=0.75)
    assert len(seg) == 12000
    # resampling a segment only differs from slicing the full decode within the filter's reach of its edges
    np.testing.assert_allclose(seg[100:-100], full[8000 + 100 : 20000 - 100], atol=1e-5)


def test_segment_outside_the_file_is_an_error(tmp_path: Path):
    path = write_float_wav(tmp_path / "a.wav", noise(1.0, SAMPLE_RATE), SAMPLE_RATE)
    for offset, duration in [(1.5, None), (0.5, 1.0)]:
        with pytest.raises(AudioError, match="outside the file") as info:
            load_audio(path, offset=offset, duration=duration)
        assert str(path) in str(info.value)


def test_peak_above_one_is_normalised(tmp_path: Path):
    data = tone(300, 0.5, SAMPLE_RATE, amplitude=1.0)
    data[1234] = 2.5
    out = load_audio(write_float_wav(tmp_path / "loud.wav", data, SAMPLE_RATE))
    assert np.abs(out).max() == pytest.approx(1.0)
    np.testing.assert_allclose(out, data / 2.5, rtol=1e-6)


def test_peak_at_most_one_is_not_rescaled(tmp_path: Path):
    data = tone(300, 0.5, SAMPLE_RATE, amplitude=0.25)
    np.testing.assert_array_equal(load_audio(write_float_wav(tmp_path / "q.wav", data, SAMPLE_RATE)), data)


def test_bytes_input_decodes_like_the_file(tmp_path: Path):
    path = write_float_wav(tmp_path / "a.wav", tone(440, 1.0, 22050), 22050)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), load_audio(path))
    with pytest.raises(AudioError, match="<bytes>"):
        load_audio(b"RIFF garbage")


def test_flac_decodes(tmp_path: Path):
    data = tone(440, 1.0, SAMPLE_RATE)
    path = tmp_path / "a.flac"
    sf.write(str(path), data, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    np.testing.assert_allclose(load_audio(path), data, atol=1.0 / 32768)


def test_audio_info_reads_the_header(tmp_path: Path):
    path = write_float_wav(tmp_path / "a.wav", noise(0.5, 22050), 22050)
    assert audio_info(path) == (11025, 22050)


# --------------------------------------------------------------------------- bad audio


def _random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    return path


def _truncated_header(path: Path) -> Path:
    sf.write(str(path), noise(1.0, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:20])
    return path


@pytest.mark.parametrize("make", [_random_bytes, _truncated_header], ids=["random_bytes", "truncated_header"])
def test_corrupt_file_raises_audio_error_naming_the_file(tmp_path: Path, make):
    path = make(tmp_path / "corrupt.wav")
    with pytest.raises(AudioError) as info:
        load_audio(path, where="manifest m.jsonl:7")
    assert str(path) in str(info.value)
    assert "m.jsonl:7" in str(info.value)
    with pytest.raises(AudioError) as info:
        audio_info(path)
    assert str(path) in str(info.value)


def test_missing_file_raises_audio_error_naming_the_file(tmp_path: Path):
    path = tmp_path / "absent.wav"
    with pytest.raises(AudioError) as info:
        load_audio(path, where="manifest m.jsonl:3")
    assert str(path) in str(info.value)
    assert "m.jsonl:3" in str(info.value)


def test_missing_file_message_says_not_found(tmp_path: Path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "absent.wav")


def test_nonfinite_samples_are_an_error(tmp_path: Path):
    data = noise(0.2, SAMPLE_RATE)
    data[10] = np.nan
    path = write_float_wav(tmp_path / "nan.wav", data, SAMPLE_RATE)
    with pytest.raises(AudioError, match="NaN") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def _utt(audio: Path, duration: float, i: int) -> Utterance:
    return Utterance(
        id=f"u{i}", audio=str(audio), duration=duration, text="x", language="English", source=f"m.jsonl:{i + 1}"
    )


def test_dataset_bad_audio_policy(tmp_path: Path, caplog):
    good = write_float_wav(tmp_path / "good.wav", noise(0.5, 8000), 8000)
    corrupt = _random_bytes(tmp_path / "corrupt.wav")
    utts = [_utt(good, 0.5, 0), _utt(corrupt, 1.0, 1), _utt(tmp_path / "gone.wav", 1.0, 2)]

    skipping = UtteranceDataset(utts, on_bad_audio="skip")
    sample = skipping.load(0)
    assert sample is not None and sample.index == 0 and sample.utt is utts[0]
    assert len(sample.audio) == 8000
    with caplog.at_level("WARNING", logger="qwen3asr_train.data.dataset"):
        assert skipping.load(1) is None
        assert skipping.load(2) is None
    assert "u1" in caplog.text and "m.jsonl:2" in caplog.text

    strict = UtteranceDataset(utts, on_bad_audio="error")
    assert strict.load(0) is not None
    with pytest.raises(AudioError) as info:
        strict.load(1)
    assert str(corrupt) in str(info.value) and "m.jsonl:2" in str(info.value)
    with pytest.raises(AudioError, match="gone.wav"):
        strict.load(2)


def test_dataset_loads_the_manifest_segment(tmp_path: Path):
    data = noise(2.0, SAMPLE_RATE, seed=5)
    path = write_float_wav(tmp_path / "a.wav", data, SAMPLE_RATE)
    utt = Utterance(id="s", audio=str(path), duration=0.5, offset=1.0, text="x", language="English")
    np.testing.assert_array_equal(UtteranceDataset([utt]).load(0).audio, data[16000:24000])


def test_window_dataset_drops_and_counts_unreadable_items(tmp_path: Path):
    good = write_float_wav(tmp_path / "good.wav", noise(0.5, SAMPLE_RATE), SAMPLE_RATE)
    corrupt = _random_bytes(tmp_path / "corrupt.wav")
    utts = [_utt(good, 0.5, 0), _utt(corrupt, 0.5, 1), _utt(good, 0.5, 2)]
    window = Window(epoch=0, first_micro=0, micro_batches=((0, 1), (2,)))
    _, micro, skipped = WindowDataset(UtteranceDataset(utts, on_bad_audio="skip"))[window]
    assert skipped == 1
    assert [[s.index for s in mb] for mb in micro] == [[0], [2]]


# --------------------------------------------------------------------------- audio-token count


def test_audio_tokens_match_the_transformers_processor():
    from transformers.models.qwen3_asr.processing_qwen3_asr import Qwen3ASRProcessor

    frames = np.arange(1, 3001)
    expected = Qwen3ASRProcessor._get_audio_token_length(None, torch.tensor(frames), 50)
    ours = np.array([audio_tokens_for_frames(int(f)) for f in frames])
    np.testing.assert_array_equal(ours, expected)
    more = [6500, 12000, 119999, 120000]  # up to 20 min of mel frames
    expected = Qwen3ASRProcessor._get_audio_token_length(None, torch.tensor(more), 50)
    np.testing.assert_array_equal([audio_tokens_for_frames(f) for f in more], expected)


@pytest.mark.parametrize(("frames", "tokens"), [(100, 13), (300, 39), (6500, 845), (1, 1), (2, 1), (8, 1), (9, 2)])
def test_audio_tokens_hand_values(frames: int, tokens: int):
    assert audio_tokens_for_frames(frames) == tokens


def test_audio_tokens_are_monotonic():
    counts = [audio_tokens_for_frames(f) for f in range(0, 2001)]
    assert counts[0] == 0
    assert all(b >= a for a, b in zip(counts, counts[1:], strict=False))
