"""Checkout shortcut for ``qwen3asr-data textgrid-to-manifest`` (see ``qwen3asr-data textgrid-to-manifest --help``)."""

from _shortcut import run

run("textgrid-to-manifest")
