"""What every config section shares: the error type and the checks that name the key."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value or combination that cannot work; the message names the key."""


def _require(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {reason}")


def _as_list(value: Any, key: str) -> list[str]:
    """Accept ``data.train=a.jsonl`` as well as ``data.train=[a.jsonl,b.jsonl]``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{key}: expected a path or a list of paths, got {value!r}")


def _require_target(spec: Any, key: str) -> None:
    """A ``_target_`` spec: a mapping whose ``_target_`` is an importable dotted path (checked at start-up, so a
    typo fails before any data or model is loaded)."""
    _require(isinstance(spec, Mapping) and isinstance(spec.get("_target_"), str), key, "needs a _target_ import path")
    path = spec["_target_"]
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}._target_: cannot import {module_name!r} ({exc})") from None
    _require(hasattr(module, attr), f"{key}._target_", f"{module_name!r} has no attribute {attr!r}")
