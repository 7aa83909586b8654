"""Hydra wiring: schema registration, the config directory, and the typed view of a composed config.

Why: the YAML tree in ``configs/`` overrides values of the dataclass schemas registered here (each
group's YAML lists ``base`` first in its defaults list), so a typo or a wrongly typed override fails
while Hydra composes. :func:`to_typed` then builds the dataclasses, which runs every cross-field check.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import typing
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from qwen3asr_train.config.schema import (
    RECIPE_SCHEMAS,
    TRAINING_RECIPES,
    ConfigError,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    RunConfig,
    TrainerConfig,
    _as_list,
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
    for key in _leaf_keys(cfg):  # a `+key=...` the schema does not know would otherwise be dropped silently
        check_key(key, RECIPE_SCHEMAS[recipe_name])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        merged.recipe = OmegaConf.merge(OmegaConf.structured(RECIPE_SCHEMAS[recipe_name]), cfg.recipe)
        typed = OmegaConf.to_object(merged)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key}: is required; set {exc.full_key}=<value> (see `--cfg job`)") from None
    except ValidationError as exc:
        raise ConfigError(f"{exc.full_key}: {exc.msg}") from None
    assert isinstance(typed, RunConfig)
    _validate_tree(typed)
    return typed


FREE_FORM_ROOTS = ("hydra",)
"""Top-level keys that are not part of the schema."""


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if not prefix and key in FREE_FORM_ROOTS:
            continue
        value = node._get_node(key)
        if isinstance(value, DictConfig) and not value._is_missing() and not value._is_none() and len(value):
            keys += _leaf_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def check_key(key: str, recipe_schema: type | None = None) -> None:
    """Raise :class:`ConfigError` unless ``key`` (dotted) names a field of the schema.

    Below a dict-typed field (``recipe.sets``, ``recipe.mix``, ``*._target_`` specs, ...) anything goes. With no
    ``recipe_schema`` a ``recipe.*`` key may be a field of any recipe. Unknown keys get a "did you mean".
    """
    parts = key.split(".")
    schemas: list[type] = [RunConfig]
    for depth, part in enumerate(parts):
        candidates = [s for s in schemas if part in _field_types(s)]
        if not candidates:
            known = sorted({name for s in schemas for name in _field_types(s)})
            where = ".".join(parts[:depth])
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"did you mean {'.'.join([*parts[:depth], close[0]])}?" if close else f"known keys: {known}"
            raise ConfigError(f"{key}: unknown key{' under ' + where if where else ''}; {hint}")
        next_schemas: list[type] = []
        for schema in candidates:
            if schema is RunConfig and part == "recipe":
                next_schemas += [recipe_schema] if recipe_schema is not None else list(RECIPE_SCHEMAS.values())
                continue
            kind = _field_types(schema)[part]
            if dataclasses.is_dataclass(kind):
                next_schemas.append(kind)
        if not next_schemas:
            return  # a leaf or a free-form field: deeper keys are its own business
        schemas = next_schemas


@functools.cache
def _field_types(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _validate_tree(node: object) -> None:
    """Call ``validate()`` on every dataclass in the tree, innermost first."""
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return
    for f in dataclasses.fields(node):
        _validate_tree(getattr(node, f.name))
    validate = getattr(node, "validate", None)
    if callable(validate):
        validate()


GROUP_NAMES = frozenset({"model", "data", "trainer", "logger", "recipe", "experiment", "debug"})
"""Config groups chosen by name on the command line (``model=tiny``), not schema keys."""


def precheck_overrides(args: list[str]) -> None:
    """Check plain ``key=value`` command-line overrides against the schema before Hydra composes.

    Why: for a typo such as ``trainer.max_step=5`` Hydra answers "To append to your config use
    +trainer.max_step=5", and following that advice used to run with the key dropped. Keys added with ``+``
    are checked after composition (:func:`to_typed`).
    """
    recipe = next((a.split("=", 1)[1] for a in args if a.startswith("recipe=")), None)
    schema = RECIPE_SCHEMAS.get(recipe) if recipe else None
    for arg in args:
        if "=" not in arg or arg.startswith(("-", "+", "~")):
            continue
        key = arg.split("=", 1)[0]
        if key in GROUP_NAMES or key == "hydra" or key.startswith("hydra."):
            continue
        check_key(key, schema)


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id (``Org/Name``)."""
    return path.startswith(("/", ".", "~")) or path.count("/") != 1


def _need_path(key: str, value: str | None, kind: str = "path") -> None:
    if value and not Path(value).expanduser().exists():
        raise ConfigError(f"{key}={value}: no such {kind} (relative paths are taken from {Path.cwd()})")


def check_paths(cfg: RunConfig) -> None:
    """Every path the run will read, checked before any data or model is loaded (the CLI calls this).

    Not part of :func:`to_typed`: configs are composed in tests and tools without the files existing.
    """
    recipe = cfg.recipe
    model_path = cfg.model.path
    if cfg.model.source == "pretrained" and model_path and recipe.name in TRAINING_RECIPES:
        if _looks_local(model_path):
            _need_path("model.path", model_path, "model directory (a hub id looks like Org/Name)")
    if recipe.name in TRAINING_RECIPES:
        for key, paths in (("data.train", cfg.data.train), ("data.valid", cfg.data.valid)):
            for path in _as_list(paths, key):
                _need_path(key, path, "manifest")
        for name, path in cfg.evaluation.sets.items():
            _need_path(f"evaluation.sets.{name}", path, "manifest")
        resume = getattr(recipe, "resume_from", None)
        if resume not in (None, "auto", "last"):
            _need_path("recipe.resume_from", resume, "checkpoint")
        for name, source in (getattr(recipe, "mix", None) or {}).items():
            for path in source.manifests:
                _need_path(f"recipe.mix.{name}.manifests", path, "manifest")
    if recipe.name == "eval":
        _need_path("recipe.model_path", recipe.model_path, "export, run directory or checkpoint")
        for name, path in recipe.sets.items():
            _need_path(f"recipe.sets.{name}", path, "manifest")
        _check_weights_present(Path(recipe.model_path))
    if recipe.name == "export":
        _need_path("recipe.checkpoint", recipe.checkpoint, "checkpoint or run directory")
    if recipe.name == "transcribe":
        _need_path("recipe.model_path", recipe.model_path, "export, run directory or checkpoint")
        _check_weights_present(Path(recipe.model_path))
        for path in recipe.inputs:
            _need_path("recipe.inputs", path, "audio file, folder or manifest")


def _check_weights_present(directory: Path) -> None:
    """A model directory must hold weights; a run's ``model_init`` holds them only for from-scratch models."""
    if not (directory / "config.json").is_file() or any(directory.glob("*.safetensors")):
        return
    started = None
    run_json = directory.parent / "run.json"
    if directory.name == "model_init" and run_json.is_file():
        started = (json.loads(run_json.read_text(encoding="utf-8")).get("model") or {}).get("path")
    advice = (
        f"this run started from {started}: evaluate that for the starting model, or the run directory "
        f"{directory.parent} (its newest checkpoint) or its export/ for the trained one"
        if started
        else "point recipe.model_path at an export, a run directory or a .ckpt"
    )
    raise ConfigError(f"recipe.model_path={directory}: no weights (*.safetensors) in this directory; {advice}")
