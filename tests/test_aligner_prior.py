"""Logit adjustment of the aligner's slot loss (``recipe.slot_prior_tau``) and the slot-time prior it divides out.

Independent references: the labels the collator actually produces for every decoded item of an epoch (long-form
items included) for the counts, and ``F.cross_entropy`` on hand-adjusted logits for the loss.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qwen3asr_train import training
from qwen3asr_train.config.schema import AlignerConfig, ModelConfig
from qwen3asr_train.data.aligner import AlignerCollator, LongFormDataset, slot_class_counts
from qwen3asr_train.data.dataset import UtteranceDataset
from qwen3asr_train.data.manifest import RowChecks, read_manifest
from qwen3asr_train.languages import LanguageTable
from qwen3asr_train.model.builder import build_model
from qwen3asr_train.stages.aligner import AlignerModule
from qwen3asr_train.tools.synthetic import write_tone_corpus

NUM_CLASSES = 200


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, processor = build_model(ModelConfig(source="tiny", task="aligner", num_labels=NUM_CLASSES), seed=0)
    model.eval()
    manifest = write_tone_corpus(tmp_path_factory.mktemp("tones"), num=8, seed=5, words_per_clip=(2, 5))
    dataset = UtteranceDataset(read_manifest(manifest, RowChecks(LanguageTable())))
    return model, processor, dataset


def test_counts_equal_the_labels_of_a_collated_epoch(setup):
    model, processor, base = setup
    dataset = LongFormDataset(base, 12.0, 0.2, NUM_CLASSES)
    assert dataset.groups  # joined items are counted too
    collator = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=0)
    expected = np.zeros(NUM_CLASSES, dtype=np.int64)
    for i in range(len(dataset)):
        labels = collator([dataset.load(i)])["labels"]
        for c in labels[labels != -100].tolist():
            expected[c] += 1
    got = slot_class_counts(dataset, NUM_CLASSES)
    assert got.tolist() == expected.tolist()
    assert slot_class_counts(base, NUM_CLASSES).sum() == 2 * sum(len(u.words) for u in base.utterances)


def test_tau_zero_is_exactly_the_slot_loss_and_tau_adjusts_the_logits(setup):
    model, processor, base = setup
    batch = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=0)([base.load(i) for i in range(len(base))])
    counts = slot_class_counts(base, NUM_CLASSES)
    plain = AlignerModule(model, AlignerConfig(), 1)
    zero = AlignerModule(model, AlignerConfig(slot_prior_tau=0.0), 1)
    zero.set_slot_prior(counts)
    adjusted = AlignerModule(model, AlignerConfig(slot_prior_tau=0.7), 1)
    adjusted.set_slot_prior(counts)
    for m in (plain, zero, adjusted):
        m.train()
    model.eval()
    with torch.no_grad():
        ref, off, on = plain.forward_sums(batch), zero.forward_sums(batch), adjusted.forward_sums(batch)
        assert torch.equal(off["ce_sum"], ref["ce_sum"])  # bit for bit
        assert torch.equal(off["exact"], ref["exact"])
        mask = batch["labels"] != -100
        logits = model.score(training.backbone_hidden(model, batch).last_hidden_state[mask]).float()
        prior = torch.tensor((counts + 1) / (counts + 1).sum(), dtype=torch.float64).log().float()
        hand = F.cross_entropy(logits + 0.7 * prior, batch["labels"][mask], reduction="sum")
        assert float(on["ce_sum"]) == pytest.approx(float(hand), rel=1e-5)
        assert float(on["ce_sum"]) != pytest.approx(float(ref["ce_sum"]), rel=1e-3)
        adjusted.eval()  # validation scores the raw logits, like inference
        assert torch.equal(adjusted.forward_sums(batch)["ce_sum"], plain.forward_sums(batch)["ce_sum"])


def test_a_missing_or_misshapen_prior_is_an_error(setup):
    model, processor, base = setup
    batch = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=0)([base.load(0)])
    module = AlignerModule(model, AlignerConfig(slot_prior_tau=1.0), 1)
    module.train()
    with pytest.raises(ValueError, match="set_slot_prior"):
        module.forward_sums(batch)
    with pytest.raises(ValueError, match="classes"):
        module.set_slot_prior(np.ones(NUM_CLASSES + 1))
    with pytest.raises(ValueError, match="slot_prior_tau"):
        AlignerConfig(slot_prior_tau=-1.0).validate()


def test_hard_slot_weight_applies_in_training_only(setup):
    """``recipe.slot_hard_weight``: the training loss is the hand-weighted CE; validation scores the plain CE."""
    from qwen3asr_train.losses import hard_slot_weights

    model, processor, base = setup
    model = copy.deepcopy(model)
    batch = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=0)([base.load(i) for i in range(len(base))])
    mask = batch["labels"] != -100
    with torch.no_grad():  # a peaked head, and every other slot labelled at its own peak: distances 0 and >= cap
        model.score.weight.normal_(0.0, 50.0, generator=torch.Generator().manual_seed(0))
        peaks = model.score(training.backbone_hidden(model, batch).last_hidden_state[mask]).argmax(-1)
        labels = batch["labels"][mask]
        labels[::2] = peaks[::2]
        batch["labels"][mask] = labels
    plain = AlignerModule(model, AlignerConfig(), 1)
    hard = AlignerModule(model, AlignerConfig(slot_hard_weight=0.5), 1)
    for m in (plain, hard):
        m.train()
    model.eval()  # no dropout, so the two modules see the same logits
    with torch.no_grad():
        ref, on = plain.forward_sums(batch), hard.forward_sums(batch)
        logits = model.score(training.backbone_hidden(model, batch).last_hidden_state[mask]).float()
        target = batch["labels"][mask]
        per_slot = F.cross_entropy(logits, target, reduction="none")
        hand = (per_slot * hard_slot_weights(logits, target, 0.5)).sum()
        assert float(on["ce_sum"]) == pytest.approx(float(hand), rel=1e-5)
        assert float(on["ce_sum"]) != pytest.approx(float(ref["ce_sum"]), rel=1e-4)
        hard.eval()
        assert float(hard.forward_sums(batch)["ce_sum"]) == pytest.approx(float(ref["ce_sum"]), rel=1e-6)
    with pytest.raises(ValueError, match="slot_hard_weight"):
        AlignerConfig(slot_hard_weight=-1.0).validate()
