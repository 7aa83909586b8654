"""The weight average (``trainer.ema_decay``, ``qwen3asr_train/averaging.py``): its value against the closed
form of the sum, the swap in and out, what checkpoints, exports and evaluation hold, and an interrupted run
resumed bit for bit."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from qwen3asr_train.averaging import EMA_KEY, WeightEMA
from qwen3asr_train.checkpoints import load_for_inference
from qwen3asr_train.config.load import ConfigError
from qwen3asr_train.eval.hook import PeriodicEvaluation
from qwen3asr_train.stages import export as export_stage
from qwen3asr_train.stages import sft
from qwen3asr_train.training import Preempted, fit, load_checkpoint_file
from tests.conftest import make_config, tiny_sft_overrides


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _set(module: _Toy, value: torch.Tensor) -> None:
    with torch.no_grad():
        module.layer.weight.copy_(value)


def test_average_is_the_closed_form_weighted_sum_and_ignores_repeated_steps_and_frozen_weights():
    decay, start = 0.8, 2
    toy = _Toy()
    frozen_before = toy.frozen.weight.detach().clone()
    ema = WeightEMA(decay, start_step=start)
    ema.on_train_start(SimpleNamespace(), toy)
    torch.manual_seed(0)
    history = [torch.randn(2, 3) for _ in range(7)]  # the weights after optimizer steps 1..7
    for step, value in enumerate(history, start=1):
        _set(toy, value)
        trainer = SimpleNamespace(global_step=step)
        ema.on_train_batch_end(trainer, toy, None, None, 0)
        ema.on_train_batch_end(trainer, toy, None, None, 1)  # a second micro-batch of the same step: no update
    # up to the start step the average is the weights themselves; after it, the geometric sum:
    # avg_n = d^(n-s) w_s + sum_{k=s+1..n} (1-d) d^(n-k) w_k
    n = len(history)
    expected = decay ** (n - start) * history[start - 1]
    for k in range(start + 1, n + 1):
        expected = expected + (1 - decay) * decay ** (n - k) * history[k - 1]
    torch.testing.assert_close(ema.average["layer.weight"], expected, rtol=1e-6, atol=1e-6)
    assert set(ema.average) == {"layer.weight", "layer.bias"}  # the frozen layer is not copied
    torch.testing.assert_close(toy.frozen.weight, frozen_before)


def test_applied_swaps_the_average_in_and_restores_the_raw_weights_even_on_error():
    toy = _Toy()
    ema = WeightEMA(0.5)
    ema.on_train_start(SimpleNamespace(), toy)
    start = toy.layer.weight.detach().clone()
    _set(toy, start + 2.0)
    ema.on_train_batch_end(SimpleNamespace(global_step=1), toy, None, None, 0)
    raw = toy.layer.weight.detach().clone()
    with ema.applied(toy):
        torch.testing.assert_close(toy.layer.weight, start + 1.0)  # 0.5 · start + 0.5 · (start + 2)
    torch.testing.assert_close(toy.layer.weight, raw)
    with pytest.raises(RuntimeError, match="boom"), ema.applied(toy):
        raise RuntimeError("boom")
    torch.testing.assert_close(toy.layer.weight, raw)


class _RecordingEvaluator:
    """Records the value of one weight at the moment the hook evaluates."""

    title = ""
    samples: list = []

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def evaluate(self, model: torch.nn.Module, out_dir: Path, write: bool) -> dict[str, float]:
        self.seen.append(model.layer.weight.detach().clone())
        return {}


def test_the_evaluation_hook_decodes_with_the_average_and_training_keeps_the_raw_weights(tmp_path):
    wrapper = torch.nn.Module()
    wrapper.model = _Toy()
    ema = WeightEMA(0.5)
    ema.on_train_start(SimpleNamespace(), wrapper)
    start = wrapper.model.layer.weight.detach().clone()
    with torch.no_grad():
        wrapper.model.layer.weight.add_(4.0)
    ema.on_train_batch_end(SimpleNamespace(global_step=1), wrapper, None, None, 0)
    evaluator = _RecordingEvaluator()
    hook = PeriodicEvaluation(evaluator, every_n_steps=1, at_end=False, run_dir=tmp_path)
    trainer = SimpleNamespace(
        global_step=1,
        callbacks=[ema],
        is_global_zero=False,
        logger=None,
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
    )
    hook.on_train_batch_end(trainer, wrapper, None, None, 0)
    torch.testing.assert_close(evaluator.seen[0], start + 2.0)
    torch.testing.assert_close(wrapper.model.layer.weight, start + 4.0)


def test_sharded_strategies_and_bad_decays_are_refused_by_the_config_check(manifest_dir, tmp_path):
    with pytest.raises(ConfigError, match="ema_decay"):
        make_config(tiny_sft_overrides(manifest_dir, tmp_path, "trainer.ema_decay=1.0"))
    with pytest.raises(ConfigError, match="not supported with fsdp"):
        make_config(
            tiny_sft_overrides(
                manifest_dir, tmp_path, "trainer.ema_decay=0.9", "trainer.strategy=fsdp", "trainer.accelerator=gpu"
            )
        )


EMA_RUN = ("trainer.max_steps=6", "trainer.ema_decay=0.7", "trainer.ema_start_step=2", "data.max_batch_seconds=4")


@pytest.fixture(scope="module")
def averaged_run(manifest_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ema_run")
    sft.run(make_config(tiny_sft_overrides(manifest_dir, run_dir, *EMA_RUN, "recipe.export_on_end=true")))
    return run_dir


def _model_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def test_checkpoint_keeps_raw_and_average_and_every_export_holds_the_average(averaged_run, tmp_path):
    payload = load_checkpoint_file(averaged_run / "checkpoints" / "last.ckpt")
    raw, average = _model_tensors(payload["state_dict"]), _model_tensors(payload[EMA_KEY])
    differing = [k for k in average if not torch.equal(average[k], raw[k])]
    assert differing, "after 4 averaged steps the average must differ from the raw weights"
    assert "lm_head.weight" in average  # the tied output layer is listed under both of its names
    torch.testing.assert_close(average["lm_head.weight"], average["model.language_model.embed_tokens.weight"])

    def assert_holds(export_dir: Path, expected: dict[str, torch.Tensor]) -> None:
        model, _ = load_for_inference(export_dir)
        state = model.state_dict()
        for name, tensor in expected.items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)

    assert_holds(averaged_run / "export", average)  # the end-of-run export
    out = tmp_path / "avg"
    export_stage.run(
        make_config(
            ["recipe=export", f"recipe.checkpoint={averaged_run}", f"recipe.output_dir={out}", f"run_dir={tmp_path}"]
        )
    )
    assert_holds(out, average)
    out_raw = tmp_path / "raw"
    export_stage.run(
        make_config(
            [
                "recipe=export",
                f"recipe.checkpoint={averaged_run}",
                f"recipe.output_dir={out_raw}",
                "recipe.ema=false",
                f"run_dir={tmp_path}",
            ]
        )
    )
    assert_holds(out_raw, {k: raw[k] for k in differing})


class _SignalAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.step = -1
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_and_resume_give_the_uninterrupted_average_bit_for_bit(manifest_dir, tmp_path, averaged_run):
    run_dir = tmp_path / "interrupted"
    overrides = tiny_sft_overrides(manifest_dir, run_dir, *EMA_RUN, "recipe.export_on_end=false")
    module, datamodule, trainer, _ = sft.prepare(make_config(overrides), [_SignalAt(3)])
    with pytest.raises(Preempted) as info:
        fit(trainer, module, datamodule=datamodule)
    assert 2 < info.value.step < 6  # stopped after the average started and before the end
    sft.run(make_config([*overrides, "recipe.resume_from=auto"]))
    full = load_checkpoint_file(averaged_run / "checkpoints" / "last.ckpt")
    resumed = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    for key in ("state_dict", EMA_KEY):
        assert full[key].keys() == resumed[key].keys()
        for name in full[key]:
            assert torch.equal(full[key][name], resumed[key][name]), (key, name)
