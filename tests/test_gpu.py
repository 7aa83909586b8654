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
