"""qwen3asr_train."""
