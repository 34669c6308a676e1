"""Checkpoint conversion: GGUF reading, upcycling a dense model to experts, the demo and synthetic checkpoints, the safetensors writer."""
