"""SFT training semantics: head-only loss, accumulation-invariant normalisation, fp32 master weights."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from qwen3asr_train.data.collate import SFTCollator, SFTOptions
from qwen3asr_train.losses import target_token_ce
from qwen3asr_train.stages import sft
from qwen3asr_train.testing import write_manifest
from tests.conftest import make_config, tiny_sft_overrides
from tests.test_collate import samples


def test_head_only_loss_equals_full_logits_loss(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batch = SFTCollator(processor, SFTOptions(padding_side="left", context_prob=1.0))(samples())
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "input_features", "input_features_mask")}
    with torch.no_grad():
        full = model(**inputs, labels=batch["labels"])  # transformers: full logits, shifted mean CE
        hidden = model.model(**inputs).last_hidden_state
        loss_sum, n = target_token_ce(hidden, batch["labels"], model.lm_head)
        # an independent third computation: full logits, manual shift
        logits = full.logits[:, :-1].reshape(-1, full.logits.shape[-1])
        manual = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert n == batch["num_target_tokens"]
    assert torch.allclose(loss_sum / n, full.loss, atol=1e-6)
    assert torch.allclose(loss_sum / n, manual, atol=1e-6)


class GradCapture(L.Callback):
    """Keeps the accumulated gradients of the first optimizer step (before clipping) and the logged loss."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def _one_step_grads(manifest, run_dir, *extra):
    cfg = make_config(
        tiny_sft_overrides(
            manifest.parent,
            run_dir,
            f"data.train={manifest}",
            "trainer.max_steps=1",
            "data.max_batch_seconds=1000",
            "data.shuffle=false",
            "recipe.export_on_end=false",
            *extra,
        )
    )
    capture = GradCapture()
    module, datamodule, trainer, _ = sft.prepare(cfg, [capture])
    trainer.fit(module, datamodule=datamodule)
    return capture.grads, trainer.logged_metrics["train/loss"]


def test_one_micro_batch_of_8_equals_four_of_2(tmp_path):
    # equal durations: identical feature padding whatever the grouping, so only the loss normalisation differs
    manifest = write_manifest(tmp_path, num=8, seed=3, min_seconds=1.5, max_seconds=1.5)
    g1, loss1 = _one_step_grads(manifest, tmp_path / "a", "data.max_batch_size=8", "trainer.accumulate_grad_batches=1")
    g4, loss4 = _one_step_grads(manifest, tmp_path / "b", "data.max_batch_size=2", "trainer.accumulate_grad_batches=4")
    assert g1 is not None and g4 is not None and set(g1) == set(g4)
    assert torch.allclose(torch.as_tensor(loss1), torch.as_tensor(loss4), atol=1e-6)
    for name in g1:
        assert torch.allclose(g1[name], g4[name], atol=1e-7, rtol=1e-4), name
    # the equality above is not vacuous: the gradients are far from zero
    total = sum(float(g.abs().sum()) for g in g1.values())
    assert total > 1e-3


class Snapshot(L.Callback):
    """Parameters as training starts (after the precision plugin has cast the module)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.params = {n: p.detach().clone().float() for n, p in pl_module.named_parameters() if p.requires_grad}


def _unchanged(precision: str, tmp_path, *extra) -> tuple[dict[str, float], float]:
    """Per-parameter fraction of unchanged elements after one step, and the element-weighted total."""
    manifest = write_manifest(tmp_path, num=4, seed=5)
    cfg = make_config(
        tiny_sft_overrides(
            tmp_path,
            tmp_path / precision,
            f"data.train={manifest}",
            "trainer.max_steps=1",
            f"trainer.precision={precision}",
            "recipe.optim.lr=1e-6",
            "recipe.optim.warmup_steps=0",
            "recipe.optim.warmup_ratio=0",
            "recipe.optim.schedule=constant",
            "recipe.export_on_end=false",
            *extra,
        )
    )
    snapshot = Snapshot()
    module, datamodule, trainer, _ = sft.prepare(cfg, [snapshot])
    trainer.fit(module, datamodule=datamodule)
    before = snapshot.params
    after = dict(module.named_parameters())
    same = {n: (after[n].detach().float() == before[n]) for n in before}
    total = sum(int(v.sum()) for v in same.values()) / sum(v.numel() for v in same.values())
    return {n: float(v.float().mean()) for n, v in same.items()}, total


def test_bf16_mixed_step_changes_every_trainable_weight(tmp_path):
    unchanged, total = _unchanged("bf16-mixed", tmp_path)
    assert unchanged and total < 0.01
    untouched = [name for name, frac in unchanged.items() if frac == 1.0]
    assert not untouched, f"weights that did not move under bf16-mixed: {untouched}"


def test_pure_bf16_weights_lose_small_updates(tmp_path):
    """The caveat we document: with bf16 weights, lr 1e-6 updates round away for most elements."""
    _, total = _unchanged("bf16-true", tmp_path, "trainer.allow_low_precision_weights=true")
    assert total > 0.5, f"only {total:.0%} of elements unchanged; expected most to round away"


def test_bf16_true_requires_explicit_opt_in(tmp_path):
    from qwen3asr_train.config.schema import ConfigError

    with pytest.raises(ConfigError, match="trainer.precision"):
        make_config(tiny_sft_overrides(tmp_path, tmp_path / "x", "trainer.precision=bf16-true"))


def test_logged_throughput_is_audio_over_the_wall_time_of_whole_steps():
    """A fake clock: each step spends 1 s in forwards before the window's statistics are taken and 3 s after
    (last backward, optimizer step, loading the next batch). Audio-s/s must use all 4 s."""
    from types import SimpleNamespace

    from qwen3asr_train.training import StepNormaliser, throughput_metrics

    now = [100.0]
    norm = StepNormaliser(clock=lambda: now[0])
    trainer = SimpleNamespace(
        world_size=1,
        accumulate_grad_batches=2,
        is_last_batch=False,
        optimizers=[SimpleNamespace(param_groups=[{"lr": 1.0}])],
    )
    module = SimpleNamespace(trainer=trainer, device=torch.device("cpu"))
    rates = []
    for step in range(3):
        for micro in range(2):
            batch = {"position": (0, 2 * step + micro), "window_size": 2, "window_target_tokens": 10}
            norm.observe(module, batch)
            norm.add(audio=6.0, real=50, seq=60, skipped=0)
            now[0] += 0.5  # forward of this micro-batch
        t, elapsed = norm.totals(module)
        rates.append(throughput_metrics(t, elapsed, trainer)["train/audio_s_per_s"])
        now[0] += 3.0  # last backward + optimizer step + next batch
    # the first window has no previous boundary (timed from its first forward); then 12 audio-s per 4 s steps
    assert rates[0] == pytest.approx(12.0 / 1.0)
    assert rates[1:] == [pytest.approx(12.0 / 4.0)] * 2
