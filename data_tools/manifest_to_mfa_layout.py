"""Checkout shortcut for ``qwen3asr-data mfa-layout`` (see ``qwen3asr-data mfa-layout --help``)."""

from _shortcut import run

run("mfa-layout")
