"""The aligner's auxiliary audio-token clock loss (``recipe.audio_clock_weight``, stages/aligner.py).

Independent references: hand-written token times from the encoder's chunk layout (13 tokens per 100 frames,
token j on frames 8j..8j+7), a per-row Python loop over the ids for the labels, the unpacked batch for the
packed one, and ``F.cross_entropy`` on hand-gathered hidden states for the loss.
"""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForTokenClassification

from qwen3asr_train import training
from qwen3asr_train.config.schema import AlignerConfig, ModelConfig
from qwen3asr_train.data.aligner import AlignerCollator, time_to_class
from qwen3asr_train.data.dataset import UtteranceDataset
from qwen3asr_train.data.manifest import RowChecks, read_manifest
from qwen3asr_train.data.packing import PackingCollator
from qwen3asr_train.languages import LanguageTable
from qwen3asr_train.model.builder import build_model
from qwen3asr_train.stages import aligner as aligner_stage
from qwen3asr_train.stages.aligner import AlignerModule, audio_clock_targets, audio_token_centres_ms
from qwen3asr_train.tools.synthetic import write_tone_corpus
from tests.conftest import make_config

NUM_CLASSES = 64
A = 7  # the audio token id of the toy layouts


def test_token_centres_follow_the_chunk_layout():
    # chunk 0: frames 0-7 -> centre frame 3.5 -> 35 ms; token 11: frames 88-95 -> 915 ms; token 12 (the 13th):
    # frames 96-99 -> 97.5 -> 975 ms; token 13 starts the next second: 1035 ms; token 26 = chunk 2, token 0.
    index = torch.tensor([0, 1, 11, 12, 13, 25, 26, 389])
    expected = [35.0, 115.0, 915.0, 975.0, 1035.0, 1975.0, 2035.0, 29975.0]
    assert audio_token_centres_ms(index).tolist() == expected
    # not the naive "token k = class k": after 30 s of audio (390 tokens) the last token is class 375, not 389
    assert time_to_class(29.975, num_classes=1000) == 375


def test_targets_of_a_left_padded_batch_match_a_hand_count():
    pad, start, end, word, slot = 0, 5, 6, 9, 8
    ids = torch.tensor(
        [
            [pad] * 13 + [start, A, A, A, end, word, slot, slot],  # left padding, 3 audio tokens
            [start] + [A] * 15 + [end, word, slot, slot, word],  # 15 audio tokens: crosses into the 2nd second
        ]
    )
    mask, centres = audio_clock_targets(ids, A)
    assert mask.tolist() == (ids == A).tolist()
    row0 = [35, 115, 195]
    row1 = [35 + 80 * j for j in range(12)] + [975, 1035, 1115]
    assert (centres * 80).tolist() == pytest.approx(row0 + row1)


def test_targets_restart_at_every_clip_of_a_packed_row():
    # row 0 packs clip 0 (2 audio tokens) then clip 1 (3); row 1 holds clip 2 (1) and padding
    ids = torch.tensor([[5, A, A, 6, 9, 5, A, A, A, 6, 9], [5, A, 6, 9, 0, 0, 0, 0, 0, 0, 0]])
    segments = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1], [2, 2, 2, 2, -1, -1, -1, -1, -1, -1, -1]])
    _, centres = audio_clock_targets(ids, A, segments)
    assert (centres * 80).tolist() == pytest.approx([35, 115, 35, 115, 195, 35])
    # the same ids unpacked (each row one clip) count on through the row: the segments are what restart it
    _, unpacked = audio_clock_targets(ids, A)
    assert (unpacked * 80).tolist() == pytest.approx([35, 115, 195, 275, 355, 35])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, processor = build_model(ModelConfig(source="tiny", task="aligner", num_labels=NUM_CLASSES), seed=0)
    model.eval()  # no dropout: packed and unpacked computations see the same function
    manifest = write_tone_corpus(tmp_path_factory.mktemp("tones"), num=6, seed=5, words_per_clip=(2, 5))
    dataset = UtteranceDataset(read_manifest(manifest, RowChecks(LanguageTable())))
    return model, processor, [dataset.load(i) for i in range(len(dataset))]


