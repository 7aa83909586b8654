"""Padding-free packing: the packed batch computes exactly what the padded batch computes.

Independent references: the unpacked (padded) forward through the unchanged code path, hand-built row
plans, segment boundaries and masks, and a tiny SFT run's logged real-token fraction.

Tolerance: fp32 CPU. Packing changes the order of floating-point reductions (other matmul shapes, the
summation order of the loss), so losses agree to 1e-5 relative and gradients to 1e-5 × their largest value.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3asr_train import training
from qwen3asr_train.config.schema import AlignerConfig, DataConfig, ModelConfig, SFTConfig
from qwen3asr_train.data.aligner import AlignerCollator
from qwen3asr_train.data.audio import audio_tokens_for_frames
from qwen3asr_train.data.collate import IGNORE_INDEX, SFTCollator, SFTOptions
from qwen3asr_train.data.dataset import UtteranceDataset
from qwen3asr_train.data.manifest import RowChecks, read_manifest
from qwen3asr_train.data.packing import PackingCollator, pack_batch, packed_causal_mask, per_clip, plan_rows
from qwen3asr_train.data.prompts import ASR_TEXT, IM_END
from qwen3asr_train.data.sampler import DurationWindowSampler
from qwen3asr_train.languages import LanguageTable
from qwen3asr_train.losses import slot_ce
from qwen3asr_train.model.builder import build_model
from qwen3asr_train.stages import sft
from qwen3asr_train.stages.aligner import AlignerModule
from qwen3asr_train.tools.synthetic import write_tone_corpus
from tests.conftest import make_config, tiny_sft_overrides
from tests.test_collate import samples

RTOL = 1e-5


# ------------------------------------------------------------------------------------------ layout


def test_plan_rows_is_first_fit_decreasing():
    # lengths 5, 9, 3, 4, 6 in rows of 10: 9 -> row A; 6 -> row B; 5 -> B is full (6+5 > 10) -> row C;
    # 4 -> B (6+4); 3 -> C (5+3). Rows keep original order inside, ordered by their first index.
    assert plan_rows([5, 9, 3, 4, 6], 10) == [[0, 2], [1], [3, 4]]
    assert plan_rows([5, 9, 3], 0) == [[0, 1, 2]]  # no budget: one row
    assert plan_rows([12, 2], 10) == [[0], [1]]  # longer than the budget: a row of its own


def _toy_batch() -> dict:
    """Three rows of 3, 5, 2 real tokens, right-padded to 5, with labels, 2 clips of features each."""
    ids = torch.tensor([[11, 12, 13, 0, 0], [21, 22, 23, 24, 25], [31, 32, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.where(ids % 2 == 1, ids, torch.full_like(ids, IGNORE_INDEX)) * mask + IGNORE_INDEX * (1 - mask)
    feats = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 4)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "input_features": feats,
        "input_features_mask": torch.ones(3, 4, dtype=torch.long),
        "ids": ["a", "b", "c"],
        "num_target_tokens": int((labels != IGNORE_INDEX).sum()),
    }


def test_pack_batch_layout_matches_a_hand_construction():
    batch = _toy_batch()
    packed = pack_batch(batch, max_tokens=7)  # plan: 5 -> row A; 3 -> row B; 2 -> A (5+2): [[0], [1, 2]]? no:
    # first-fit decreasing places 5 (row 1) first, then 3 (new row), then 2 into the first row with room (5+2)
    assert plan_rows([3, 5, 2], 7) == [[0], [1, 2]]
    assert packed["input_ids"].tolist() == [[11, 12, 13, 0, 0, 0, 0], [21, 22, 23, 24, 25, 31, 32]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]
    assert packed["segment_ids"].tolist() == [[0, 0, 0, -1, -1, -1, -1], [1, 1, 1, 1, 1, 2, 2]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]]
    assert packed["cu_seq_lens"].tolist() == [0, 3, 7, 12, 14]  # clip a, padding tail, clip b, clip c
    assert packed["max_seq_len"] == 5
    assert packed["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 4
    assert sorted(packed["labels"][packed["labels"] != IGNORE_INDEX].tolist()) == sorted(
        batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()
    )
    assert packed["num_target_tokens"] == batch["num_target_tokens"]  # the loss normaliser is unchanged
    assert torch.equal(packed["input_features"], batch["input_features"])  # clip order a, b, c unchanged here
    clips = per_clip(packed, packed["input_ids"])
    assert [c.tolist() for c in clips] == [[11, 12, 13], [21, 22, 23, 24, 25], [31, 32]]


def test_features_follow_the_clip_order_of_the_packed_rows():
    batch = _toy_batch()
    packed = pack_batch(batch, max_tokens=5)  # [[0, 2], [1]]: row-major clip order a, c, b
    assert plan_rows([3, 5, 2], 5) == [[0, 2], [1]]
    assert torch.equal(packed["input_features"], batch["input_features"][[0, 2, 1]])
    assert packed["ids"] == ["a", "c", "b"]
    clips = per_clip(packed, packed["input_ids"])
    assert [c.tolist() for c in clips] == [[11, 12, 13], [31, 32], [21, 22, 23, 24, 25]]


def test_packed_mask_is_block_diagonal_and_causal():
    segments = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = packed_causal_mask(segments)[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(6):
        for j in range(i + 1):
            expected[i, j] = segments[0, i] == segments[0, j]
    assert torch.equal(mask, expected)


# ------------------------------------------------------------------------------- SFT: loss and gradients


def _sums_and_grads(module, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    sums = module.forward_sums(batch)
    loss = sums["ce_sum"] + sums.get("ctc_sum", torch.zeros(()))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in sums.items()}, grads


def _assert_same(ref: tuple, got: tuple) -> None:
    ref_sums, ref_grads = ref
    sums, grads = got
    for key, value in ref_sums.items():
        assert sums[key] == pytest.approx(value, rel=RTOL, abs=1e-6), key
    assert ref_grads.keys() == grads.keys()
    for name, g in ref_grads.items():
        scale = float(g.abs().max()) + 1e-12
        assert float((grads[name] - g).abs().max()) <= RTOL * scale + 1e-8, name


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def sft_module(request):
    model, processor = build_model(ModelConfig(source="tiny", attn_implementation=request.param), seed=0)
    model.eval()  # no dropout: both computations see the same function
    tok = processor.tokenizer
    recipe = SFTConfig(ctc_weight=0.5, ce_chunk_tokens=0)
    module = sft.SFTModule(
        model, recipe, 1, tok.pad_token_id, tok.convert_tokens_to_ids(ASR_TEXT), tok.convert_tokens_to_ids(IM_END)
    )
    return module, processor


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("budget", [0, 140])
def test_sft_packed_equals_unpacked_with_ctc(sft_module, side, budget):
    module, processor = sft_module
    batch = SFTCollator(processor, SFTOptions(padding_side=side, context_prob=1.0))(samples())
    packed = pack_batch(batch, budget)
    if budget:  # several rows, two clips in a row, padding tails, and the clips in another order
        rows = plan_rows(batch["attention_mask"].sum(-1).tolist(), budget)
        assert len(rows) > 1 and max(len(r) for r in rows) > 1, rows
        assert [i for r in rows for i in r] != sorted(i for r in rows for i in r), rows
        assert int(packed["attention_mask"].sum()) < packed["attention_mask"].numel()
    assert packed["input_ids"].shape[1] < batch["input_ids"].shape[1] * batch["input_ids"].shape[0]
    ref = _sums_and_grads(module, batch)
    got = _sums_and_grads(module, packed)
    assert ref[0]["ctc_sum"] > 0 and ref[0]["n_tokens"] == batch["num_target_tokens"]
    _assert_same(ref, got)


def test_sft_packed_equals_unpacked_with_chunked_ce(sft_module):
    module, processor = sft_module
    batch = SFTCollator(processor, SFTOptions())(samples())
    ref = _sums_and_grads(module, batch)
    module.recipe.ce_chunk_tokens = 3
    try:
        got = _sums_and_grads(module, pack_batch(batch))
    finally:
        module.recipe.ce_chunk_tokens = 0
    _assert_same(ref, got)


# --------------------------------------------------------------------------- aligner: slot_ce, gradients

NUM_CLASSES = 64


@pytest.fixture(scope="module")
def aligner_setup(tmp_path_factory):
    model, processor = build_model(ModelConfig(source="tiny", task="aligner", num_labels=NUM_CLASSES), seed=0)
    model.eval()
    manifest = write_tone_corpus(tmp_path_factory.mktemp("tones"), num=6, seed=5, words_per_clip=(2, 5))
    dataset = UtteranceDataset(read_manifest(manifest, RowChecks(LanguageTable())))
    return model, processor, [dataset.load(i) for i in range(len(dataset))]


def _slot_ce_and_grads(model, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = training.backbone_hidden(model, batch)
    ce, n, predicted = slot_ce(out.last_hidden_state, batch["labels"], lambda h: model.score(model.dropout(h)))
    ce.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"ce_sum": float(ce), "n_slots": float(n)}, grads


@pytest.mark.parametrize("budget", [0, 60])
def test_aligner_packed_equals_unpacked(aligner_setup, budget):
    model, processor, tone = aligner_setup
    collator = AlignerCollator(processor, NUM_CLASSES, slot_prob=0.7, seed=0)  # left padding, as inference
    batch = collator(tone)
    if budget:  # several rows of two clips each, in another order than the padded batch's
        rows = plan_rows(batch["attention_mask"].sum(-1).tolist(), budget)
        assert len(rows) > 1 and min(len(r) for r in rows) > 1, rows
        assert [i for r in rows for i in r] != sorted(i for r in rows for i in r), rows
    ref = _slot_ce_and_grads(model, batch)
    got = _slot_ce_and_grads(model, PackingCollator(collator, budget)(tone))
    assert ref[0]["n_slots"] == batch["num_slots"] > 0
    _assert_same(ref, got)


def test_aligner_module_sums_are_unchanged_by_packing(aligner_setup):
    """The aligner stage's own forward_sums (slot CE, accuracy, bin error) on a packed batch."""
    model, processor, tone = aligner_setup
    module = AlignerModule(model, AlignerConfig(), 1)
    collator = AlignerCollator(processor, NUM_CLASSES, slot_prob=1.0, seed=0)
    with torch.no_grad():
        ref = {k: float(v) for k, v in module.forward_sums(collator(tone)).items()}
        got = {k: float(v) for k, v in module.forward_sums(PackingCollator(collator)(tone)).items()}
    assert got == pytest.approx(ref, rel=RTOL)


