"""Aligner stage: slot loss, initialisation from ASR, end-to-end run, export decoded by plain transformers."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3asr_train.config.base import ConfigError
from qwen3asr_train.config.schema import ModelConfig
from qwen3asr_train.data.aligner import AlignerCollator
from qwen3asr_train.data.datamodule import row_checks
from qwen3asr_train.data.dataset import UtteranceDataset
from qwen3asr_train.data.manifest import read_manifest
from qwen3asr_train.losses import gaussian_bin_targets, hard_slot_weights, slot_ce, timestamp_ce
from qwen3asr_train.model.builder import build_model
from qwen3asr_train.model.export import save_native, save_original
from qwen3asr_train.stages import aligner as aligner_stage
from qwen3asr_train.stages import evaluate as eval_stage
from qwen3asr_train.tools.synthetic import write_tone_corpus
from tests.conftest import make_config

NUM_CLASSES = 64


@pytest.fixture(scope="module")
def tone_manifest(tmp_path_factory) -> Path:
    return write_tone_corpus(tmp_path_factory.mktemp("tones"), 16, seed=4)


def _samples(manifest: Path, cfg_data):
    data = UtteranceDataset(read_manifest(manifest, row_checks(cfg_data)))
    return [data.load(i) for i in range(len(data))]


def _module_and_batch(manifest: Path, run_dir: Path, *overrides: str):
    """The aligner module of a one-step run with ``overrides`` and a batch of 3 tone clips, every word slotted."""
    cfg = make_config(
        [
            "recipe=aligner",
            "model=tiny",
            f"model.num_labels={NUM_CLASSES}",
            f"data.train={manifest}",
            "recipe.slot_prob=1.0",
            "trainer.max_steps=1",
            f"run_dir={run_dir}",
            *overrides,
        ]
    )
    module, _, _, processor = aligner_stage.prepare(cfg)
    samples = _samples(manifest, cfg.data)[:3]
    return module, processor, samples, AlignerCollator(processor, NUM_CLASSES, 1.0, seed=0)(samples)


def test_slot_loss_equals_full_logits_timestamp_loss(tone_manifest, tmp_path):
    cfg = make_config(
        [
            "recipe=aligner",
            "model=tiny",
            f"model.num_labels={NUM_CLASSES}",
            f"data.train={tone_manifest}",
            "trainer.max_steps=1",
            f"run_dir={tmp_path}",
        ]
    )
    model, processor = build_model(cfg.model, seed=0)
    model.eval()
    batch = AlignerCollator(processor, NUM_CLASSES, 0.6, seed=0)(_samples(tone_manifest, cfg.data)[:4])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "input_features", "input_features_mask")}
    with torch.no_grad():
        full = model(**inputs).logits
        hidden = model.model(**inputs).last_hidden_state
    ref_sum, ref_n = timestamp_ce(full, batch["labels"])
    ours_sum, ours_n, _ = slot_ce(hidden, batch["labels"], lambda h: model.score(model.dropout(h)))
    assert int(ref_n) == int(ours_n) == batch["num_slots"]
    assert torch.allclose(ours_sum, ref_sum, atol=1e-5)


def test_soft_bin_targets_match_a_hand_computation():
    """Gaussian soft targets against an explicit loop over bins, and the soft loss against its definition."""
    torch.manual_seed(0)
    num_classes, sigma = 12, 1.5
    target = torch.tensor([0, 5, 11])
    q = gaussian_bin_targets(target, num_classes, sigma)
    for row, y in enumerate(target.tolist()):
        weights = [math.exp(-((c - y) ** 2) / (2 * sigma**2)) for c in range(num_classes)]
        expected = [w / sum(weights) for w in weights]
        assert q[row].tolist() == pytest.approx(expected, abs=1e-6)
        assert int(q[row].argmax()) == y
    hidden = torch.randn(2, 7, 4)
    labels = torch.full((2, 7), -100)
    labels[0, 3], labels[1, 1], labels[1, 6] = 2, 9, 4
    head = torch.nn.Linear(4, num_classes)
    soft_sum, n, _ = slot_ce(hidden, labels, head, sigma_bins=sigma)
    by_hand = 0.0
    for b, t in ((0, 3), (1, 1), (1, 6)):
        logp = torch.log_softmax(head(hidden[b, t]), -1)
        y = int(labels[b, t])
        w = torch.tensor([math.exp(-((c - y) ** 2) / (2 * sigma**2)) for c in range(num_classes)])
        by_hand -= float((w / w.sum() * logp).sum())
    assert int(n) == 3 and float(soft_sum) == pytest.approx(by_hand, rel=1e-5)
    # a vanishing width is the one-hot loss; the default (0) is exactly F.cross_entropy
    hard_sum, _, _ = slot_ce(hidden, labels, head)
    tiny_sum, _, _ = slot_ce(hidden, labels, head, sigma_bins=1e-3)
    assert float(tiny_sum) == pytest.approx(float(hard_sum), rel=1e-5)
    assert float(soft_sum) != pytest.approx(float(hard_sum), rel=1e-3)


def test_hard_slot_weights_follow_the_expected_bin_distance_by_hand():
    """``slot_hard_weight``: each slot's CE times ``1 + a * min(E_p|c - y|, 10)``, rescaled to mean 1, computed
    here from the probabilities by hand; 0 leaves the loss unchanged, and a far-off slot gets more gradient."""
    num_classes, alpha = 16, 1.0
    hidden = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 4], labels[1, 2] = 3, 8, 15
    head = torch.nn.Linear(4, num_classes)
    slots = ((0, 1), (0, 4), (1, 2))
    ces, distances = [], []
    for b, t in slots:
        logp = torch.log_softmax(head(hidden[b, t]).double(), -1)
        y = int(labels[b, t])
        ces.append(-float(logp[y]))
        distances.append(sum(math.exp(float(logp[c])) * abs(c - y) for c in range(num_classes)))
    raw = [1.0 + alpha * min(d, 10.0) for d in distances]
    by_hand = sum(c * w / (sum(raw) / len(raw)) for c, w in zip(ces, raw, strict=True))
    weighted, n, _ = slot_ce(hidden, labels, head, hard_weight=alpha)
    plain, _, _ = slot_ce(hidden, labels, head)
    assert int(n) == 3 and float(weighted) == pytest.approx(by_hand, rel=1e-5)
    assert float(plain) == pytest.approx(sum(ces), rel=1e-5)
    assert float(weighted) != pytest.approx(float(plain), rel=1e-4)
    # equally confident slots: the one peaked twelve bins from its label weighs more than the one a bin off
    logits = torch.zeros(2, num_classes)
    logits[0, 2], logits[1, 14] = 4.0, 4.0
    target = torch.tensor([3, 2])
    w = hard_slot_weights(logits, target, alpha)
    assert float(w.mean()) == pytest.approx(1.0) and float(w[1]) > 2 * float(w[0])


def test_aligner_ctc_targets_are_the_word_tokens(tone_manifest, tmp_path):
    """The auxiliary CTC uses each row's word tokens (tokenised word by word, as the slots split them),
    scored on the projected audio through the transposed input embeddings; off in eval mode."""
    module, processor, samples, batch = _module_and_batch(tone_manifest, tmp_path, "recipe.ctc_weight=0.5")
    module.train()
    sums = module.forward_sums(batch)
    tok = processor.tokenizer
    targets = [[t for w in s.utt.words for t in tok.encode(w.word, add_special_tokens=False)] for s in samples]
    with torch.no_grad():
        out = module.model.model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "input_features", "input_features_mask")}
        )
    logp = (out.audio_hidden_states @ module.model.model.get_input_embeddings().weight.T).log_softmax(-1)
    lengths = [(row == module.model.config.audio_token_id).sum().item() for row in batch["input_ids"]]
    expected, start = 0.0, 0
    for target, n in zip(targets, lengths, strict=True):
        expected += torch.nn.functional.ctc_loss(
            logp[start : start + n], torch.tensor(target), [n], [len(target)], blank=tok.pad_token_id, reduction="sum"
        ).item()
        start += n
    assert float(sums["ctc_sum"].detach()) == pytest.approx(expected, rel=1e-4)
    module.eval()
    assert "ctc_sum" not in module.forward_sums(batch)


def test_aligner_from_asr_checkpoint_keeps_backbone(tiny_model_and_processor, tmp_path):
    asr, processor = tiny_model_and_processor
    for layout, saver in (("native", save_native), ("original", save_original)):
        directory = saver(asr, processor, tmp_path / layout)
        aligner, proc = build_model(
            ModelConfig(source="pretrained", path=str(directory), task="aligner", num_labels=NUM_CLASSES)
        )
        assert aligner.score.out_features == NUM_CLASSES and not aligner.config.tie_word_embeddings
        for name, value in asr.model.state_dict().items():
            assert torch.equal(aligner.model.state_dict()[name], value), (layout, name)
        assert "<timestamp>" in proc.chat_template


PLAIN_ALIGNER = r"""
import json, sys
import soundfile as sf
from transformers import AutoProcessor, Qwen3ASRForTokenClassification
d, manifest = sys.argv[1], sys.argv[2]
assert not any(m.startswith("qwen3asr_train") for m in sys.modules)
processor = AutoProcessor.from_pretrained(d)
model = Qwen3ASRForTokenClassification.from_pretrained(d)
row = json.loads(open(manifest).readline())
audio, rate = sf.read(row["audio"], dtype="float32")
inputs, words = processor.prepare_forced_aligner_inputs(audio=[audio], transcript=[row["text"]], language="English")
logits = model(**inputs).logits
out = processor.decode_forced_alignment(logits, inputs["input_ids"], words, model.config.timestamp_token_id)
print("ALIGNED", json.dumps(out[0]))
"""


@pytest.mark.slow
def test_aligner_run_export_and_plain_transformers_decoding(tone_manifest, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_config(
        [
            "recipe=aligner",
            "model=tiny",
            f"model.num_labels={NUM_CLASSES}",
            f"data.train={tone_manifest}",
            "trainer=cpu",
            "trainer.max_steps=4",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "data.max_batch_seconds=8",
            "recipe.optim.lr=1e-3",
            "recipe.concat_max_seconds=5",
            f"+evaluation.sets.dev={tone_manifest}",
            "evaluation.every_n_steps=2",
            f"run_dir={run_dir}",
        ]
    )
    written = aligner_stage.run(cfg)
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    keys = set().union(*(r.keys() for r in rows))
    for key in (
        "train/loss",
        "train/slot_accuracy",
        "train/slot_error_ms",
        "val/dev/aas_ms",
        "val/dev/within_20ms",
        "val/dev/within_50ms",
        "val/dev/within_100ms",
        "val/dev/baseline_aas_ms",
    ):
        assert key in keys, key
    step_dir = run_dir / "eval" / "step-00000004"
    assert (step_dir / "alignments-dev.json").exists() and list((step_dir / "textgrids-dev").glob("*.TextGrid"))
    assert list((step_dir / "plots-dev").glob("*.png"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_ALIGNER, written["export"], str(tone_manifest)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    aligned = json.loads(proc.stdout.split("ALIGNED", 1)[1])
    first = json.loads(open(tone_manifest).readline())
    assert [w["text"] for w in aligned] == [w["word"] for w in first["words"]]
    assert all(w["start_time"] <= w["end_time"] for w in aligned)
    # recipe=eval on the export reports AAS per set and language
    metrics = eval_stage.run(
        make_config(
            [
                "recipe=eval",
                f"recipe.model_path={written['export']}",
                f"+recipe.sets.dev={tone_manifest}",
                f"run_dir={tmp_path / 'eval'}",
            ]
        )
    )
    assert "val/dev/aas_ms" in metrics and (tmp_path / "eval" / "alignment_summary.md").exists()


def test_subbin_targets_are_centred_on_the_exact_times(tone_manifest, tmp_path):
    """``recipe.label_subbin``: each slot's Gaussian is centred on its word boundary's time / 80 ms, taken from
    the manifest's words in slot order (row by row, start then end); the loss equals an explicit loop."""
    sigma = 1.0
    module, _, samples, batch = _module_and_batch(
        tone_manifest, tmp_path, f"recipe.label_sigma_bins={sigma}", "recipe.label_subbin=true"
    )
    centres = aligner_stage.slot_centres(batch["slotted_words"], NUM_CLASSES)
    by_hand = [t / 0.08 for s in samples for w in s.utt.words for t in (w.start, w.end)]  # every word slotted
    assert centres.tolist() == pytest.approx(by_hand, abs=1e-4)
    assert any(abs(c - round(c)) > 0.1 for c in by_hand)  # the tones' times are not on bin centres
    labels = batch["labels"][batch["labels"] != -100]
    assert (centres - labels).abs().max() <= 0.5 + 1e-4
    module.eval()  # no dropout, so the loss can be recomputed from the same hidden states
    sums = module.forward_sums(batch)
    with torch.no_grad():
        hidden = module.model.model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "input_features", "input_features_mask")}
        ).last_hidden_state
    logp = module.model.score(hidden[batch["labels"] != -100]).float().log_softmax(-1)
    expected = 0.0
    for row, y in enumerate(by_hand):
        w = torch.tensor([math.exp(-((c - y) ** 2) / (2 * sigma**2)) for c in range(NUM_CLASSES)])
        expected -= float((w / w.sum() * logp[row]).sum())
    assert float(sums["ce_sum"]) == pytest.approx(expected, rel=1e-5)
    # the discrete Gaussian's mean is the centre (away from the edges): the target says where inside the bin
    q = gaussian_bin_targets(torch.tensor([20.3]), NUM_CLASSES, sigma)
    assert float((q[0] * torch.arange(NUM_CLASSES)).sum()) == pytest.approx(20.3, abs=1e-4)
    head = module.model.score
    with pytest.raises(ValueError, match="need sigma_bins > 0"):
        slot_ce(hidden, batch["labels"], head, 0.0, centres=centres)
    with pytest.raises(ValueError, match="must round to its label"):
        slot_ce(hidden, batch["labels"], head, sigma, centres=centres + 1.0)
    with pytest.raises(ConfigError, match="label_subbin"):
        make_config(
            [
                "recipe=aligner",
                "model=tiny",
                f"data.train={tone_manifest}",
                "recipe.label_subbin=true",
                f"run_dir={tmp_path}",
            ]
        )
