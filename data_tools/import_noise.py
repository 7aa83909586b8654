"""Checkout shortcut for ``qwen3asr-data import-noise`` (see ``qwen3asr-data import-noise --help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _shortcut.py lies beside this file

from _shortcut import shortcut  # noqa: E402

main = shortcut("import-noise")
if __name__ == "__main__":
    raise SystemExit(main())
