"""Checkout shortcut for ``qwen3asr-data import-kaldi`` (see ``qwen3asr-data import-kaldi --help``)."""

from _shortcut import run

run("import-kaldi")
