"""Checkout shortcut for ``qwen3asr-data import-hf`` (see ``qwen3asr-data import-hf --help``)."""

from _shortcut import run

run("import-hf")
