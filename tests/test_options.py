"""Training options end to end: LoRA (merged at export), gradient checkpointing, GSPO KL and data mix."""

from __future__ import annotations

from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwen3asr_train.config.schema import ConfigError, ModelConfig
from qwen3asr_train.data.dataset import UtteranceDataset
from qwen3asr_train.data.manifest import Utterance
from qwen3asr_train.data.mix import MixtureRollouts
from qwen3asr_train.data.prompts import asr_prompt
from qwen3asr_train.model.builder import build_model
from qwen3asr_train.rl.rollout import HFGenerateEngine
from qwen3asr_train.stages import export as export_stage
from qwen3asr_train.stages import gspo, sft
from tests.conftest import make_config, tiny_sft_overrides


def test_lora_run_exports_merged_weights_with_identical_outputs(manifest_dir, tmp_path):
    run_dir = tmp_path / "lora"
    sft.run(
        make_config(
            tiny_sft_overrides(
                manifest_dir,
                run_dir,
                "model.lora.enabled=true",
                "model.lora.r=4",
                "model.lora.alpha=8",
                "model.freeze_audio_encoder=true",
                "recipe.export_on_end=false",
                "recipe.optim.lr=5e-2",
            )
        )
    )
    out = export_stage.run(make_config(["recipe=export", f"recipe.checkpoint={run_dir}", f"run_dir={tmp_path}"]))
    state = load_file(f"{out['native']}/model.safetensors")
    assert not any("lora_" in k for k in state), "adapters must be merged into the base weights"
    merged, proc = build_model(ModelConfig(source="pretrained", path=out["native"]))
    init, _ = build_model(ModelConfig(source="pretrained", path=str(run_dir / "model_init")))
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, init.state_dict()[k])]
    # merged adapters change the targeted LLM projections; the projector trains normally; nothing else moves
    assert any(k.startswith("model.language_model.layers.") for k in changed)
    allowed = ("model.language_model.layers.", "model.multi_modal_projector.")
    assert all(k.startswith(allowed) and not k.endswith("layernorm.weight") for k in changed), changed
    # the LoRA-wrapped model (adapters live) and the merged export compute the same logits
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    live = _load_live(_lora_model(run_dir), ckpt)
    audio = [(0.1 * np.random.default_rng(0).standard_normal(20000)).astype(np.float32)]
    inputs = proc(text=[asr_prompt()], audio=audio)
    with torch.no_grad():
        assert torch.allclose(live(**inputs).logits, merged.eval()(**inputs).logits, atol=1e-5)


def _lora_model(run_dir):
    """The trained architecture with live (unmerged) adapters, built from the run's model_init."""
    from qwen3asr_train.config.schema import LoraConfig
    from qwen3asr_train.model.builder import apply_lora

    model, _ = build_model(ModelConfig(source="pretrained", path=str(run_dir / "model_init")))
    return apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))


def _load_live(model, ckpt):
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_and_processor):
    from qwen3asr_train.data.collate import SFTCollator, SFTOptions
    from qwen3asr_train.losses import target_token_ce
    from tests.test_collate import samples

    _, processor = tiny_model_and_processor
    batch = SFTCollator(processor, SFTOptions())(samples())
    grads = []
    for checkpointing in (False, True):
        model, _ = build_model(ModelConfig(source="tiny", gradient_checkpointing=checkpointing), seed=7)
        model.train()
        out = model.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            input_features=batch["input_features"],
            input_features_mask=batch["input_features_mask"],
        )
        loss, n = target_token_ce(out.last_hidden_state, batch["labels"], model.lm_head)
        (loss / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k


def test_gspo_with_kl_to_a_frozen_reference(manifest_dir, tmp_path):
    cfg = make_config(
        [
            "recipe=gspo",
            "model=tiny",
            f"data.train={manifest_dir / 'train.jsonl'}",
            "trainer=cpu",
            "trainer.max_steps=2",
            "trainer.checkpoint_every_n_steps=2",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "recipe.group_size=2",
            "recipe.rollout_batch_size=2",
            "recipe.steps_per_generation=2",
            "recipe.kl_beta=0.1",
            "recipe.optim.lr=1e-2",
            f"run_dir={tmp_path}",
        ]
    )
    module, loader, trainer, _ = gspo.prepare(cfg)
    ref_before = {k: v.clone() for k, v in module.ref_model.state_dict().items()}
    trainer.fit(module, train_dataloaders=loader)
    assert "gspo/kl" in trainer.logged_metrics
    for k, v in module.ref_model.state_dict().items():
        assert torch.equal(v, ref_before[k]), f"reference model changed: {k}"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("ref_model.") for k in ckpt["state_dict"])


