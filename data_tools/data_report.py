"""Checkout shortcut for ``qwen3asr-data report`` (see ``qwen3asr-data report --help``)."""

from _shortcut import run

run("report")
