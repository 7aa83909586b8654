"""End-to-end SFT runs: CLI, checkpoints, exact resume, export that plain transformers loads, DDP on CPU."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from qwen3asr_train.stages import export as export_stage
from qwen3asr_train.stages import sft
from qwen3asr_train.training import AtomicCheckpointIO, checkpoint_step
from tests.conftest import make_config, tiny_sft_overrides

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as handle:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")}


@pytest.mark.slow
def test_cli_run_writes_checkpoints_logs_config_and_export(manifest_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_sft_overrides(
        manifest_dir,
        run_dir,
        f"data.valid={manifest_dir / 'dev.jsonl'}",
        "trainer.val_check_interval=2",
        "trainer.checkpoint_every_n_steps=2",
    )
    overrides = [o for o in overrides if not o.startswith("run_dir=")] + [f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        [sys.executable, "-m", "qwen3asr_train", *overrides], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "run.yaml").exists() and json.loads((run_dir / "run.json").read_text())["recipe"]["name"] == "sft"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and "step-00000002.ckpt" in ckpts and "step-00000004.ckpt" in ckpts
    assert not [p for p in ckpts if ".tmp-" in p]
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    keys = set().union(*(r.keys() for r in rows))
    for key in (
        "train/loss",
        "train/lr",
        "train/tokens_per_s",
        "train/audio_s_per_s",
        "train/padding_fraction",
        "val/loss",
    ):
        assert key in keys, key
    assert len(_losses(run_dir)) == 4
    assert (run_dir / "export" / "model.safetensors").exists()
    assert (run_dir / "export" / "chat_template.jinja").exists()


def test_bad_config_exits_with_named_key(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen3asr_train",
            "recipe=sft",
            "model=tiny",
            "trainer.max_steps=0",
            "data.train=x.jsonl",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert "trainer.max_steps" in proc.stdout + proc.stderr


PLAIN_TRANSFORMERS = r"""
import sys, numpy as np, torch
from transformers import AutoProcessor, Qwen3ASRForConditionalGeneration
d = sys.argv[1]
assert not any(m.startswith("qwen3asr_train") for m in sys.modules)
processor = AutoProcessor.from_pretrained(d)
model = Qwen3ASRForConditionalGeneration.from_pretrained(d)
audio = (0.1 * np.random.default_rng(0).standard_normal(24000)).astype(np.float32)
inputs = processor.apply_transcription_request(audio=[audio, audio[:16000]], prompt=["", "alpha"])
out = model.generate(**inputs, max_new_tokens=6)
text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print("GENERATED", len(text), out.shape[1] > inputs["input_ids"].shape[1])
"""


@pytest.fixture(scope="module")
def trained_run(manifest_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    sft.run(make_config(tiny_sft_overrides(manifest_dir, run_dir)))
    return run_dir


@pytest.mark.slow
def test_export_loads_in_plain_transformers_and_generates(trained_run, tmp_path):
    out = export_stage.run(
        make_config(
            [
                "recipe=export",
                f"recipe.checkpoint={trained_run}",
                "recipe.layout=both",
                f"recipe.output_dir={tmp_path / 'exp'}",
                f"run_dir={tmp_path}",
            ]
        )
    )
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, out["native"]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GENERATED 2 True" in proc.stdout
    # the exported weights equal the trained ones, in both layouts
    from qwen3asr_train.config.schema import ModelConfig
    from qwen3asr_train.model.builder import build_model

    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    for layout in ("native", "original"):
        model, _ = build_model(ModelConfig(source="pretrained", path=out[layout]))
        for name, value in model.state_dict().items():
            assert torch.equal(value, trained[name]), (layout, name)


class Crash(L.Callback):
    """Raises in the middle of training (after the step-3 checkpoint) to simulate a killed job."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_resume_reproduces_uninterrupted_losses(manifest_dir, tmp_path):
    common = (
        "trainer.max_steps=6",
        "trainer.accumulate_grad_batches=2",
        "data.max_batch_seconds=4",
        "recipe.export_on_end=false",
        "recipe.context_prob=0.5",
        "recipe.no_speech_prob=0.2",
        "recipe.forced_language_prob=0.3",
    )
    full = tmp_path / "full"
    sft.run(make_config(tiny_sft_overrides(manifest_dir, full, *common)))
    part = tmp_path / "part"
    crashing = make_config(tiny_sft_overrides(manifest_dir, part, *common, "trainer.checkpoint_every_n_steps=3"))
    module, datamodule, trainer, _ = sft.prepare(crashing, [Crash(4)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(module, datamodule=datamodule)
    assert checkpoint_step(part / "checkpoints" / "last.ckpt") == 3
    sft.run(make_config(tiny_sft_overrides(manifest_dir, part, *common, "recipe.resume_from=last")))
    a, b = _losses(full), _losses(part)
    assert sorted(a) == list(range(6)) and sorted(b) == list(range(6))
    for step in range(6):
        assert a[step] == pytest.approx(b[step], abs=1e-6), (step, a, b)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, target)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"a": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_ddp_two_cpu_processes(manifest_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    overrides = tiny_sft_overrides(
        manifest_dir,
        run_dir,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=3",
        "data.max_batch_seconds=4",
        "trainer.ema_decay=0.5",  # the weight average under DDP: kept on every rank, exported by rank 0
    )
    overrides = [o for o in overrides if not o.startswith("run_dir=")] + [f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        [sys.executable, "-m", "qwen3asr_train", *overrides],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=400,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(_losses(run_dir)) == 3
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "export" / "model.safetensors").exists()
    from safetensors.torch import load_file

    payload = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    average, raw = payload["ema_state_dict"], payload["state_dict"]
    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    assert set(average) <= set(raw) and any(not torch.equal(average[k], raw[k]) for k in average)
    for name, tensor in exported.items():
        assert torch.equal(tensor, average.get(f"model.{name}", raw[f"model.{name}"])), name
