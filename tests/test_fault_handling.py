"""Fault handling: preemption (SIGTERM/SIGUSR1 -> checkpoint + exit 143 -> resume_from=auto), the final
checkpoint and what an export says it holds, weights-only loading, non-finite steps, and damaged or
mismatched checkpoints. Every resume is compared with an uninterrupted run, bit for bit."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from qwen3asr_train.stages import export as export_stage
from qwen3asr_train.stages import sft
from qwen3asr_train.training import (
    CheckpointError,
    NonFiniteError,
    Preempted,
    checkpoint_step,
    fit,
    load_checkpoint_file,
)
from tests.conftest import make_config, tiny_sft_overrides

COMMON = (
    "trainer.max_steps=6",
    "trainer.accumulate_grad_batches=2",
    "data.max_batch_seconds=4",
    "recipe.export_on_end=false",
    "recipe.context_prob=0.5",
    "recipe.no_speech_prob=0.2",
)


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as handle:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(ckpt)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class SignalAt(L.Callback):
    """Sends ``signum`` to this process when the training step ``step`` starts (its first micro-batch)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step = step
        self.signum = signum
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def uninterrupted(manifest_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    sft.run(make_config(tiny_sft_overrides(manifest_dir, run_dir, *COMMON)))
    return run_dir


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_writes_checkpoint_exits_128_plus_signal_and_auto_resume_is_exact(
    manifest_dir, tmp_path, uninterrupted, signum
):
    part = tmp_path / "part"
    cfg = make_config(tiny_sft_overrides(manifest_dir, part, *COMMON, "trainer.checkpoint_every_n_steps=100"))
    module, datamodule, trainer, _ = sft.prepare(cfg, [SignalAt(3, signum)])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as info:
        fit(trainer, module, datamodule=datamodule)
    assert info.value.code == 128 + signum  # 143 for SIGTERM
    # the step in progress (step 3, two micro-batches) finishes; its end is the checkpoint
    assert info.value.step == 4 and checkpoint_step(part / "checkpoints" / "last.ckpt") == 4
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored after the run
    assert not (part / "export").exists()
    written = sft.run(make_config(tiny_sft_overrides(manifest_dir, part, *COMMON, "recipe.resume_from=auto")))
    assert written["run_dir"] == str(part)
    assert checkpoint_step(part / "checkpoints" / "last.ckpt") == 6
    assert_same_weights(_weights(uninterrupted / "checkpoints" / "last.ckpt"), _weights(part / "checkpoints" / "last.ckpt"))
    assert _losses(part) == _losses(uninterrupted)


def test_resume_auto_without_checkpoint_starts_fresh(manifest_dir, tmp_path, uninterrupted):
    run_dir = tmp_path / "fresh"
    sft.run(make_config(tiny_sft_overrides(manifest_dir, run_dir, *COMMON, "recipe.resume_from=auto")))
    assert_same_weights(
        _weights(uninterrupted / "checkpoints" / "last.ckpt"), _weights(run_dir / "checkpoints" / "last.ckpt")
    )
