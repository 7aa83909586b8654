"""Checkout shortcut for ``qwen3asr-data validate`` (installed with the package; see ``qwen3asr-data validate --help``).

Why it stays: recipes and existing scripts call ``python data_tools/validate.py ...`` from a checkout; the
logic lives in ``qwen3asr_train.tools`` so that ``pip install .`` users get the same command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qwen3asr_train.tools.cli import main as _cli_main  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``qwen3asr-data validate`` with ``argv`` (default: the command line); return the exit status."""
    return _cli_main(["validate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
