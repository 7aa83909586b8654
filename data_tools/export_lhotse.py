"""Checkout shortcut for ``qwen3asr-data export-lhotse`` (see ``qwen3asr-data export-lhotse --help``)."""

from _shortcut import run

run("export-lhotse")
