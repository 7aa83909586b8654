"""Checkout shortcut for ``qwen3asr-data synth`` (see ``qwen3asr-data synth --help``)."""

from _shortcut import run

run("synth")
