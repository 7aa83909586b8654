"""Shared fixtures: a tiny model + processor, small manifests, and an in-process recipe runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

torch.set_num_threads(1)

from hydra import compose, initialize_config_dir  # noqa: E402

from qwen3asr_train.config.load import CONFIG_DIR, register_schemas, to_typed  # noqa: E402
from qwen3asr_train.config.schema import ModelConfig, RunConfig  # noqa: E402
from qwen3asr_train.testing import write_manifest  # noqa: E402

register_schemas()


def make_config(overrides: list[str]) -> RunConfig:
    """Compose the real Hydra config with overrides and build the typed view."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return to_typed(cfg)


@pytest.fixture(scope="session")
def tiny_model_and_processor():
    """A tiny ASR model (random weights) and its processor; do not mutate the model in tests."""
    from qwen3asr_train.model.builder import build_model

    model, processor = build_model(ModelConfig(source="tiny"), seed=0)
    model.eval()
    return model, processor


@pytest.fixture(scope="session")
def manifest_dir(tmp_path_factory) -> Path:
    """A directory with ``train.jsonl`` (12 clips) and ``dev.jsonl`` (4 clips) of tone audio."""
    directory = tmp_path_factory.mktemp("corpus")
    write_manifest(directory, num=12, seed=1, name="train.jsonl")
    write_manifest(directory, num=4, seed=2, name="dev.jsonl")
    return directory


def tiny_sft_overrides(manifest_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a fast tiny SFT run on CPU (``extra`` entries replace defaults with the same key)."""
    base = [
        "recipe=sft",
        "model=tiny",
        f"data.train={manifest_dir / 'train.jsonl'}",
        "data.num_workers=0",
        "data.max_batch_seconds=6",
        "trainer=cpu",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "recipe.optim.lr=1e-3",
        f"run_dir={run_dir}",
    ]
    merged = {o.split("=", 1)[0]: o for o in base}
    merged.update({o.split("=", 1)[0]: o for o in extra})
    return list(merged.values())
