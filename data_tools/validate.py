"""Checkout shortcut for ``qwen3asr-data validate`` (see ``qwen3asr-data validate --help``)."""

from _shortcut import run

run("validate")
