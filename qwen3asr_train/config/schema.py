"""Typed configuration schema: every field has a default and a one-line doc (the string under it). The
sections live in one module per group (``config/{model,data,trainer,recipes}.py``); this module assembles
the run and re-exports every section, so ``from qwen3asr_train.config.schema import X`` keeps working.

Why dataclasses under Hydra: the YAML files in ``configs/`` only override values; the schema here is
the single place where a field exists, has a type and a default. Hydra composes the YAML on top of
these structured configs (each group's YAML lists ``base`` first in its defaults), so a mistyped
override fails at composition. Cross-field rules live in each section's ``validate()`` (run over the
whole tree by :func:`qwen3asr_train.config.load.to_typed`, not in ``__post_init__``: Hydra builds the
defaults before the overrides arrive) and raise :class:`ConfigError` naming the key and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwen3asr_train.config.base import ConfigError, _as_list, _require
from qwen3asr_train.config.data import DataConfig, HFDatasetConfig
from qwen3asr_train.config.model import LoraConfig, ModelConfig, TinyModelConfig
from qwen3asr_train.config.recipes import (
    DEFAULT_REWARD_WEIGHTS,
    AlignerConfig,
    BiasingConfig,
    DecodeConfig,
    EvalConfig,
    EvalHookConfig,
    ExportConfig,
    GSPOConfig,
    GSPOSampling,
    MixSourceConfig,
    OptimConfig,
    SFTAugmentation,
    SFTConfig,
    TranscribeConfig,
)
from qwen3asr_train.config.trainer import LoggerConfig, TrainerConfig

RECIPE_SCHEMAS: dict[str, type] = {
    "sft": SFTConfig,
    "export": ExportConfig,
    "eval": EvalConfig,
    "gspo": GSPOConfig,
    "aligner": AlignerConfig,
    "transcribe": TranscribeConfig,
}
"""Recipe name -> its schema."""

TRAINING_RECIPES: frozenset[str] = frozenset({"sft", "gspo", "aligner"})
"""Recipes that train (they need data and a run length)."""


@dataclass
class RunConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model to build."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources and batching."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Metric logger."""
    recipe: Any = None
    """Stage settings (schema chosen by ``recipe.name``)."""
    evaluation: EvalHookConfig = field(default_factory=EvalHookConfig)
    """Periodic decoding of validation sets during training."""
    seed: int = 1234
    """Seed for weights, shuffling and augmentation choices."""
    run_dir: str = "outputs/run"
    """Directory for checkpoints, logs, the resolved config and exports (set by Hydra to its run dir)."""

    def validate(self) -> None:
        _require(self.recipe is not None, "recipe", "choose a recipe, e.g. recipe=sft")
        if self.recipe.name in TRAINING_RECIPES:
            _require(
                self.trainer.max_steps > 0 or (self.trainer.max_epochs or 0) > 0,
                "trainer.max_steps",
                "set trainer.max_steps (> 0) or trainer.max_epochs (> 0): the run needs a length",
            )
            has_mix = bool(getattr(self.recipe, "mix", None))
            _require(
                self.data.sources() > 0 or has_mix,
                "data.train",
                "no training data: set data.train=<manifest.jsonl> (or data.hf_train.path)",
            )
        if self.recipe.name == "aligner":
            _require(
                self.model.task == "aligner",
                "model.task",
                "recipe=aligner trains Qwen3ASRForTokenClassification: set model.task=aligner",
            )
        if self.recipe.name in {"sft", "gspo"}:
            _require(self.model.task == "asr", "model.task", f"recipe={self.recipe.name} trains an ASR model")
        if self.recipe.name == "gspo":
            _require(
                self.trainer.accumulate_grad_batches == 1,
                "trainer.accumulate_grad_batches",
                "GSPO optimises manually: each minibatch of a rollout is one optimizer step",
            )
            _require(
                self.trainer.checkpoint_every_n_steps % self.recipe.steps_per_rollout() == 0,
                "trainer.checkpoint_every_n_steps",
                "must be a multiple of recipe.steps_per_generation × "
                "recipe.num_iterations so checkpoints fall between rollout batches",
            )


__all__ = [
    "DEFAULT_REWARD_WEIGHTS",
    "RECIPE_SCHEMAS",
    "TRAINING_RECIPES",
    "AlignerConfig",
    "BiasingConfig",
    "ConfigError",
    "DataConfig",
    "DecodeConfig",
    "EvalConfig",
    "EvalHookConfig",
    "ExportConfig",
    "GSPOConfig",
    "GSPOSampling",
    "HFDatasetConfig",
    "LoggerConfig",
    "LoraConfig",
    "MixSourceConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SFTAugmentation",
    "SFTConfig",
    "TinyModelConfig",
    "TrainerConfig",
    "TranscribeConfig",
    "_as_list",
    "_require",
]
