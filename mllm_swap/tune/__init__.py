"""Tuning an MLLM: stages, LoRA/QLoRA, conversations, merging adapters."""
