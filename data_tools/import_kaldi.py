"""Checkout shortcut for ``qwen3asr-data import-kaldi`` (see ``qwen3asr-data import-kaldi --help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _shortcut.py lies beside this file

from _shortcut import shortcut  # noqa: E402

main = shortcut("import-kaldi")
if __name__ == "__main__":
    raise SystemExit(main())
