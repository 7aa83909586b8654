"""The memory estimator (``qwen3asr_train/memory.py``, ``make memory``) against independent counts."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3ASRForConditionalGeneration

from qwen3asr_train import memory

TINY = dict(
    encoder_layers=1,
    d_model=16,
    encoder_attention_heads=2,
    encoder_ffn_dim=32,
    output_dim=24,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    downsample_hidden_size=4,
)
VOCAB = 512


def hand_count(s: dict[str, int], vocab: int) -> int:
    """Parameters of the Qwen3-ASR architecture written out from its module list (tied head counted once)."""
    d, f, c, o = s["d_model"], s["encoder_ffn_dim"], s["downsample_hidden_size"], s["output_dim"]
    h, i, hd = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    nh, kv = s["num_attention_heads"], s["num_key_value_heads"]
    conv = (9 * c + c) + 2 * (9 * c * c + c) + c * (memory.MEL_BINS // 8) * d  # 3 stride-2 convs + conv_out
    enc_layer = 4 * (d * d + d) + 2 * (2 * d) + (d * f + f) + (f * d + d)  # attention, 2 LayerNorms, MLP
    encoder = conv + s["encoder_layers"] * enc_layer + 2 * d  # + ln_post
    projector = (d * d + d) + (d * o + o)
    dec_layer = h * nh * hd + 2 * h * kv * hd + nh * hd * h + 2 * hd + 3 * h * i + 2 * h
    decoder = vocab * h + s["num_hidden_layers"] * dec_layer + h
    return encoder + projector + decoder


def test_parameter_count_is_the_meta_model_count_and_the_hand_count():
    config = memory.asr_config(TINY, vocab=VOCAB)
    counted = memory.parameter_count(config)
    built = Qwen3ASRForConditionalGeneration(config)  # a real (CPU) model of the same config
    assert counted["total"] == sum(p.numel() for p in built.parameters()) == hand_count(TINY, VOCAB)
    assert counted["embedding"] == VOCAB * TINY["hidden_size"]


@pytest.mark.parametrize("size", ["0.6B", "1.7B"])
def test_real_parameter_counts_match_the_hand_count(size):
    counted = memory.parameter_count(memory.asr_config(memory.REAL_SIZES[size]))
    assert counted["total"] == hand_count({**memory.REAL_SIZES[size], "downsample_hidden_size": 480}, memory.VOCAB)


@pytest.mark.parametrize("autocast", [False, True])
def test_saved_bytes_by_hooks_equal_the_graph_walk(autocast):
    """Two independent counts of what autograd keeps: saved-tensor hooks vs the graph's saved attributes."""
    torch.manual_seed(0)
    model = Qwen3ASRForConditionalGeneration(memory.asr_config(TINY, vocab=VOCAB)).train()
    batch = memory.make_batch(memory.Sample(2.37, 18, 11), VOCAB)
    hooks = memory.saved_bytes(model, batch, autocast=autocast, method="hooks")
    graph = memory.saved_bytes(model, batch, autocast=autocast, method="graph")
    assert hooks == graph > 0


def test_saved_tensor_counter_hand_count():
    """A two-layer MLP in fp32: Linear saves its input, GELU its input, the second Linear its input."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x = torch.randn(5, 8, requires_grad=True)
    with memory.saved_tensor_counter(list(mlp.parameters())) as counted:
        mlp(x).sum()
    # x (5x8) + pre-GELU (5x32) + post-GELU (5x32), fp32; the weights are excluded
    assert counted["bytes"] == 4 * (5 * 8 + 5 * 32 + 5 * 32)


def test_rates_reproduce_a_direct_measurement_of_a_longer_clip():
    """Rates measured on 1-2-layer models, extrapolated to 3 decoder / 2 encoder layers, predict the bytes of a
    3/2-layer model on another clip (up to the per-row constant, which the rates leave out)."""
    sizes = {**TINY, "encoder_layers": 2, "num_hidden_layers": 3}
    rates = memory.measure_rates(sizes, vocab=VOCAB)
    torch.manual_seed(0)
    model = Qwen3ASRForConditionalGeneration(memory.asr_config(sizes, vocab=VOCAB)).train()

    def direct(sample):
        return memory.saved_bytes(model, memory.make_batch(sample, VOCAB))

    a, b = memory.Sample(3.0, 20, 12), memory.Sample(9.0, 52, 40)
    measured = direct(b) - direct(a)
    predicted = rates.bytes(b.seconds - a.seconds, b.decoder_tokens() - a.decoder_tokens(), 40 - 12)
    assert predicted == pytest.approx(measured, rel=0.02)


def test_states_per_strategy():
    params = {"total": 1_000_000, "largest_layer": 10_000, "embedding": 50_000}
    opts = memory.StateOptions(gpus=4, ddp_bucket_view=False, zero_bucket_elements=0, zero3_live_elements=0)
    assert memory.states_bytes("1 GPU", params, opts) == 18e6
    assert memory.states_bytes("DDP", params, opts) == 22e6  # + DDP's separate fp32 gradient buckets
    assert memory.states_bytes("FSDP full shard", params, opts) == 16e6 / 4 + 6 * (50_000 + 2 * 10_000)
    assert memory.states_bytes("ZeRO-2", params, opts) == 2e6 + 14e6 / 4
    assert memory.states_bytes("ZeRO-3", params, opts) == 16e6 / 4
