"""Benchmarks: ``make bench`` (ours vs the official SFT recipe), ``make memory``, ``make gpu-check``."""