def _hand_clock_ce(model, batch, hidden=None) -> tuple[float, int]:
    """One-hot clock CE by a loop over each row's ids (left-padded, one clip per row), on ``hidden`` (default:
    the decoder's output)."""
    if hidden is None:
        hidden = training.backbone_hidden(model, batch).last_hidden_state
    audio_id = int(model.config.audio_token_id)
    states, labels = [], []
    for r, row in enumerate(batch["input_ids"].tolist()):
        k = 0
        for i, tok in enumerate(row):
            if tok == audio_id:
                chunk, j = divmod(k, 13)
                centre_s = chunk + (8 * j + min(8 * j + 8, 100) - 1) / 2 / 100
                labels.append(time_to_class(centre_s, num_classes=NUM_CLASSES))
                states.append(hidden[r, i])
                k += 1
    logits = model.score(torch.stack(states)).float()
    return float(F.cross_entropy(logits, torch.tensor(labels), reduction="sum")), len(labels)


def test_clock_loss_equals_hand_construction_packed_or_not(setup):
    model, processor, tone = setup
    module = AlignerModule(model, AlignerConfig(audio_clock_weight=0.5, label_sigma_bins=0.0), 1)
    module.train()
    model.eval()
    collator = AlignerCollator(processor, NUM_CLASSES, slot_prob=0.7, seed=0)
    batch = collator(tone)
    with torch.no_grad():
        ref_ce, ref_n = _hand_clock_ce(model, batch)
        got = module.forward_sums(batch)
        assert int(got["clock_n"]) == ref_n == int((batch["input_ids"] == model.config.audio_token_id).sum())
        assert float(got["clock_sum"]) == pytest.approx(ref_ce, rel=1e-5)
        for budget in (0, 60):
            packed = module.forward_sums(PackingCollator(collator, budget)(tone))
            assert int(packed["clock_n"]) == ref_n
            assert float(packed["clock_sum"]) == pytest.approx(ref_ce, rel=1e-5)