# ------------------------------------------------------------------------------ real-token fraction


def test_packed_sft_run_logs_all_tokens_real(manifest_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_config(
        tiny_sft_overrides(
            manifest_dir, run_dir, "data.packing=true", "trainer.max_steps=2", "recipe.export_on_end=false"
        )
    )
    module, datamodule, trainer, _ = sft.prepare(cfg)
    training.fit(trainer, module, datamodule=datamodule)
    rows = list(csv.DictReader(Path(run_dir / "logs" / "metrics.csv").open()))
    fractions = [float(r["train/real_token_fraction"]) for r in rows if r.get("train/real_token_fraction")]
    assert fractions and all(f == 1.0 for f in fractions)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


# ------------------------------------------------------------- real-token share of the default sampler plan


def _decoder_tokens(seconds: float) -> int:
    """Decoder tokens of one SFT row, counted as the collator builds it: the chat prompt around the audio
    (15 tokens with the Qwen tokenizer), the audio placeholders (the encoder's count for the clip's 10-ms
    frames), and the target ``language X<asr_text>`` (3-5) + text (about 3 tokens per second of speech) +
    ``<|im_end|>``."""
    return 15 + audio_tokens_for_frames(int(round(seconds * 100))) + 5 + int(3 * seconds) + 1


def test_default_buckets_keep_nine_tenths_of_decoder_tokens_real_without_packing():
    """2,000 clips, log-normal durations (median 5.8 s) clipped to 1-30 s, through the default sampler plan."""
    rng = np.random.default_rng(0)
    durations = np.clip(rng.lognormal(math.log(5.8), 0.8, 2000), 1.0, 30.0).tolist()
    tokens = [_decoder_tokens(d) for d in durations]

    def share(num_buckets: int) -> tuple[float, float]:
        d = DataConfig()
        plan = DurationWindowSampler(durations, d.max_batch_seconds, d.max_batch_size, num_buckets=num_buckets)
        batches = plan.micro_batches(0)
        real = [sum(tokens[i] for i in b) for b in batches]
        padded = [len(b) * max(tokens[i] for i in b) for b in batches]
        return sum(real) / sum(padded), min(r / p for r, p in zip(real, padded, strict=True))

    total, worst = share(DataConfig().num_buckets)
    assert total >= 0.90, total
    assert worst >= 0.80, worst
    assert share(8)[0] < 0.90  # the old default (8 buckets) did not reach it: the measurement discriminates


def test_aligner_ctc_is_per_clip_under_packing(aligner_setup):
    """The aligner's auxiliary CTC (training only) sees each clip's words and audio, packed or not."""
    model, processor, tone = aligner_setup
    tok = processor.tokenizer
    markers = ["<|audio_start|>", "<|audio_pad|>", "<|audio_end|>", "<timestamp>"]
    special = [tok.pad_token_id, *tok.convert_tokens_to_ids(markers)]
    module = AlignerModule(model, AlignerConfig(ctc_weight=0.5), 1, special)
    module.train()
    model.eval()  # no dropout in the backbone: both computations see the same function
    collator = AlignerCollator(processor, NUM_CLASSES, slot_prob=0.7, seed=0)

    def run(batch):
        module.zero_grad(set_to_none=True)
        sums = module.forward_sums(batch)
        (sums["ce_sum"] + sums["ctc_sum"]).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        return {k: float(v) for k, v in sums.items()}, grads

    ref = run(collator(tone))
    assert ref[0]["ctc_sum"] > 0
    for budget in (0, 60):
        _assert_same(ref, run(PackingCollator(collator, budget)(tone)))
