"""The engine: scheduling and stepping, sampling, generation with stop strings, engine assembly and the offline ``LLM``."""
