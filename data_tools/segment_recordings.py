"""Checkout shortcut for ``qwen3asr-data segment`` (see ``qwen3asr-data segment --help``)."""

from _shortcut import run

run("segment")
