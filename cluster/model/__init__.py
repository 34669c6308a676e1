"""The model math on one process: config, checkpoint reading, layers, attention, the MoE block (experts injected), KV cache."""
