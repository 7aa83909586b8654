"""Checkout shortcut for ``qwen3asr-data report`` (installed with the package; see ``qwen3asr-data report --help``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qwen3asr_train.tools.cli import main as _cli_main  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``qwen3asr-data report`` with ``argv`` (default: the command line); return the exit status."""
    return _cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
