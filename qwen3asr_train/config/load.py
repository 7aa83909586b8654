"""Hydra wiring: schema registration, the config directory, and the typed view of a composed config.

Why: the YAML tree in ``configs/`` overrides values of the dataclass schemas registered here (each
group's YAML lists ``base`` first in its defaults list), so a typo or a wrongly typed override fails
while Hydra composes. :func:`to_typed` then builds the dataclasses, which runs every cross-field check.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from qwen3asr_train.config.schema import (
    RECIPE_SCHEMAS,
    ConfigError,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    RunConfig,
    TrainerConfig,
)

CONFIG_DIR: Path = Path(__file__).resolve().parent.parent / "configs"
"""The Hydra config tree. In a source checkout ``qwen3asr_train/configs`` links to the top-level
``configs/``; in an installed wheel the YAML files are package data at the same place."""

_registered = False


def register_schemas() -> None:
    """Register the dataclass schemas as ``base`` options of their groups (idempotent)."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="run_base", node=RunConfig)
    cs.store(group="model", name="base", node=ModelConfig)
    cs.store(group="data", name="base", node=DataConfig)
    cs.store(group="trainer", name="base", node=TrainerConfig)
    cs.store(group="logger", name="base", node=LoggerConfig)
    for name, schema in RECIPE_SCHEMAS.items():
        cs.store(group="recipe", name=f"{name}_base", node=schema)
    _registered = True


def to_typed(cfg: DictConfig) -> RunConfig:
    """Resolve interpolations and build the typed config, running every ``validate()`` check.

    Raises:
        ConfigError: for an unknown recipe or any failed cross-field rule (the message names the key).
    """
    recipe_name = OmegaConf.select(cfg, "recipe.name")
    if recipe_name not in RECIPE_SCHEMAS:
        raise ConfigError(f"recipe.name: unknown recipe {recipe_name!r}; choose one of {sorted(RECIPE_SCHEMAS)}")
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    merged.recipe = OmegaConf.merge(OmegaConf.structured(RECIPE_SCHEMAS[recipe_name]), cfg.recipe)
    typed = OmegaConf.to_object(merged)
    assert isinstance(typed, RunConfig)
    _validate_tree(typed)
    return typed


def _validate_tree(node: object) -> None:
    """Call ``validate()`` on every dataclass in the tree, innermost first."""
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return
    for f in dataclasses.fields(node):
        _validate_tree(getattr(node, f.name))
    validate = getattr(node, "validate", None)
    if callable(validate):
        validate()
