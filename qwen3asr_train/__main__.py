"""``python -m qwen3asr_train recipe=<name> [overrides]`` — the one entry point of every stage.

Hydra composes ``configs/config.yaml`` with the chosen groups and overrides; the typed view
(:func:`qwen3asr_train.config.load.to_typed`) validates it; the recipe's ``run`` does the work.
Distributed runs use the same command: the strategy is a ``trainer=`` config, never another script.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
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

THIRD_PARTY_NOISE = (
    "litlogger",  # Lightning's advertisement on every run
    "The number of training batches",  # we log per optimizer-step window, not per Lightning interval
    "isinstance(treespec, LeafSpec)` is deprecated",  # Lightning vs torch 2.14 internals
    "Setting accelerator to CPU",  # DeepSpeed's import-time notice on machines without CUDA
)
"""Messages from other packages that say nothing to our users (our own warnings are never filtered)."""


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in THIRD_PARTY_NOISE)


def quiet_third_party_logs() -> None:
    """One line per message, and none of the known noise.

    Lightning attaches its own console handler to ``lightning.pytorch``/``lightning.fabric`` when imported
    before logging is configured, and Hydra then adds the root handler: every Lightning line came out twice.
    """
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "DeepSpeed"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropNoise())
    for noise in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=f".*{re.escape(noise)}.*")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        typed = to_typed(cfg)
        check_paths(typed)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        sys.exit(2)
    stage = _recipes()[typed.recipe.name]  # imports Lightning, which attaches its own console handler
    quiet_third_party_logs()
    stage(typed)


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
