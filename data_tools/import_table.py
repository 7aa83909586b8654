"""Checkout shortcut for ``qwen3asr-data import-table`` (see ``qwen3asr-data import-table --help``)."""

from _shortcut import run

run("import-table")
