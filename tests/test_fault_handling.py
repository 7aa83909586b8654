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
    newest_checkpoint,
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
    assert_same_weights(
        _weights(uninterrupted / "checkpoints" / "last.ckpt"), _weights(part / "checkpoints" / "last.ckpt")
    )
    assert _losses(part) == _losses(uninterrupted)


def test_resume_auto_without_checkpoint_starts_fresh(manifest_dir, tmp_path, uninterrupted):
    run_dir = tmp_path / "fresh"
    sft.run(make_config(tiny_sft_overrides(manifest_dir, run_dir, *COMMON, "recipe.resume_from=auto")))
    assert_same_weights(
        _weights(uninterrupted / "checkpoints" / "last.ckpt"), _weights(run_dir / "checkpoints" / "last.ckpt")
    )


# ------------------------------------------------------------------------------------------------ GSPO
def _gspo_overrides(manifest_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    base = [
        "recipe=gspo",
        "model=tiny",
        f"data.train={manifest_dir / 'train.jsonl'}",
        "trainer=cpu",
        "trainer.max_steps=8",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
        "recipe.group_size=3",
        "recipe.rollout_batch_size=2",
        "recipe.steps_per_generation=2",
        "recipe.optim.lr=1e-2",
        "recipe.optim.warmup_ratio=0",
        "recipe.export_on_end=false",
        f"run_dir={run_dir}",
    ]
    merged = {o.split("=", 1)[0]: o for o in base}
    merged.update({o.split("=", 1)[0]: o for o in extra})
    return list(merged.values())


def _gspo_metrics(run_dir: Path) -> dict[tuple[int, str], str]:
    """Every logged (step, metric) value except timings (losses, rewards, clip fractions, lr)."""
    with open(run_dir / "logs" / "metrics.csv") as handle:
        return {
            (int(r["step"]), k): v
            for r in csv.DictReader(handle)
            for k, v in r.items()
            if v not in ("", None) and k not in ("step", "epoch") and "per_s" not in k
        }


@pytest.fixture(scope="module")
def gspo_uninterrupted(manifest_dir, tmp_path_factory) -> Path:
    from qwen3asr_train.stages import gspo

    run_dir = tmp_path_factory.mktemp("gspo_full")
    gspo.run(make_config(_gspo_overrides(manifest_dir, run_dir)))
    return run_dir


class CrashAt(L.Callback):
    """Raises when training step ``step`` starts (a killed process, in-process)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated kill")


def test_gspo_sigterm_checkpoints_at_the_rollout_boundary_and_resume_is_exact(
    manifest_dir, tmp_path, gspo_uninterrupted
):
    from qwen3asr_train.stages import gspo

    part = tmp_path / "part"
    cfg = make_config(_gspo_overrides(manifest_dir, part, "trainer.checkpoint_every_n_steps=100"))
    module, loader, trainer, _ = gspo.prepare(cfg, [SignalAt(4)])  # step 4 = first minibatch of rollout 2
    with pytest.raises(Preempted) as info:
        fit(trainer, module, train_dataloaders=loader)
    assert info.value.code == 143
    # the rollout batch in progress (steps 4 and 5) is finished: its cached completions are not checkpointed
    assert info.value.step == 6 and checkpoint_step(part / "checkpoints" / "last.ckpt") == 6
    gspo.run(make_config(_gspo_overrides(manifest_dir, part, "recipe.resume_from=auto")))
    assert_same_weights(
        _weights(gspo_uninterrupted / "checkpoints" / "last.ckpt"), _weights(part / "checkpoints" / "last.ckpt")
    )
    assert _gspo_metrics(part) == _gspo_metrics(gspo_uninterrupted)


def test_gspo_kill_and_resume_is_exact(manifest_dir, tmp_path, gspo_uninterrupted):
    """Killed inside a rollout batch (after the step-4 checkpoint): the resumed run samples, rewards and
    updates exactly as the uninterrupted one (sampling is seeded per rollout, not from the global RNG)."""
    from qwen3asr_train.stages import gspo

    part = tmp_path / "part"
    module, loader, trainer, _ = gspo.prepare(make_config(_gspo_overrides(manifest_dir, part)), [CrashAt(5)])
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(trainer, module, train_dataloaders=loader)
    assert checkpoint_step(part / "checkpoints" / "last.ckpt") == 4
    gspo.run(make_config(_gspo_overrides(manifest_dir, part, "recipe.resume_from=last")))
    assert_same_weights(
        _weights(gspo_uninterrupted / "checkpoints" / "last.ckpt"), _weights(part / "checkpoints" / "last.ckpt")
    )
    assert _gspo_metrics(part) == _gspo_metrics(gspo_uninterrupted)


# --------------------------------------------------------------------------------- real processes (CLI)
REPO = Path(__file__).resolve().parents[1]


def _cli(overrides: list[str], run_dir: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "qwen3asr_train", *[o for o in overrides if not o.startswith("run_dir=")]] + [
        f"hydra.run.dir={run_dir}"
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _signal_when(cmd: list[str], marker: Path, signum: int, cwd: Path, timeout: float = 300) -> tuple[int, float, str]:
    """Start ``cmd``, send ``signum`` as soon as ``marker`` exists; (exit status, seconds to exit, stderr)."""
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{marker} never appeared: {proc.communicate()[1][-3000:]}")
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, time.monotonic() - sent, err


@pytest.mark.slow
def test_cli_sft_sigterm_exits_143_within_a_minute_and_resumes_exactly(manifest_dir, tmp_path):
    common = (*COMMON, "trainer.max_steps=40", "trainer.checkpoint_every_n_steps=2", "recipe.optim.schedule=linear")
    full = tmp_path / "full"
    sft.run(make_config(tiny_sft_overrides(manifest_dir, full, *common)))
    part = tmp_path / "part"
    cmd = _cli(tiny_sft_overrides(manifest_dir, part, *common), part)
    rc, seconds, err = _signal_when(cmd, part / "checkpoints" / "step=00000002.ckpt", signal.SIGTERM, tmp_path)
    assert rc == 143, err[-3000:]
    assert seconds < 60
    step = checkpoint_step(part / "checkpoints" / "last.ckpt")
    assert 2 <= step < 40 and f"writing a checkpoint at step {step}" in (part / "__main__.log").read_text()
    assert not (part / "export").exists()
    import subprocess

    proc = subprocess.run(
        _cli(tiny_sft_overrides(manifest_dir, part, *common, "recipe.resume_from=auto"), part),
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {part / 'checkpoints' / 'last.ckpt'} (step {step})" in (part / "__main__.log").read_text()
    assert_same_weights(_weights(full / "checkpoints" / "last.ckpt"), _weights(part / "checkpoints" / "last.ckpt"))
    assert _losses(part) == _losses(full)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_cli_gspo_signal_and_resume_is_exact(manifest_dir, tmp_path, gspo_uninterrupted, signum):
    import subprocess

    part = tmp_path / "part"
    cmd = _cli(_gspo_overrides(manifest_dir, part), part)
    rc, seconds, err = _signal_when(cmd, part / "checkpoints" / "step=00000002.ckpt", signum, tmp_path)
    assert rc == (143 if signum == signal.SIGTERM else -signal.SIGKILL), err[-3000:]
    assert seconds < 60
    # a kill can land between step=N.ckpt and last.ckpt: resume_from=auto takes the newest intact file
    _, step = newest_checkpoint(part / "checkpoints")
    assert step % 2 == 0 and 2 <= step < 8  # a rollout boundary
    proc = subprocess.run(
        _cli(_gspo_overrides(manifest_dir, part, "recipe.resume_from=auto"), part),
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(
        _weights(gspo_uninterrupted / "checkpoints" / "last.ckpt"), _weights(part / "checkpoints" / "last.ckpt")
    )
    if signum == signal.SIGKILL:  # rows logged after the last flush before the kill are lost; the rest is exact
        full = {k: v for k, v in _gspo_metrics(gspo_uninterrupted).items() if k[0] >= step}
        assert {k: v for k, v in _gspo_metrics(part).items() if k[0] >= step} == full
    else:
        assert _gspo_metrics(part) == _gspo_metrics(gspo_uninterrupted)
