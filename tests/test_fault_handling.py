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

from qwen3asr_train.averaging import WeightEMA
from qwen3asr_train.checkpoints import find_checkpoint
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
    rc, seconds, err = _signal_when(cmd, part / "checkpoints" / "step-00000002.ckpt", signal.SIGTERM, tmp_path)
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
    rc, seconds, err = _signal_when(cmd, part / "checkpoints" / "step-00000002.ckpt", signum, tmp_path)
    assert rc == (143 if signum == signal.SIGTERM else -signal.SIGKILL), err[-3000:]
    assert seconds < 60
    # a kill can land between step-N.ckpt and last.ckpt: resume_from=auto takes the newest intact file
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


# ------------------------------------------------------------------------------------- non-finite steps
class PoisonLoss(L.Callback):
    """Makes the loss NaN at the given optimizer steps (wraps ``forward_sums``), records batch ids and weights."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.ids: dict[int, list[str]] = {}
        self.weights_after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        original = pl_module.forward_sums

        def poisoned(batch):
            sums = original(batch)
            if trainer.global_step in self.steps and pl_module.training:
                sums["ce_sum"] = sums["ce_sum"] * float("nan")
            return sums

        pl_module.forward_sums = poisoned

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.setdefault(trainer.global_step, []).extend(batch["ids"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights_after[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_single_nonfinite_step_is_skipped_and_reported(manifest_dir, tmp_path, caplog):
    run_dir = tmp_path / "run"
    poison = PoisonLoss({2})
    cfg = make_config(tiny_sft_overrides(manifest_dir, run_dir, *COMMON, "trainer.checkpoint_every_n_steps=1"))
    module, datamodule, trainer, _ = sft.prepare(cfg, [poison])
    fit(trainer, module, datamodule=datamodule)
    # step 2's update was skipped: the weights after it are exactly those after step 1
    assert_same_weights(poison.weights_after[2], poison.weights_after[3])
    assert not all(torch.equal(poison.weights_after[3][k], poison.weights_after[4][k]) for k in poison.weights_after[3])
    reports = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(reports) == 1 and "optimizer step 2" in reports[0]
    assert all(i in reports[0] for i in poison.ids[2])
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 6  # training went on to the end


def test_skipped_nonfinite_step_leaves_the_weight_average_finite_and_exact(manifest_dir, tmp_path):
    """The weight average (``trainer.ema_decay``) with a skipped step: the skip keeps the weights, so the
    average moves towards finite weights, and it equals the recursion worked out from the weights recorded
    after every optimizer step (an independent computation: no code of the average is used)."""
    decay, start = 0.5, 1
    poison = PoisonLoss({2})
    overrides = (*COMMON, f"trainer.ema_decay={decay}", f"trainer.ema_start_step={start}")
    cfg = make_config(tiny_sft_overrides(manifest_dir, tmp_path / "run", *overrides))
    module, datamodule, trainer, _ = sft.prepare(cfg, [poison])
    fit(trainer, module, datamodule=datamodule)
    assert_same_weights(poison.weights_after[2], poison.weights_after[3])  # the skipped update
    (ema,) = [c for c in trainer.callbacks if isinstance(c, WeightEMA)]
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert set(ema.average) == set(names)
    expected: dict[str, torch.Tensor] = {}
    assert sorted(poison.weights_after) == list(range(7))  # 0: the first micro-batch, before any step
    for step in range(1, 7):  # the weights after each optimizer step
        for name in names:
            w = poison.weights_after[step][name].float()
            expected[name] = w if step <= start else decay * expected[name] + (1 - decay) * w
    for name in names:
        assert torch.isfinite(ema.average[name]).all(), name
        torch.testing.assert_close(ema.average[name], expected[name], rtol=1e-6, atol=1e-7)


def test_divergence_stops_naming_step_and_utterances_and_keeps_finite_checkpoints(manifest_dir, tmp_path):
    run_dir = tmp_path / "run"
    poison = PoisonLoss({3, 4, 5})
    overrides = (*COMMON, "trainer.checkpoint_every_n_steps=1", "trainer.max_nonfinite_skips=1")
    cfg = make_config(tiny_sft_overrides(manifest_dir, run_dir, *overrides, "recipe.export_on_end=true"))
    module, datamodule, trainer, processor = sft.prepare(cfg, [poison])
    with pytest.raises(NonFiniteError, match="optimizer step 4") as info:
        fit(trainer, module, datamodule=datamodule)
    assert all(i in str(info.value) for i in poison.ids[4])
    # no checkpoint after step 3's (the last finite update); every file is finite; none was rotated away
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step-00000002.ckpt", "step-00000003.ckpt"]
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 3
    for path in (run_dir / "checkpoints").iterdir():
        state = _weights(path)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (run_dir / "export").exists()


def test_huge_learning_rate_never_writes_nonfinite_weights(manifest_dir, tmp_path):
    """The issue's reproduction (lr 1e10): the run stops non-zero, every checkpoint on disk is finite, no export."""
    run_dir = tmp_path / "run"
    overrides = (
        *COMMON,
        "trainer.max_steps=30",
        "trainer.checkpoint_every_n_steps=1",
        "recipe.optim.lr=1e10",
        "recipe.optim.warmup_ratio=0",
        "recipe.export_on_end=true",
    )
    with pytest.raises(NonFiniteError, match="non-finite steps in a row"):
        sft.run(make_config(tiny_sft_overrides(manifest_dir, run_dir, *overrides)))
    files = list((run_dir / "checkpoints").glob("*.ckpt"))
    assert files
    for path in files:
        state = _weights(path)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
    assert not (run_dir / "export").exists()


