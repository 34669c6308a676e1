"""A model's own sampling defaults, read from its ``generation_config.json``, applied where a request omits a field.

As vLLM does: ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` and
``max_new_tokens`` (as the default ``max_tokens``). A checkpoint without the file, or a
field it does not set, keeps the OpenAI defaults (temperature 1, no top-p/top-k/min-p,
no repetition penalty).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"


class GenerationDefaults(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True)

    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None  # 0 or below: disabled, as in transformers
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    max_new_tokens: int | None = Field(default=None, ge=1)

    def sampling_fields(self) -> dict:
        """The set fields as ``SamplingParams`` keywords (``max_new_tokens`` is not among them)."""
        fields = self.model_dump(exclude_none=True, exclude={"max_new_tokens"})
        if "top_k" in fields and fields["top_k"] <= 0:
            fields["top_k"] = -1
        return fields


def read_generation_defaults(model_dir: str | Path) -> GenerationDefaults:
    """The defaults in ``model_dir``'s generation_config.json; none when it is missing or unreadable (logged)."""
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return GenerationDefaults()
    try:
        defaults = GenerationDefaults.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError, ValidationError) as exc:
        logger.warning("ignoring %s: %s", path, str(exc).splitlines()[0])
        return GenerationDefaults()
    if defaults.sampling_fields() or defaults.max_new_tokens:
        logger.info("sampling defaults from %s: %s", path, defaults.model_dump(exclude_none=True))
    return defaults
