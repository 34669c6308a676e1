"""moeshard.cluster: config, checkpoints, tokenizers, the model math, the engine and the offline ``LLM`` API.

Names are imported lazily so that light modules (the client SDK) load without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "moeshard.cluster.engine.llm",
    "RequestOutput": "moeshard.cluster.engine.generation",
    "SamplingParams": "moeshard.cluster.engine.sampling",
    "ModelConfig": "moeshard.cluster.model.config",
    "EngineConfig": "moeshard.cluster.engine.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moeshard.cluster' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