# --------------------------------------------------------------------------------------- safe loading
class Payload:
    """Pickles to a call of ``os.system`` (what a malicious checkpoint carries)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_checkpoint_with_pickle_payload_is_refused_without_running_it(manifest_dir, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "run" / "checkpoints" / "evil.ckpt"
    evil.parent.mkdir(parents=True)
    torch.save({"global_step": 1, "state_dict": {}, "x": Payload(f"touch {marker}")}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint_file(evil)
    with pytest.raises(CheckpointError, match=str(evil)):
        export_stage.run(make_config(["recipe=export", f"recipe.checkpoint={evil}", f"run_dir={tmp_path}"]))
    run_dir = tmp_path / "resume"
    with pytest.raises(CheckpointError, match=str(evil)):
        sft.prepare(make_config(tiny_sft_overrides(manifest_dir, run_dir, f"recipe.resume_from={evil}")))
    assert not (run_dir / "model_init").exists()  # refused before the model was built
    from qwen3asr_train.training import AtomicCheckpointIO

    with pytest.raises(CheckpointError, match="refused"):
        AtomicCheckpointIO().load_checkpoint(evil)  # what Lightning's resume goes through
    assert not marker.exists()


def test_our_checkpoints_load_weights_only(uninterrupted):
    payload = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)
    assert payload["global_step"] == 6 and "run_plan" in payload and "torch_rng_state" in payload


# ---------------------------------------------------------------------------- final checkpoint + export
def test_export_of_a_run_directory_holds_the_final_step(manifest_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_config(
        tiny_sft_overrides(manifest_dir, run_dir, "trainer.max_steps=5", "trainer.checkpoint_every_n_steps=3")
    )
    module, datamodule, trainer, processor = sft.prepare(cfg)
    fit(trainer, module, datamodule=datamodule)
    final = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 5
    out = export_stage.run(
        make_config(
            [
                "recipe=export",
                f"recipe.checkpoint={run_dir}",
                f"recipe.output_dir={tmp_path / 'exp'}",
                f"run_dir={tmp_path}",
            ]
        )
    )
    from safetensors.torch import load_file

    exported = load_file(str(Path(out["native"]) / "model.safetensors"))
    for name, value in exported.items():
        assert torch.equal(value, final[name]), name
    info = json.loads((Path(out["native"]) / "qwen3asr_train_run.json").read_text())["exported_from"]
    assert info["global_step"] == 5 and info["checkpoint"].endswith("last.ckpt")


def test_export_on_end_says_its_step(trained_run_dir):
    info = json.loads((trained_run_dir / "export" / "qwen3asr_train_run.json").read_text())["exported_from"]
    assert info["global_step"] == 4


@pytest.fixture(scope="module")
def trained_run_dir(manifest_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained")
    sft.run(make_config(tiny_sft_overrides(manifest_dir, run_dir, "trainer.checkpoint_every_n_steps=3")))
    return run_dir


# -------------------------------------------------------------------------------- damaged checkpoints
def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_last_falls_back_to_newest_intact_with_a_warning(trained_run_dir, tmp_path, caplog, damage):
    from qwen3asr_train.training import resolve_resume

    run_dir = _copy_run(trained_run_dir, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(CheckpointError, match=str(last)) as info:
        checkpoint_step(last)
    assert ("empty file" in str(info.value)) == (damage == "empty") and "mmap" not in str(info.value)
    chosen = resolve_resume("last", run_dir)
    assert chosen == str(run_dir / "checkpoints" / "step-00000003.ckpt")
    assert any(str(last) in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    assert resolve_resume("auto", run_dir) == chosen
    # export of the run directory skips the damaged file too
    ckpt, _ = find_checkpoint(run_dir)
    assert ckpt.name == "step-00000003.ckpt"


def test_resume_last_without_checkpoint_fails_before_the_model_is_built(manifest_dir, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        sft.prepare(make_config(tiny_sft_overrides(manifest_dir, run_dir, "recipe.resume_from=last")))
    assert not (run_dir / "model_init").exists()


def test_unwritable_checkpoint_directory_fails_at_start(manifest_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the directory should be")
    with pytest.raises(OSError, match="checkpoints: not writable"):
        sft.prepare(make_config(tiny_sft_overrides(manifest_dir, run_dir)))
    assert not (run_dir / "model_init").exists()


def test_resume_with_changed_data_plan_is_refused_unless_allowed(manifest_dir, trained_run_dir, tmp_path):
    run_dir = _copy_run(trained_run_dir, tmp_path / "run")
    changed = tiny_sft_overrides(manifest_dir, run_dir, "recipe.resume_from=last", "data.max_batch_seconds=4")
    with pytest.raises(CheckpointError, match=r"batching.max_batch_seconds: 6.0 -> 4.0"):
        sft.prepare(make_config(changed))
    module, datamodule, trainer, _ = sft.prepare(make_config([*changed, "trainer.resume_allow_changes=true"]))
    assert trainer is not None


def test_stale_temporaries_are_removed_and_no_versioned_duplicates(manifest_dir, trained_run_dir, tmp_path):
    run_dir = _copy_run(trained_run_dir, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (ckpts / f"last.ckpt.tmp-{dead}").write_bytes(b"")
    (run_dir / f"export.tmp-{dead}").mkdir()
    # resume from step 3 while step-00000003.ckpt exists: it is rewritten, not duplicated as -v1
    sft.run(
        make_config(
            tiny_sft_overrides(
                manifest_dir,
                run_dir,
                f"recipe.resume_from='{ckpts / 'step-00000003.ckpt'}'",
                "trainer.checkpoint_every_n_steps=3",
                "trainer.max_steps=6",
                "trainer.resume_allow_changes=true",
            )
        )
    )
    names = sorted(p.name for p in ckpts.iterdir())
    assert not [n for n in names if ".tmp-" in n or "-v" in n], names
    assert not (run_dir / f"export.tmp-{dead}").exists()


# ------------------------------------------------------------------------------------------- aligner
def test_aligner_sigterm_checkpoints_and_auto_resume_is_exact(tmp_path):
    from qwen3asr_train.stages import aligner as aligner_stage
    from qwen3asr_train.tools.synthetic import write_tone_corpus

    manifest = write_tone_corpus(tmp_path / "tones", 12, seed=4)

    def overrides(run_dir: Path, *extra: str) -> list[str]:
        return [
            "recipe=aligner",
            "model=tiny",
            "model.num_labels=64",
            f"data.train={manifest}",
            "trainer=cpu",
            "trainer.max_steps=5",
            "trainer.accumulate_grad_batches=2",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "data.max_batch_seconds=4",
            "recipe.optim.lr=1e-3",
            "recipe.slot_prob=0.5",
            "recipe.export_on_end=false",
            f"run_dir={run_dir}",
            *extra,
        ]

    full = tmp_path / "full"
    aligner_stage.run(make_config(overrides(full)))
    part = tmp_path / "part"
    module, datamodule, trainer, _ = aligner_stage.prepare(make_config(overrides(part)), [SignalAt(2)])
    with pytest.raises(Preempted) as info:
        fit(trainer, module, datamodule=datamodule)
    assert info.value.code == 143 and checkpoint_step(part / "checkpoints" / "last.ckpt") == 3
    aligner_stage.run(make_config(overrides(part, "recipe.resume_from=auto")))
    assert_same_weights(_weights(full / "checkpoints" / "last.ckpt"), _weights(part / "checkpoints" / "last.ckpt"))
    assert _losses(part) == _losses(full)
