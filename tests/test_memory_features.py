"""Memory and speed switches change nothing but memory and speed: chunked cross-entropy, gradient checkpointing
of the audio encoder (conv front-end included), torch.compile, fused AdamW, DDP bucket views; plus the MFU
arithmetic and the data-loader worker count.

Independent references: the unchunked / un-checkpointed / uncompiled computation, the bytes autograd saves
for backward (counted with saved-tensor hooks), torch's own FLOP counter, and hand arithmetic.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from qwen3asr_train import training
from qwen3asr_train.config.schema import ModelConfig, OptimConfig, TinyModelConfig, TrainerConfig
from qwen3asr_train.data.collate import SFTCollator, SFTOptions
from qwen3asr_train.losses import chunked_head_ce, target_token_ce
from qwen3asr_train.model.builder import build_model, checkpoint_audio_tower, compile_layers
from tests.conftest import make_config
from tests.test_collate import samples


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the ``with`` block (deduplicated by storage)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


# ------------------------------------------------------------------------------------ chunked CE


@pytest.mark.parametrize("n, chunk", [(37, 8), (37, 37), (37, 100), (0, 8)])
def test_chunked_ce_equals_full_ce_with_gradients(n, chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(n, 16, requires_grad=True)
    target = torch.randint(0, 300, (n,))
    full = F.cross_entropy(head(hidden).float(), target, reduction="sum")
    full.backward()
    ref = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    chunked = chunked_head_ce(hidden, target, head, chunk)
    chunked.backward()
    assert float(chunked) == pytest.approx(float(full), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(hidden.grad, ref[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.weight.grad, ref[1], rtol=1e-5, atol=1e-7)


def test_chunked_ce_keeps_no_full_logits_for_backward():
    torch.manual_seed(0)
    n, vocab, chunk = 256, 4096, 32
    head = torch.nn.Linear(16, vocab, bias=False)
    hidden = torch.randn(n, 16, requires_grad=True)
    target = torch.randint(0, vocab, (n,))
    with SavedBytes() as plain:
        F.cross_entropy(head(hidden).float(), target, reduction="sum")
    with SavedBytes() as chunked:
        chunked_head_ce(hidden, target, head, chunk)
    logits_bytes = n * vocab * 4
    assert plain.total >= logits_bytes  # the unchunked loss keeps the (N, V) fp32 log-probabilities
    assert chunked.total < logits_bytes / 8  # chunked: the (N, H) input and the targets only


def test_target_token_ce_chunking_is_exact_on_the_model(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batch = SFTCollator(processor, SFTOptions())(samples())
    hidden = model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        input_features=batch["input_features"],
        input_features_mask=batch["input_features_mask"],
    ).last_hidden_state.detach()
    full, n_full = target_token_ce(hidden, batch["labels"], model.lm_head)
    chunked, n_chunked = target_token_ce(hidden, batch["labels"], model.lm_head, chunk_tokens=5)
    assert int(n_full) == int(n_chunked) == batch["num_target_tokens"]
    assert float(chunked) == pytest.approx(float(full), rel=1e-6)


# ------------------------------------------------------------------------ gradient checkpointing


def _loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = training.backbone_hidden(model, batch)
    loss, _ = target_token_ce(out.last_hidden_state, batch["labels"], model.lm_head)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_with_the_conv_front_end_changes_no_result():
    plain, processor = build_model(ModelConfig(source="tiny"), seed=0)
    checkpointed, _ = build_model(ModelConfig(source="tiny", gradient_checkpointing=True), seed=0)
    batch = SFTCollator(processor, SFTOptions())(samples())
    for model in (plain, checkpointed):
        model.train()
    assert checkpointed.model.audio_tower._qwen3asr_train_checkpointed
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    loss, grads = _loss_and_grads(checkpointed, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-9, msg=name)


def test_audio_tower_checkpoint_keeps_only_its_input():
    """HF checkpoints the encoder layers but not the convolutions before them; wrapped, the encoder saves
    (about) nothing but the mel features it was given."""
    model, processor = build_model(ModelConfig(source="tiny", tiny=TinyModelConfig(downsample_hidden_size=32)), seed=0)
    model.train()
    batch = SFTCollator(processor, SFTOptions())(samples())
    features = batch["input_features"].requires_grad_(False)
    tower = model.model.audio_tower
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with SavedBytes() as layers_only:
        tower(input_features=features, input_features_mask=batch["input_features_mask"])
    checkpoint_audio_tower(model)
    with SavedBytes() as whole:
        out = tower(input_features=features, input_features_mask=batch["input_features_mask"])
    conv_maps = features.shape[0] * 32 * 64 * (features.shape[-1] // 2) * 4  # first conv's fp32 output
    assert layers_only.total > conv_maps  # the conv maps were kept
    assert whole.total < conv_maps / 4  # now only the input (and its mask) are
    out.last_hidden_state.sum().backward()  # and backward still reaches the conv weights
    assert tower.conv2d1.weight.grad is not None and float(tower.conv2d1.weight.grad.abs().sum()) > 0


def test_gpu_model_configs_turn_gradient_checkpointing_on():
    base = ["recipe=sft", "data.train=x.jsonl", "run_dir=/tmp/unused", "trainer.max_steps=1"]
    for name in ("qwen3_asr_0.6b", "qwen3_asr_1.7b"):
        assert make_config([*base, f"model={name}"]).model.gradient_checkpointing, name
    assert not make_config([*base, "model=tiny"]).model.gradient_checkpointing


# ------------------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compiled_layers_give_the_same_loss_and_gradients():
    plain, processor = build_model(ModelConfig(source="tiny"), seed=0)
    compiled, _ = build_model(ModelConfig(source="tiny", compile=True, compile_backend="aot_eager"), seed=0)
    batch = SFTCollator(processor, SFTOptions())(samples())
    assert set(compiled.state_dict()) == set(plain.state_dict())  # in place: checkpoints are unchanged
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    loss, grads = _loss_and_grads(compiled, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_compile_with_an_unknown_backend_is_a_clear_error(tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    with pytest.raises(RuntimeError, match="compile_backend='no-such-backend'"):
        compile_layers(model, "no-such-backend")


# -------------------------------------------------------------------------- optimizer, strategy


def test_adamw_is_fused_only_on_cuda():
    module = torch.nn.Linear(4, 4)
    module.trainer = None
    opt = training.build_optimizer(module, OptimConfig(), 10)["optimizer"]
    assert not opt.defaults.get("fused")  # CPU: unchanged
    if torch.cuda.is_available():
        cuda_opt = training.build_optimizer(module.cuda(), OptimConfig(), 10)["optimizer"]
        assert cuda_opt.defaults["fused"] is True


def test_ddp_keeps_gradients_in_the_buckets():
    strategy = training.build_strategy(TrainerConfig(strategy="ddp"), torch.nn.Linear(2, 2))
    assert strategy._ddp_kwargs["gradient_as_bucket_view"] is True
    assert strategy._ddp_kwargs["find_unused_parameters"] is False


# ---------------------------------------------------------------------------------- MFU arithmetic


def test_model_flops_match_torch_flop_counter(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    flops = training.ModelFlops.from_model(model)
    tower = model.model.audio_tower
    chunk = torch.randn(1, 1, tower.config.num_mel_bins, 2 * tower.config.n_window)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.gelu(tower.conv2d3(tower.conv2d2(tower.conv2d1(chunk))))
    conv_counted = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    assert flops.conv_per_chunk == pytest.approx(conv_counted)
    # parameter counts by part, counted another way: every parameter is in exactly one part, or is an embedding
    lm = model.model.language_model
    n_embed = lm.embed_tokens.weight.numel()
    conv_params = sum(p.numel() for c in (tower.conv2d1, tower.conv2d2, tower.conv2d3) for p in c.parameters())
    total_unique = sum(p.numel() for p in model.parameters())  # the tied head is counted once here
    assert flops.decoder + flops.encoder + conv_params + n_embed == total_unique
    assert flops.head == model.lm_head.weight.numel()
    assert flops(10, 2, 5, 1) == 6 * flops.decoder * 10 + 6 * flops.head * 2 + 6 * flops.encoder * 5 + (
        3 * flops.conv_per_chunk
    )


def test_batch_counts_come_from_the_collator(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batch = SFTCollator(processor, SFTOptions())(samples())
    assert batch["num_real_tokens"] == int(batch["attention_mask"].sum())
    assert batch["num_audio_tokens"] == int((batch["input_ids"] == model.config.audio_token_id).sum())
    frames = batch["input_features_mask"].sum(-1)
    assert batch["num_audio_chunks"] == int(((frames + 99) // 100).sum())


def test_mfu_is_model_flops_over_whole_step_time_and_peak():
    """Fake clock and a configured peak: 2 micro-batches of 3e12 FLOPs, a 4-s step, 2 ranks of 1 TFLOP/s."""
    now = [0.0]
    norm = training.StepNormaliser(clock=lambda: now[0])
    trainer = SimpleNamespace(
        world_size=2,
        accumulate_grad_batches=2,
        is_last_batch=False,
        optimizers=[SimpleNamespace(param_groups=[{"lr": 1.0}])],
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    module = SimpleNamespace(trainer=trainer, device=torch.device("cpu"))
    metrics = []
    for step in range(2):
        for micro in range(2):
            norm.observe(module, {"position": (0, 2 * step + micro), "window_size": 2, "window_target_tokens": 4})
            norm.add(audio=5.0, real=90, seq=100, skipped=0, model_flops=3e12)
            now[0] += 1.0
        t, elapsed = norm.totals(module)
        metrics.append(training.throughput_metrics(t, elapsed, trainer, peak_tflops=1.0))
        now[0] += 2.0  # backward + optimizer step after the statistics are taken
    m = metrics[1]  # a window with a previous boundary: 4 s
    assert m["train/step_seconds"] == pytest.approx(4.0)
    assert m["train/model_tflops_per_s"] == pytest.approx(6.0 / 4.0)
    assert m["train/mfu"] == pytest.approx(6e12 / 4.0 / (1e12 * 2))
    assert m["train/real_token_fraction"] == pytest.approx(0.9)
    assert m["train/audio_s_per_s"] == pytest.approx(10.0 / 4.0)
    no_peak = training.throughput_metrics(t, elapsed, trainer)  # CPU without a configured peak: no MFU
    assert "train/mfu" not in no_peak and "train/model_tflops_per_s" in no_peak


def test_peak_flops_table_matches_by_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert training.peak_flops(torch.device("cuda", 0)) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert training.peak_flops(torch.device("cuda", 0)) == 989e12
    assert training.peak_flops(torch.device("cuda", 0), override_tflops=500.0) == 500e12
    assert training.peak_flops(torch.device("cpu")) is None


# ---------------------------------------------------------------------------------- data loader


def test_worker_count_follows_the_cores_per_local_rank():
    # 96 cores, 8 GPUs: 12 per rank -> capped at 8; 16 cores, 4 ranks -> 4 - 1 = 3; 2 cores, 1 rank -> 1
    assert training.resolve_num_workers("auto", local_ranks=8, cores=96) == 8
    assert training.resolve_num_workers("auto", local_ranks=4, cores=16) == 3
    assert training.resolve_num_workers("auto", local_ranks=1, cores=2) == 1
    assert training.resolve_num_workers("auto", local_ranks=2, cores=2) == 0  # no core to spare: main process
    assert training.resolve_num_workers(3) == training.resolve_num_workers("3") == 3
    assert training.resolve_num_workers("auto") == max(0, min(8, training.node_cores() - 1))
    with pytest.raises(ValueError, match="data.num_workers"):
        training.resolve_num_workers("many")
    assert training.resolve_prefetch_factor("auto", 0) is None
    assert training.resolve_prefetch_factor("auto", 1) == 8
    assert training.resolve_prefetch_factor("auto", 3) == 3  # ceil(8 / 3)
    assert training.resolve_prefetch_factor("auto", 8) == 2
    assert training.resolve_prefetch_factor(5, 2) == 5
    assert training.local_ranks(TrainerConfig(devices=4)) == 4
    assert training.local_ranks(TrainerConfig(devices=[0, 1])) == 2
    assert training.local_ranks(TrainerConfig(accelerator="cpu", devices="auto")) == 1
