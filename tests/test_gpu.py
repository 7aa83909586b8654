"""CUDA checks (``make test-gpu``; part of ``make gpu-check`` on a lent GPU machine). They skip without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen3asr_train.config.schema import ModelConfig
from qwen3asr_train.data.prompts import asr_prompt
from qwen3asr_train.model.builder import build_model
from qwen3asr_train.stages import sft
from tests.conftest import make_config, tiny_sft_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_logits_match_cpu_fp32():
    """The same tiny model and batch on CUDA (fp32) and on the CPU: the kernels differ, the numbers must not."""
    model, processor = build_model(ModelConfig(source="tiny"), seed=0)
    model.eval()
    rng = np.random.default_rng(0)
    audio = [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in (0.93, 2.61)]
    batch = processor(text=[asr_prompt()] * 2, audio=audio)
    with torch.no_grad():
        cpu = model(**batch).logits
        gpu = model.cuda()(**{k: v.cuda() for k, v in batch.items()}).logits.cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4), float((cpu - gpu).abs().max())


def test_bf16_mixed_sft_steps_on_cuda_keep_fp32_weights(manifest_dir, tmp_path):
    cfg = make_config(
        tiny_sft_overrides(
            manifest_dir, tmp_path / "run", "trainer=gpu", "trainer.precision=bf16-mixed", "trainer.max_steps=3"
        )
    )
    out = sft.run(cfg)
    module_weights = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = module_weights["state_dict"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert "export" in out


def _metrics_steps(run_dir) -> dict[int, float]:
    """step -> train/loss from the run's metrics.csv (the CSV logger's rows with a loss)."""
    import csv

    with open(run_dir / "logs" / "metrics.csv", newline="") as handle:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")}


STRATEGIES = [
    pytest.param("fsdp", id="fsdp"),
    pytest.param("deepspeed_zero2", id="zero2"),
    pytest.param("deepspeed_zero3", id="zero3"),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_strategy_two_steps_then_resume_on_one_gpu(strategy, manifest_dir, tmp_path):
    """Two bf16-mixed steps under the strategy on one GPU, a checkpoint, then a resumed run to step 4: the
    resumed run continues the step count and every logged loss is finite."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    run = tmp_path / "run"
    common = [f"trainer={strategy}", "trainer.devices=1", "trainer.checkpoint_every_n_steps=2"]
    sft.run(make_config(tiny_sft_overrides(manifest_dir, run, *common, "trainer.max_steps=2")))
    assert (run / "checkpoints" / "last.ckpt").exists()
    first = _metrics_steps(run)
    assert len(first) == 2, first
    sft.run(
        make_config(tiny_sft_overrides(manifest_dir, run, *common, "trainer.max_steps=4", "recipe.resume_from=last"))
    )
    steps = _metrics_steps(run)
    keys = sorted(steps)
    assert len(keys) == 4 and keys == list(range(keys[0], keys[0] + 4)), steps  # continued, not restarted
    assert all(np.isfinite(v) for v in steps.values())
    assert {k: steps[k] for k in first} == first  # the first run's rows are kept, not recomputed


def test_flash_attention_varlen_packing_equals_the_padded_batch():
    """flash-attention-2 on a packed batch (varlen: cu_seq_lens) gives the padded batch's loss and gradients
    (bf16 autocast on both sides; tolerance for bf16 and the different reduction order)."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    packing = pytest.importorskip("qwen3asr_train.data.packing", reason="no packing module")
    from qwen3asr_train.data.collate import SFTCollator, SFTOptions
    from qwen3asr_train.losses import target_token_ce
    from qwen3asr_train.training import backbone_hidden
    from tests.test_collate import samples

    model, processor = build_model(ModelConfig(source="tiny", attn_implementation="flash_attention_2"), seed=0)
    model = model.cuda().train()
    padded = SFTCollator(processor, SFTOptions())(samples())
    packed = packing.pack_batch(padded)

    def loss_and_grads(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = backbone_hidden(model, batch)
            loss, _ = target_token_ce(out.last_hidden_state, batch["labels"], model.lm_head)
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach().float(), grads

    loss_a, grads_a = loss_and_grads(padded)
    loss_b, grads_b = loss_and_grads(packed)
    assert torch.allclose(loss_a, loss_b, rtol=2e-2), (float(loss_a), float(loss_b))
    for name, g in grads_a.items():
        scale = float(g.abs().max()) or 1.0
        assert float((g - grads_b[name]).abs().max()) <= 5e-2 * scale, name
