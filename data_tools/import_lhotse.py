"""Checkout shortcut for ``qwen3asr-data import-lhotse`` (see ``qwen3asr-data import-lhotse --help``)."""

from _shortcut import run

run("import-lhotse")