def test_gspo_mixture_follows_weights():
    def utts(name, n):
        return [Utterance(id=f"{name}{i}", audio="x", duration=1.0, text="a", language="English") for i in range(n)]

    sources = [
        (UtteranceDataset(utts("a", 5)), 35.0),
        (UtteranceDataset(utts("b", 7)), 35.0),
        (UtteranceDataset(utts("c", 3)), 30.0),
    ]
    mix = MixtureRollouts(sources, batch_size=8, steps_per_rollout=4, seed=0, rank=0)
    counts = Counter(src for r in range(1500) for src, _ in mix.draw(r))
    total = sum(counts.values())
    for src, expected in ((0, 0.35), (1, 0.35), (2, 0.30)):
        assert counts[src] / total == pytest.approx(expected, abs=0.015)
    other_rank = MixtureRollouts(sources, batch_size=8, steps_per_rollout=4, seed=0, rank=1)
    assert mix.draw(0) != other_rank.draw(0)  # ranks roll out different utterances
    assert mix.draw(5) == MixtureRollouts(sources, 8, 4, 0, 0).draw(5)  # deterministic per rollout


# ------------------------------------------------------------------ pluggable parts by _target_
class StepCounter(L.Callback):
    """A user callback named in the config (``trainer.callbacks.<name>._target_``)."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1


class CountingEngine(HFGenerateEngine):
    """A rollout engine named in the config (``recipe.rollout_engine._target_``)."""

    def __init__(self, processor, tag: str = "") -> None:
        super().__init__(processor)
        self.tag = tag
        self.calls = 0

    def generate(self, model, prompts, opts):
        self.calls += 1
        return super().generate(model, prompts, opts)


def test_optimizer_scheduler_and_callbacks_come_from_targets(manifest_dir, tmp_path):
    cfg = make_config(
        tiny_sft_overrides(
            manifest_dir,
            tmp_path / "run",
            "recipe.optim.optimizer._target_=torch.optim.SGD",
            "+recipe.optim.optimizer.momentum=0.9",
            "+recipe.optim.scheduler._target_=torch.optim.lr_scheduler.ConstantLR",
            "+recipe.optim.scheduler.factor=0.5",
            "+recipe.optim.scheduler.total_iters=100",
            "+trainer.callbacks.count._target_=tests.test_options.StepCounter",
            "+trainer.callbacks.count.label=mine",
            "trainer.max_steps=3",
        )
    )
    module, datamodule, trainer, _ = sft.prepare(cfg)
    counters = [c for c in trainer.callbacks if isinstance(c, StepCounter)]
    assert len(counters) == 1 and counters[0].label == "mine"
    trainer.fit(module, datamodule=datamodule)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    assert isinstance(trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.ConstantLR)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.recipe.optim.lr * 0.5)
    assert counters[0].steps == 3


def test_rollout_engine_comes_from_its_target(manifest_dir, tmp_path):
    cfg = make_config(
        [
            "recipe=gspo",
            "model=tiny",
            f"data.train={manifest_dir / 'train.jsonl'}",
            "trainer=cpu",
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "recipe.group_size=2",
            "recipe.rollout_batch_size=2",
            "recipe.steps_per_generation=2",
            "recipe.rollout_engine._target_=tests.test_options.CountingEngine",
            "+recipe.rollout_engine.tag=x",
            f"run_dir={tmp_path}",
        ]
    )
    module, loader, trainer, _ = gspo.prepare(cfg)
    assert isinstance(module.engine, CountingEngine) and module.engine.tag == "x"
    trainer.fit(module, train_dataloaders=loader)
    assert module.engine.calls == 1  # one rollout batch of 2 minibatch steps


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("recipe.optim.optimizer._target_=torch.optim.NoSuchOptimizer", "recipe.optim.optimizer._target_"),
        ("+trainer.callbacks.x._target_=no_such_module.Thing", "trainer.callbacks.x._target_"),
    ],
)
def test_bad_target_fails_at_start_naming_the_key(manifest_dir, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_config(tiny_sft_overrides(manifest_dir, tmp_path, override))
