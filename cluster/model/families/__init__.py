"""The architecture registry: ``config.json``'s ``architectures[0]`` -> its ``Family``.

Adding a family is one file beside these (its key names and its config fields)
and one line here.
"""

from __future__ import annotations

from moeshard.cluster.model.families.base import CheckpointKeys, ConfigError, Family, RawConfig
from moeshard.cluster.model.families.mixtral import MIXTRAL
from moeshard.cluster.model.families.olmoe import OLMOE
from moeshard.cluster.model.families.qwen2_moe import QWEN2_MOE
from moeshard.cluster.model.families.qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {f.architecture: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def unsupported_message(architecture: str) -> str:
    return f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"


def family_of(architecture: str) -> Family:
    if architecture not in FAMILIES:
        raise ConfigError(unsupported_message(architecture))
    return FAMILIES[architecture]


__all__ = ["CheckpointKeys", "ConfigError", "FAMILIES", "Family", "RawConfig", "SUPPORTED_ARCHITECTURES", "family_of", "unsupported_message"]
