"""Shared body of the ``data_tools/`` checkout shortcuts: ``python data_tools/<tool>.py ARGS`` runs
``qwen3asr-data <subcommand> ARGS`` from a checkout without installing the package.

Why they stay: recipes and existing scripts call ``python data_tools/...`` from a checkout; the logic lives
in ``qwen3asr_train.tools`` so that ``pip install .`` users get the same commands.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, uninstalled

from qwen3asr_train.tools.cli import main as cli_main  # noqa: E402


def shortcut(subcommand: str) -> Callable[[Sequence[str] | None], int]:
    """``main(argv=None)`` of a shortcut: run ``qwen3asr-data <subcommand>`` with ``argv`` (default: the
    command line) and return its exit status."""

    def main(argv: Sequence[str] | None = None) -> int:
        return cli_main([subcommand, *(sys.argv[1:] if argv is None else argv)])

    main.__doc__ = f"Run ``qwen3asr-data {subcommand}``; return the exit status."
    return main
