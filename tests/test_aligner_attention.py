"""The aligner's training-only attention supervision (``recipe.attn_sup_weight``, stages/aligner.py).

Independent references: transformers' eager attention weights (``output_attentions=True``) for the recomputed
slot attention, a per-slot Python loop over the ids for the targets and the key masks, and the plain slot
loss for weight 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from qwen3asr_train import training
from qwen3asr_train.config.schema import AlignerConfig, ModelConfig
from qwen3asr_train.data.aligner import AlignerCollator
from qwen3asr_train.data.dataset import UtteranceDataset
from qwen3asr_train.data.manifest import RowChecks, read_manifest
from qwen3asr_train.data.packing import PACKED_KEY, PackingCollator, packed_causal_mask
from qwen3asr_train.languages import LanguageTable
from qwen3asr_train.model.builder import build_model
from qwen3asr_train.stages.aligner import (
    AlignerModule,
    attention_key_mask,
    boundary_attention_targets,
    capture_attention_inputs,
    slot_attention_log_probs,
)
from qwen3asr_train.tools.synthetic import write_tone_corpus

NUM_CLASSES = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = ModelConfig(source="tiny", task="aligner", num_labels=NUM_CLASSES, attn_implementation="eager")
    model, processor = build_model(cfg, seed=0)
    model.eval()
    manifest = write_tone_corpus(tmp_path_factory.mktemp("tones"), num=6, seed=5, words_per_clip=(2, 5))
    dataset = UtteranceDataset(read_manifest(manifest, RowChecks(LanguageTable())))
    return model, processor, [dataset.load(i) for i in range(len(dataset))]


def _eager_attentions(model, batch) -> tuple[torch.Tensor, ...]:
    """Per-layer ``(R, heads, L, L)`` attention weights from transformers' eager attention."""
    inputs = {k: batch[k] for k in ("input_ids", "input_features", "input_features_mask")}
    if PACKED_KEY in batch:
        mask = packed_causal_mask(batch["segment_ids"])
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        out = model.model(attention_mask=additive, position_ids=batch["position_ids"], output_attentions=True, **inputs)
    else:
        out = model.model(attention_mask=batch["attention_mask"], output_attentions=True, **inputs)
    return out.attentions


@pytest.mark.parametrize("packed", [False, True])
def test_recomputed_slot_attention_equals_eager_weights(setup, packed):
    model, processor, tone = setup
    collator = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=0)
    batch = PackingCollator(collator, 60)(tone) if packed else collator(tone)
    layers = model.model.language_model.layers
    slots = batch["labels"] != -100
    rows, positions = slots.nonzero(as_tuple=True)
    with torch.no_grad():
        reference = _eager_attentions(model, batch)
        for layer in range(len(layers)):
            with capture_attention_inputs(layers[layer].self_attn) as captured:
                training.backbone_hidden(model, batch)
            allowed = attention_key_mask(batch, rows, positions)
            heads = model.config.text_config.num_attention_heads
            for head in range(heads):
                logp = slot_attention_log_probs(layers[layer].self_attn, captured, rows, positions, allowed, head)
                ref = reference[layer][rows, head, positions]  # (S, L)
                assert torch.allclose(logp.exp(), ref, atol=1e-6), (layer, head)
            mean = slot_attention_log_probs(layers[layer].self_attn, captured, rows, positions, allowed, -1)
            assert torch.allclose(mean.exp(), reference[layer][rows, :, positions].mean(1), atol=1e-6)


def _hand_keys_and_targets(batch, audio_id, sigma_ms):
    """Key masks and Gaussian targets by a loop over each slot's row (one clip per row or per segment)."""
    ids = batch["input_ids"].tolist()
    segments = batch["segment_ids"].tolist() if PACKED_KEY in batch else None
    valid = batch["attention_mask"].tolist()
    keys, targets = [], []
    for r, row in enumerate(ids):
        for i, label in enumerate(batch["labels"][r].tolist()):
            if label == -100:
                continue
            clip = segments[r][i] if segments else None

            def same(j, r=r, clip=clip):
                return segments[r][j] == clip if segments else valid[r][j] == 1

            keys.append([j <= i and same(j) for j in range(len(row))])
            weights, k = [], 0
            for j, tok in enumerate(row):
                if tok == audio_id and same(j):
                    chunk, m = divmod(k, 13)
                    centre = 1000 * chunk + 10 * (8 * m + min(8 * m + 8, 100) - 1) / 2
                    weights.append(math.exp(-0.5 * ((centre - 80 * label) / sigma_ms) ** 2))
                    k += 1
                else:
                    weights.append(0.0)
            total = sum(weights)
            targets.append([w / total for w in weights])
    return torch.tensor(keys), torch.tensor(targets)


