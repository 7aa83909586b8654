"""An aligner loaded with ``model=checkpoint`` trains with every module in train mode (the head's dropout
active) and is evaluated by the hook in eval mode, then trains on in train mode."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from qwen3asr_train import training
from qwen3asr_train.config.schema import ModelConfig
from qwen3asr_train.model.builder import build_model
from qwen3asr_train.model.export import save_native, save_original
from qwen3asr_train.stages import aligner as aligner_stage
from qwen3asr_train.tools.synthetic import write_tone_corpus
from tests.conftest import make_config

NUM_CLASSES = 48


class _ModeRecorder(L.Callback):
    """Records, at every training batch, which modules are not in train mode."""

    def __init__(self) -> None:
        self.eval_modules_at_train_batches: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.eval_modules_at_train_batches.append([n for n, m in pl_module.model.named_modules() if not m.training])


@pytest.mark.parametrize("layout", ["native", pytest.param("original", marks=pytest.mark.slow)])
def test_loaded_aligner_trains_in_train_mode_and_evaluates_in_eval_mode(tmp_path, layout):
    manifest = write_tone_corpus(tmp_path / "tones", 8, seed=2)
    model, processor = build_model(ModelConfig(source="tiny", task="aligner", num_labels=NUM_CLASSES), seed=0)
    checkpoint = (save_native if layout == "native" else save_original)(model, processor, tmp_path / "ckpt")
    cfg = make_config(
        [
            "recipe=aligner",
            "model=checkpoint",
            f"model.path={checkpoint}",
            "model.classifier_dropout=0.5",
            f"data.train={manifest}",
            "trainer=cpu",
            "trainer.max_steps=4",
            "trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "data.max_batch_seconds=6",
            f"+evaluation.sets.dev={manifest}",
            "evaluation.every_n_steps=2",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    recorder = _ModeRecorder()
    module, datamodule, trainer, _ = aligner_stage.prepare(cfg, [recorder])
    head_dropout = module.model.dropout
    assert head_dropout.p == 0.5
    calls: list[tuple[bool, bool]] = []  # (dropout in train mode, it changed its input) at every head call

    def watch(mod, inputs, output):
        calls.append((mod.training, not torch.equal(inputs[0], output)))

    handle = head_dropout.register_forward_hook(watch)
    try:
        training.fit(trainer, module, datamodule=datamodule)
    finally:
        handle.remove()
    assert len(recorder.eval_modules_at_train_batches) >= 4
    assert all(not names for names in recorder.eval_modules_at_train_batches), recorder.eval_modules_at_train_batches[0]
    train_calls = [changed for mode, changed in calls if mode]
    eval_calls = [changed for mode, changed in calls if not mode]
    assert len(train_calls) >= 4 and all(train_calls), "the head's dropout must be active in every training step"
    assert eval_calls and not any(eval_calls), "the evaluation hook must run the head without dropout"
    # the hook's evaluation at step 2 sits between training steps, which resumed in train mode
    first_eval = next(i for i, (mode, _) in enumerate(calls) if not mode)
    assert any(mode for mode, _ in calls[first_eval:]), "training after an evaluation must be in train mode again"
    assert (tmp_path / "run" / "eval" / "step-00000002" / "alignment_summary.json").exists()
