"""recipes/demo_sft/step_cost.py: the demo's step profiler runs on a small corpus and reports sane per-step numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("demo_step_cost", REPO / "recipes" / "demo_sft" / "step_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # builds the demo's small model and runs 5 steps (~80 s on a loaded 2-core machine)
def test_step_cost_measures_data_and_model_separately(manifest_dir):
    step_cost = _load_script()
    result = step_cost.measure(manifest_dir, ["data.max_batch_seconds=6", "data.augment.speed_prob=0"], 2, False)
    # CPU clocks only move forward; the model's forward/backward costs something measurable
    assert min(v for k, v in result.items() if k.endswith("_s_per_step")) >= 0.0
    assert result["model_user_s_per_step"] > 0.0
    # the sampler's bound (no speed perturbation: audio seconds are the manifest's): <= 6 s per micro-batch,
    # one micro-batch per step (no accumulation in the demo)
    assert 0.0 < result["audio_s_per_step"] <= 6.0 + 1e-6
    # clips of 0.6-2.5 s are padded to whole 1-s chunks: some frames are padding, never all of them
    assert 0.0 < result["padded_frame_fraction"] < 1.0