def test_clock_on_an_earlier_layer_reads_that_layers_output(setup):
    model, processor, tone = setup
    batch = AlignerCollator(processor, NUM_CLASSES, slot_prob=0.7, seed=0)(tone)
    layers = int(model.config.text_config.num_hidden_layers)
    assert layers >= 2
    with torch.no_grad():
        # independent reference: transformers' own per-layer states (index k + 1 = the output of layer k)
        states = model.model(
            input_ids=batch["input_ids"],
            input_features=batch["input_features"],
            input_features_mask=batch["input_features_mask"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states
        first = model.model.language_model.norm(states[1])
        ref_ce, ref_n = _hand_clock_ce(model, batch, hidden=first)
        sums = {}
        for layer in (0, -layers, -1, layers - 1):
            module = AlignerModule(
                model, AlignerConfig(audio_clock_weight=1.0, audio_clock_layer=layer, label_sigma_bins=0.0), 1
            )
            module.train()
            model.eval()
            sums[layer] = module.forward_sums(batch)
    assert int(sums[0]["clock_n"]) == ref_n
    assert float(sums[0]["clock_sum"]) == pytest.approx(ref_ce, rel=1e-5)
    assert torch.equal(sums[0]["clock_sum"], sums[-layers]["clock_sum"])
    # the last layer (by either index) is the default: the decoder's output, bit for bit
    last_ce, _ = _hand_clock_ce(model, batch)
    assert torch.equal(sums[-1]["clock_sum"], sums[layers - 1]["clock_sum"])
    assert float(sums[-1]["clock_sum"]) == pytest.approx(last_ce, rel=1e-5)
    assert abs(float(sums[0]["clock_sum"]) - last_ce) > 1e-3 * last_ce  # a different layer, a different loss
    assert torch.equal(sums[0]["ce_sum"], sums[-1]["ce_sum"])  # the slot CE is untouched
    with pytest.raises(ValueError, match="audio_clock_layer"):
        AlignerModule(model, AlignerConfig(audio_clock_weight=1.0, audio_clock_layer=layers), 1)


def test_weight_zero_is_exactly_the_slot_loss(setup):
    model, processor, tone = setup
    batch = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=0)(tone)
    off = AlignerModule(model, AlignerConfig(label_sigma_bins=1.0), 1)
    on = AlignerModule(model, AlignerConfig(label_sigma_bins=1.0, audio_clock_weight=0.3), 1)
    for m in (off, on):
        m.train()
    model.eval()
    with torch.no_grad():
        sums_off, sums_on = off.forward_sums(batch), on.forward_sums(batch)
    assert "clock_sum" not in sums_off
    scale = 1 / 7
    assert torch.equal(off.loss(sums_off, scale), sums_off["ce_sum"] * scale)  # bit for bit the old loss
    assert torch.equal(sums_on["ce_sum"], sums_off["ce_sum"])  # the clock does not touch the slot CE
    # with w > 0: slot CE per step + w x mean clock CE per audio token, weighted like the micro-batch's slots
    mean_clock = sums_on["clock_sum"] / sums_on["clock_n"]
    expected = sums_on["ce_sum"] * scale + 0.3 * mean_clock * sums_on["n_slots"] * scale
    assert float(on.loss(sums_on, scale)) == pytest.approx(float(expected), rel=1e-6)
    assert float(mean_clock) > 0
    # evaluation (eval mode) never computes the clock: validation numbers stay comparable across runs
    on.eval()
    with torch.no_grad():
        assert "clock_sum" not in on.forward_sums(batch)


def test_clock_fraction_labels_a_subset(setup):
    model, processor, tone = setup
    batch = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=0)(tone)
    module = AlignerModule(model, AlignerConfig(audio_clock_weight=1.0, audio_clock_fraction=0.25), 1)
    module.train()
    model.eval()
    total = int((batch["input_ids"] == model.config.audio_token_id).sum())
    with torch.no_grad():
        n = int(module.forward_sums(batch)["clock_n"])
    assert 0.1 * total < n < 0.4 * total, (n, total)


def test_config_rejects_bad_clock_settings():
    with pytest.raises(ValueError, match="audio_clock_weight"):
        AlignerConfig(audio_clock_weight=-1.0).validate()
    with pytest.raises(ValueError, match="audio_clock_fraction"):
        AlignerConfig(audio_clock_fraction=0.0).validate()
    with pytest.raises(ValueError, match="audio_clock_layer"):  # a layer for a loss that is off
        AlignerConfig(audio_clock_layer=0).validate()


@pytest.mark.slow  # ~20 CPU-s (a training run and an export)
def test_a_run_with_the_clock_logs_it_and_exports_the_stock_model(tmp_path):
    """Two training steps with the clock on: its loss and error are logged, and the export is the stock
    aligner (the same parameter names and shapes as a model built without it: nothing training-only leaks)."""
    manifest = write_tone_corpus(tmp_path / "tones", 8, seed=4)
    run_dir = tmp_path / "run"
    cfg = make_config(
        [
            "recipe=aligner",
            "model=tiny",
            f"model.num_labels={NUM_CLASSES}",
            f"data.train={manifest}",
            "trainer=cpu",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "data.max_batch_seconds=8",
            "recipe.audio_clock_weight=1.0",
            "recipe.label_sigma_bins=1.0",
            f"run_dir={run_dir}",
        ]
    )
    written = aligner_stage.run(cfg)
    rows = [r for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get("train/clock_loss")]
    assert rows and all(0 < float(r["train/clock_loss"]) < 20 for r in rows)
    assert all(float(r["train/clock_error_ms"]) >= 0 for r in rows)
    exported = AutoModelForTokenClassification.from_pretrained(written["export"])
    stock, _ = build_model(ModelConfig(source="tiny", task="aligner", num_labels=NUM_CLASSES), seed=0)
    assert {k: v.shape for k, v in exported.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
