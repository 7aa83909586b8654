"""Long-form aligner inputs: a 300 s clip with the released aligner's 5,000 classes (400 s) trains (forward,
slot loss, backward) and is evaluated in one piece; the long-form dataset mixes joined items with short ones."""

from __future__ import annotations

import numpy as np
import torch

from qwen3asr_train.config.data import DataConfig
from qwen3asr_train.config.schema import ModelConfig
from qwen3asr_train.data.aligner import SEGMENT_MS, AlignerCollator, LongFormDataset, time_to_class
from qwen3asr_train.data.datamodule import row_checks
from qwen3asr_train.data.dataset import Sample, UtteranceDataset
from qwen3asr_train.data.manifest import AlignedWord, Utterance, read_manifest
from qwen3asr_train.eval.align_eval import align
from qwen3asr_train.losses import slot_ce
from qwen3asr_train.model.builder import build_model
from qwen3asr_train.tools.synthetic import write_tone_corpus


def _long_sample(seconds: float = 300.0, n_words: int = 300) -> Sample:
    rng = np.random.default_rng(0)
    step = (seconds - 1.0) / n_words
    words = [AlignedWord(f"w{i % 7}", 0.5 + i * step, 0.5 + i * step + 0.6 * step) for i in range(n_words)]
    utt = Utterance("long", "x.wav", seconds, " ".join(w.word for w in words), "English", words=words)
    return Sample(utt, (0.05 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 0)


def test_a_300_s_clip_trains_and_evaluates_with_5000_classes():
    model, processor = build_model(ModelConfig(source="tiny", task="aligner", num_labels=5000), seed=0)
    sample = _long_sample()
    batch = AlignerCollator(processor, 5000, slot_prob=1.0, seed=0)([sample])
    labels = batch["labels"][batch["labels"] != -100]
    expected = [time_to_class(t, num_classes=5000) for w in sample.utt.words for t in (w.start, w.end)]
    assert labels.tolist() == expected and max(expected) == round(sample.utt.words[-1].end * 1000 / SEGMENT_MS)
    model.train()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "input_features", "input_features_mask")}
    hidden = model.model(**inputs).last_hidden_state  # (1, L, H): ~3,900 audio tokens + 900 text/slot tokens
    ce_sum, n_slots, _ = slot_ce(hidden, batch["labels"], lambda h: model.score(model.dropout(h)))
    (ce_sum / n_slots).backward()
    assert int(n_slots) == 600 and torch.isfinite(ce_sum)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    spans = align(model, processor, [sample], max_batch_seconds=60.0)[0]  # one item over the batch budget: alone
    assert len(spans) == 300 and all(0.0 <= a <= b <= 400.0 for a, b in spans)


def test_long_form_dataset_mixes_short_items_and_joined_ones(tmp_path):
    manifest = write_tone_corpus(tmp_path, 12, seed=1)
    base = UtteranceDataset(read_manifest(manifest, row_checks(DataConfig())))
    joined = LongFormDataset(base, max_seconds=6.0, gap_seconds=0.0, num_classes=75)  # 75 x 80 ms = 6 s
    assert len(joined) == len(base) + len(joined.groups) and joined.groups
    durations = joined.durations()
    for k, group in enumerate(joined.groups):
        item = joined.load(len(base) + k)
        pieces = [base.load(j) for j in group]
        assert item.audio.size == sum(p.audio.size for p in pieces) and item.audio.size / 16000 <= 6.0
        assert abs(durations[len(base) + k] - item.audio.size / 16000) < 1e-3
        offset = pieces[0].audio.size / 16000
        second = pieces[1].utt.words[0]
        moved = item.utt.words[len(pieces[0].utt.words)]
        assert (moved.word, moved.start) == (second.word, second.start + offset)


def test_long_form_groups_end_where_the_joined_text_would_cut_other_units():
    """nagisa cuts 猫 + 山 differently once joined (夜猫山雨...): such utterances are not grouped, so no group
    fails to concatenate when it is loaded (this once stopped a multilingual run)."""
    import pytest

    pytest.importorskip("nagisa")
    from qwen3asr_train.data.word_units import split_words

    def utt(uid: str, text: str, language: str) -> Utterance:
        units = split_words(text, language)
        words = [AlignedWord(w, 0.1 + 0.3 * i, 0.3 + 0.3 * i) for i, w in enumerate(units)]
        return Utterance(uid, f"{uid}.wav", 0.5 + 0.3 * len(units), text, language, words=words)

    first = utt("a", "友達大きい魚行く川食べる青い朝夜猫", "Japanese")
    second = utt("b", "山雨天気東京電車", "Japanese")
    assert split_words(first.text + second.text, "Japanese") != split_words(first.text, "Japanese") + split_words(
        second.text, "Japanese"
    )
    english = [utt("c", "a cat", "English"), utt("d", "the dog", "English")]
    dataset = LongFormDataset(UtteranceDataset([first, second, *english]), 30.0, 0.0, num_classes=375)
    assert dataset.groups == [[2, 3]]


def test_long_form_fraction_keeps_an_even_share_of_the_groups(tmp_path):
    """A quarter of the groups, spread over the corpus: group k is kept when a multiple of 4 lands in (k/4, (k+1)/4],
    i.e. k = 3, 7, 11, ... (counted by hand), and each kept group is one the full dataset formed."""
    import pytest

    manifest = write_tone_corpus(tmp_path, 40, seed=2)
    base = UtteranceDataset(read_manifest(manifest, row_checks(DataConfig())))
    full = LongFormDataset(base, max_seconds=3.0, gap_seconds=0.0, num_classes=75)
    quarter = LongFormDataset(base, max_seconds=3.0, gap_seconds=0.0, num_classes=75, fraction=0.25)
    assert len(full.groups) >= 8
    assert quarter.groups == [g for k, g in enumerate(full.groups) if k % 4 == 3]
    assert len(quarter) == len(base) + len(full.groups) // 4
    with pytest.raises(ValueError, match="fraction"):
        LongFormDataset(base, max_seconds=3.0, gap_seconds=0.0, num_classes=75, fraction=0.0)
