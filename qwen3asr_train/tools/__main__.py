"""``python -m qwen3asr_train.tools <command>``: the same as the ``qwen3asr-data`` console command."""

from qwen3asr_train.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