@pytest.mark.parametrize("packed", [False, True])
def test_targets_and_key_masks_match_a_hand_count(setup, packed):
    model, processor, tone = setup
    collator = AlignerCollator(processor, NUM_CLASSES, slot_prob=0.7, seed=1)
    batch = PackingCollator(collator, 60)(tone) if packed else collator(tone)
    rows, positions = (batch["labels"] != -100).nonzero(as_tuple=True)
    audio_id = int(model.config.audio_token_id)
    keys, targets = _hand_keys_and_targets(batch, audio_id, 120.0)
    assert attention_key_mask(batch, rows, positions).tolist() == keys.tolist()
    got = boundary_attention_targets(batch, audio_id, rows, positions, 120.0)
    assert torch.allclose(got, targets.float(), atol=1e-6)
    # the mass sits on audio tokens the slot may attend (its own clip, before it), peaked at its boundary
    assert bool(((got > 0) <= keys).all())
    assert torch.allclose(got.sum(-1), torch.ones(len(rows)))


def test_weight_zero_is_exactly_the_slot_loss(setup):
    model, processor, tone = setup
    batch = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=0)(tone)
    off = AlignerModule(model, AlignerConfig(label_sigma_bins=1.0, audio_clock_weight=0.5), 1)
    on = AlignerModule(model, AlignerConfig(label_sigma_bins=1.0, audio_clock_weight=0.5, attn_sup_weight=0.3), 1)
    for m in (off, on):
        m.train()
    model.eval()
    with torch.no_grad():
        sums_off, sums_on = off.forward_sums(batch), on.forward_sums(batch)
    assert "attn_sum" not in sums_off
    scale = 1 / 7
    mean_clock = sums_off["clock_sum"] / sums_off["clock_n"]
    old = sums_off["ce_sum"] * scale + 0.5 * mean_clock * sums_off["n_slots"] * scale
    assert torch.equal(off.loss(sums_off, scale), old)  # bit for bit the loss before this option
    assert torch.equal(sums_on["ce_sum"], sums_off["ce_sum"])  # the supervision does not touch the slot CE
    assert torch.equal(sums_on["clock_sum"], sums_off["clock_sum"])
    # w > 0: + w x the summed attention CE, normalised per step like the slot CE (i.e. w x mean CE per slot)
    expected = old + 0.3 * sums_on["attn_sum"] * scale
    assert float(on.loss(sums_on, scale)) == pytest.approx(float(expected), rel=1e-6)
    # the summed CE is the hand computation: eager weights of layer -1, head 0, against the Gaussian targets
    rows, positions = (batch["labels"] != -100).nonzero(as_tuple=True)
    with torch.no_grad():
        ref = _eager_attentions(model, batch)[-1][rows, 0, positions]
    _, targets = _hand_keys_and_targets(batch, int(model.config.audio_token_id), 80.0)
    hand = -(targets * ref.clamp_min(1e-30).log()).sum()
    assert float(sums_on["attn_sum"]) == pytest.approx(float(hand), rel=1e-5)
    on.eval()  # evaluation never computes it
    with torch.no_grad():
        assert "attn_sum" not in on.forward_sums(batch)


def test_the_loss_reaches_the_supervised_layers_projections(setup):
    model, processor, tone = setup
    batch = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=0)(tone)
    module = AlignerModule(model, AlignerConfig(attn_sup_weight=1.0, attn_sup_layer=0, attn_sup_head=1), 1)
    module.train()
    model.eval()
    model.zero_grad()
    module.forward_sums(batch)["attn_sum"].backward()
    attn = model.model.language_model.layers[0].self_attn
    assert attn.q_proj.weight.grad is not None and float(attn.q_proj.weight.grad.abs().sum()) > 0
    assert attn.k_proj.weight.grad is not None and float(attn.k_proj.weight.grad.abs().sum()) > 0
    # head 1 only: the other heads' query rows get no gradient
    d = attn.head_dim
    grad = attn.q_proj.weight.grad.view(-1, d, attn.q_proj.weight.shape[1])
    assert grad.shape[0] >= 2
    assert float(grad[1].abs().sum()) > 0 and float(grad[0].abs().sum()) == 0 and float(grad[2:].abs().sum()) == 0
    model.zero_grad()


def test_config_rejects_bad_attention_settings(setup):
    model = setup[0]
    layers, heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    for bad in ({"attn_sup_layer": layers}, {"attn_sup_layer": -layers - 1}, {"attn_sup_head": heads}):
        with pytest.raises(ValueError, match=f"the decoder has {layers} layers of {heads} heads"):
            AlignerModule(model, AlignerConfig(attn_sup_weight=1.0, **bad), 1)
    AlignerModule(model, AlignerConfig(attn_sup_layer=7), 1)  # ignored while the weight is 0
    with pytest.raises(ValueError, match="attn_sup_weight"):
        AlignerConfig(attn_sup_weight=-1.0).validate()
    with pytest.raises(ValueError, match="attn_sup_head"):
        AlignerConfig(attn_sup_head=-2).validate()
    with pytest.raises(ValueError, match="attn_sup_sigma_ms"):
        AlignerConfig(attn_sup_sigma_ms=0.0).validate()
