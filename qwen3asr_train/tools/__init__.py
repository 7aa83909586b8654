"""Corpus preparation, outside the training runtime: synthetic speech, MFA layouts and TextGrid import.

Why a separate subpackage: training never needs espeak-ng or praatio-based corpus tools, and these tools are
what ``qwen3asr-data`` (``tools/cli.py``) runs for a ``pip install`` user who has no checkout. Modules:
``synthetic`` (espeak-ng corpus, tone corpus for tests), ``textgrid`` (MFA TextGrids -> manifest rows),
``mfa_layout`` (manifest with word times -> MFA corpus + TextGrids), ``cli`` (the console command).
"""
