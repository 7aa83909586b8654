"""Aligner data: time classes, slot insertion, labels, padding, processor parity, concatenation, unit checks.

Independent references: the transformers processor (tokenisation + audio expansion + padding of the
upstream input string), plain-torch cross-entropy written out here, and hand-computed classes/offsets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device

from qwen3asr_train.config.schema import ModelConfig
from qwen3asr_train.data.aligner import (
    AlignerCollator,
    check_word_units,
    concat_utterances,
    time_to_class,
)
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.collate import IGNORE_INDEX
from qwen3asr_train.data.dataset import Sample, UtteranceDataset
from qwen3asr_train.data.manifest import AlignedWord, RowChecks, Utterance, read_manifest
from qwen3asr_train.data.prompts import TIMESTAMP, aligner_input
from qwen3asr_train.data.word_units import split_words
from qwen3asr_train.languages import LanguageTable
from qwen3asr_train.losses import timestamp_ce
from qwen3asr_train.tools.synthetic import write_tone_corpus

NUM_CLASSES = 64  # 5.12 s addressable: enough for the tone clips (< 3 s), small enough to test the limit


@pytest.fixture(scope="module")
def aligner():
    from qwen3asr_train.model.builder import build_model

    model, processor = build_model(ModelConfig(source="tiny", task="aligner", num_labels=NUM_CLASSES), seed=0)
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def tone_samples(tmp_path_factory) -> list[Sample]:
    """Eight tone clips (0.5-3 s) with exact word times, read through the real manifest/dataset path."""
    manifest = write_tone_corpus(tmp_path_factory.mktemp("tones"), num=8, seed=3, words_per_clip=(2, 5))
    dataset = UtteranceDataset(read_manifest(manifest, RowChecks(LanguageTable())))
    return [dataset.load(i) for i in range(len(dataset))]


def fake_sample(index: int, n_words: int, language: str = "English", seconds: float = 1.0) -> Sample:
    """A sample with ``n_words`` evenly spaced words (audio content irrelevant)."""
    words = [f"w{chr(97 + k % 26)}" for k in range(n_words)]
    step = seconds / n_words
    timed = [AlignedWord(w, round(k * step, 3), round((k + 0.8) * step, 3)) for k, w in enumerate(words)]
    utt = Utterance(f"s{index}", "x.wav", seconds, " ".join(words), language, words=timed, source=f"m.jsonl:{index}")
    return Sample(utt, np.zeros(int(seconds * 16000), np.float32), index)


def forward_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            input_features=batch["input_features"],
            input_features_mask=batch["input_features_mask"],
        ).logits  # (B, L, C)


# --------------------------------------------------------------------------------------------- classes


def test_time_to_class_rounds_half_up_and_clips():
    cases = {0.0: 0, 0.039: 0, 0.04: 1, 0.119: 1, 0.12: 2, 0.2: 3, 0.28: 4, 1.0: 13}  # 0.2 s = 2.5 bins -> 3
    assert {t: time_to_class(t, num_classes=5000) for t in cases} == cases
    assert time_to_class(0.759, num_classes=10) == 9  # 9.49 bins
    assert time_to_class(0.76, num_classes=10) == 9  # 9.5 rounds to 10, clipped to the last class
    assert time_to_class(5.0, num_classes=10) == 9
    assert time_to_class(0.05, segment_ms=20, num_classes=10) == 3  # 2.5 -> 3
    with pytest.raises(ValueError):
        time_to_class(-0.01, num_classes=10)


# --------------------------------------------------------------------------------------------- loss


def test_timestamp_ce_is_non_shifted_ce_at_slots(aligner, tone_samples):
    model, processor = aligner
    batch = AlignerCollator(processor, NUM_CLASSES, slot_prob=0.5, seed=1)(tone_samples[:4])
    logits = forward_logits(model, batch)  # (B, L, C)
    labels = batch["labels"]  # (B, L)
    loss, count = timestamp_ce(logits, labels)

    manual, n = torch.zeros((), dtype=torch.float64), 0
    for b, t in (labels != IGNORE_INDEX).nonzero().tolist():
        manual -= torch.log_softmax(logits[b, t].double(), -1)[labels[b, t]]
        n += 1
    assert int(count) == n == batch["num_slots"] > 0
    assert torch.allclose(loss.double(), manual, atol=1e-6)

    # the LM-style shifted loss (logits at t-1 predict the label at t) is a different number
    shifted_labels = labels[:, 1:]  # (B, L-1)
    keep = shifted_labels != IGNORE_INDEX
    shifted = F.cross_entropy(logits[:, :-1][keep].double(), shifted_labels[keep], reduction="sum")
    assert not torch.allclose(shifted, manual, atol=1e-3)


# --------------------------------------------------------------------------------------------- slots


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_slot_fraction_matches_slot_prob(aligner, p):
    _, processor = aligner
    collator = AlignerCollator(processor, NUM_CLASSES, slot_prob=p, seed=7)
    n_words = 10
    samples = [fake_sample(i, n_words) for i in range(40)]
    counts = [sum(collator.slots(s, epoch)) for epoch in range(50) for s in samples]
    assert min(counts) >= 1
    fraction = sum(counts) / (len(counts) * n_words)
    # forcing one slot when none was drawn adds (1 - p)^n / n to the expectation (0.3% here)
    expected = p + (1 - p) ** n_words / n_words
    assert abs(fraction - expected) < 0.015, (fraction, expected)


def test_slots_are_deterministic_per_epoch_and_at_least_one(aligner):
    _, processor = aligner
    collator = AlignerCollator(processor, NUM_CLASSES, slot_prob=0.5, seed=3)
    samples = [fake_sample(i, 12) for i in range(20)]
    again = AlignerCollator(processor, NUM_CLASSES, slot_prob=0.5, seed=3)  # a resumed run
    assert [collator.slots(s, 4) for s in samples] == [again.slots(s, 4) for s in samples]
    assert [collator.slots(s, 4) for s in samples] != [collator.slots(s, 5) for s in samples]
    none = AlignerCollator(processor, NUM_CLASSES, slot_prob=0.0, seed=3)
    assert all(sum(none.slots(s, e)) == 1 for s in samples for e in range(3))
    every = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=3)
    assert all(all(every.slots(s, e)) for s in samples for e in range(3))


def test_labels_sit_on_timestamps_and_equal_word_classes(aligner, tone_samples):
    _, processor = aligner
    collator = AlignerCollator(processor, NUM_CLASSES, slot_prob=0.5, seed=2)
    ts_id = processor.tokenizer.convert_tokens_to_ids(TIMESTAMP)
    for epoch in range(3):
        batch = collator(tone_samples, epoch=epoch)
        labels, ids = batch["labels"], batch["input_ids"]
        assert torch.equal(labels != IGNORE_INDEX, ids == ts_id)  # every slot labelled, nothing else
        for row, sample in enumerate(tone_samples):
            slotted = collator.slots(sample, epoch)
            timed = [w for w, s in zip(sample.utt.words, slotted, strict=True) if s]
            assert batch["slotted_words"][row] == [(w.word, w.start, w.end) for w in timed]
            expected = [time_to_class(t, num_classes=NUM_CLASSES) for w in timed for t in (w.start, w.end)]
            assert labels[row][labels[row] != IGNORE_INDEX].tolist() == expected
            # the text between slots is the words concatenated without spaces, as upstream
            text = processor.tokenizer.decode(ids[row][batch["attention_mask"][row].bool()])
            expected_text = aligner_input([w.word for w in sample.utt.words], slotted)
            assert text.split("<|audio_end|>")[1] == expected_text.split("<|audio_end|>")[1]


def test_time_shift_moves_audio_and_word_times_together(aligner, tone_samples):
    """The shift seen in the audio (first non-zero sample) equals the shift of every word time."""
    _, processor = aligner
    collator = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=5, time_shift_seconds=0.4)
    signs = set()
    for epoch in range(6):
        for sample in tone_samples:
            moved = collator.shifted(sample, epoch)
            onset = lambda audio: int(np.flatnonzero(np.abs(audio) > 0)[0])  # noqa: E731
            delta = (onset(moved.audio) - onset(sample.audio)) / SAMPLE_RATE
            assert moved.audio.size - sample.audio.size == onset(moved.audio) - onset(sample.audio)
            assert abs(delta) <= 0.4 + 1e-9
            for old, new in zip(sample.utt.words, moved.utt.words, strict=True):
                assert (new.word, new.start - old.start, new.end - old.end) == (
                    old.word,
                    pytest.approx(delta, abs=1e-9),
                    pytest.approx(delta, abs=1e-9),
                )
            # a trim never reaches into the first word (keeps 50 ms, or all the audio there was before it)
            assert moved.utt.words[0].start >= min(sample.utt.words[0].start, 0.05) - 1e-9
            assert moved.utt.duration == moved.audio.size / SAMPLE_RATE
            assert np.array_equal(collator.shifted(sample, epoch).audio, moved.audio)  # same draw again
            signs.add(np.sign(delta))
        batch = collator(tone_samples, epoch=epoch)
        for row, sample in enumerate(tone_samples):
            words = collator.shifted(sample, epoch).utt.words
            expected = [time_to_class(t, num_classes=NUM_CLASSES) for w in words for t in (w.start, w.end)]
            assert batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist() == expected
    assert {-1.0, 1.0} <= signs
    off = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=5)
    assert off.shifted(tone_samples[0], 0) is tone_samples[0]


def test_left_and_right_padding_give_the_same_rows(aligner, tone_samples):
    model, processor = aligner
    batches = {
        side: AlignerCollator(processor, NUM_CLASSES, 0.6, seed=5, padding_side=side)(tone_samples[:5], epoch=1)
        for side in ("left", "right")
    }
    left, right = batches["left"], batches["right"]
    logits = {side: forward_logits(model, b) for side, b in batches.items()}
    assert left["num_slots"] == right["num_slots"]
    assert torch.equal(left["input_features"], right["input_features"])
    for row in range(5):
        ml, mr = left["attention_mask"][row].bool(), right["attention_mask"][row].bool()
        assert torch.equal(left["input_ids"][row][ml], right["input_ids"][row][mr])
        assert torch.equal(left["labels"][row][ml], right["labels"][row][mr])
        assert torch.allclose(logits["left"][row][ml], logits["right"][row][mr], atol=1e-5)
    assert not torch.equal(left["input_ids"], right["input_ids"])  # padding really differs
    moved = move_data_to_device(left, torch.device("cpu"))  # what Lightning does to every batch
    assert moved["slotted_words"] == left["slotted_words"]


def test_ids_equal_transformers_processor_when_all_slotted(aligner, tone_samples):
    _, processor = aligner
    batch = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=0)(tone_samples)
    texts = [aligner_input(processor.split_words_for_alignment(s.utt.text, "English")) for s in tone_samples]
    for s in tone_samples:  # our word units are the processor's
        assert [w.word for w in s.utt.words] == processor.split_words_for_alignment(s.utt.text, "English")
    ref = processor(text=texts, audio=[s.audio for s in tone_samples], padding_side="left")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert torch.equal(batch["input_features"], ref["input_features"])
    assert torch.equal(batch["input_features_mask"], ref["input_features_mask"].long())


def test_over_long_audio_is_refused(aligner):
    _, processor = aligner
    long = fake_sample(0, 3, seconds=1.3)  # 10 classes x 80 ms address 0.8 s
    with pytest.raises(ValueError, match="address"):
        AlignerCollator(processor, 10, 1.0, seed=0)([long])
    with pytest.raises(ValueError, match="address"):
        concat_utterances([long], max_seconds=0.8, num_classes=10)
    with pytest.raises(ValueError, match="max_seconds"):
        concat_utterances([fake_sample(1, 2, seconds=0.5)], max_seconds=2.0, num_classes=10)


# --------------------------------------------------------------------------------------------- concat


def test_concat_offsets_words_and_respects_max_seconds(tone_samples):
    gap = 0.1
    out = concat_utterances(tone_samples, max_seconds=4.0, gap_seconds=gap, num_classes=NUM_CLASSES)
    assert len(out) < len(tone_samples)
    assert all(s.audio.size <= 4.0 * 16000 for s in out)
    assert len({s.utt.id for s in out}) == len(out) and len({s.index for s in out}) == len(out)
    pieces = iter(tone_samples)
    for merged in out:
        check_word_units(merged.utt)
        assert merged.utt.duration == merged.audio.size / 16000
        cursor, words_seen = 0, 0
        while words_seen < len(merged.utt.words):
            piece = next(pieces)
            if cursor:
                assert not merged.audio[cursor : cursor + int(gap * 16000)].any()
                cursor += int(gap * 16000)
            np.testing.assert_array_equal(merged.audio[cursor : cursor + piece.audio.size], piece.audio)
            for w, ref in zip(merged.utt.words[words_seen:], piece.utt.words, strict=False):
                assert w.word == ref.word
                assert w.start == pytest.approx(ref.start + cursor / 16000, abs=1e-9)
                assert w.end == pytest.approx(ref.end + cursor / 16000, abs=1e-9)
            cursor += piece.audio.size
            words_seen += len(piece.utt.words)
        assert cursor == merged.audio.size
    assert next(pieces, None) is None  # every input used once, in order


def test_concat_joins_cjk_without_space_and_splits_on_language():
    def sample(i: int, text: str, language: str) -> Sample:
        units = split_words(text, language)
        words = [AlignedWord(u, 0.1 * k, 0.1 * k + 0.05) for k, u in enumerate(units)]
        utt = Utterance(f"c{i}", "x.wav", 0.5, text, language, words=words, source=f"m:{i}")
        return Sample(utt, np.ones(8000, np.float32), i)

    samples = [sample(0, "你好", "Chinese"), sample(1, "世界", "Chinese"), sample(2, "hello there", "English")]
    out = concat_utterances(samples, max_seconds=5.0, num_classes=NUM_CLASSES)
    assert [s.utt.text for s in out] == ["你好世界", "hello there"]
    assert [w.word for w in out[0].utt.words] == ["你", "好", "世", "界"]
    assert out[0].utt.words[2].start == pytest.approx(0.5)
    english = [sample(0, "one two", "English"), sample(1, "three", "English")]
    assert concat_utterances(english, max_seconds=5.0, num_classes=NUM_CLASSES)[0].utt.text == "one two three"
    # a group that would exceed max_seconds is closed instead
    assert len(concat_utterances(english, max_seconds=0.9, num_classes=NUM_CLASSES)) == 2


def test_check_word_units_catches_mismatch():
    words = [AlignedWord("dont", 0.0, 0.2), AlignedWord("go", 0.3, 0.4)]
    utt = Utterance("u", "x.wav", 1.0, "don't go", "English", words=words, source="train.jsonl:7")
    with pytest.raises(ValueError, match="train.jsonl:7"):
        check_word_units(utt)
    check_word_units(Utterance("u", "x.wav", 1.0, "dont, go!", "English", words=words))  # punctuation is not a unit
    with pytest.raises(ValueError, match="no word times"):
        check_word_units(Utterance("u", "x.wav", 1.0, "go", "English", source="a:1"))
