"""``python -m qwen3asr_train recipe=<name> [overrides]`` — the one entry point of every stage.

Hydra composes ``configs/config.yaml`` with the chosen groups and overrides; the typed view
(:func:`qwen3asr_train.config.load.to_typed`) validates it; the recipe's ``run`` does the work.
Distributed runs use the same command: the strategy is a ``trainer=`` config, never another script.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from qwen3asr_train.config.load import CONFIG_DIR, check_paths, precheck_overrides, register_schemas, to_typed
from qwen3asr_train.config.schema import ConfigError, RunConfig

log = logging.getLogger("qwen3asr_train")


def _recipes() -> dict[str, Callable[[RunConfig], object]]:
    """Recipe name -> stage entry (imported lazily so ``--help`` and config errors stay fast)."""
    from qwen3asr_train.stages import aligner, evaluate, export, gspo, sft, transcribe

    return {
        "sft": sft.run,
        "export": export.run,
        "eval": evaluate.run,
        "gspo": gspo.run,
        "aligner": aligner.run,
        "transcribe": transcribe.run,
    }


register_schemas()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        typed = to_typed(cfg)
        check_paths(typed)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        sys.exit(2)
    _recipes()[typed.recipe.name](typed)


def main() -> None:
    """Console entry point (``qwen3asr-train``)."""
    try:
        precheck_overrides(sys.argv[1:])
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
