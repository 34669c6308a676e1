"""The offline API: ``LLM(model_dir).generate(prompts, params)`` and ``LLM.logits(token_ids)``.

``expert_actors=0`` runs everything in this process: the reference path that
the expert-sharded cluster must equal.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeshard.cluster.checkpoint import CheckpointReader
from moeshard.cluster.config import EngineConfig, ModelConfig
from moeshard.cluster.detokenizer import IncrementalDetokenizer
from moeshard.cluster.engine import Engine, FinishReason
from moeshard.cluster.kv_cache import KVCache
from moeshard.cluster.model import MixtralModel
from moeshard.cluster.moe import ExpertsFn, LocalExperts
from moeshard.cluster.sampling import SamplingParams
from moeshard.cluster.stop_strings import StopStringMatcher
from moeshard.cluster.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids only
    text: str = ""
    finish_reason: str | None = None


class LLM:
    def __init__(self, model_dir: str | Path, expert_actors: int = 0, dtype: str = "float32", **options):
        self.config = EngineConfig(model_dir=str(model_dir), expert_actors=expert_actors, dtype=dtype, **options)
        self.model_config = ModelConfig.from_model_dir(model_dir)
        self.tokenizer: Tokenizer | None = _maybe_tokenizer(Path(model_dir))
        torch_dtype = getattr(torch, self.config.dtype)
        reader = CheckpointReader(model_dir, self.model_config)
        dense = reader.read_dense(torch_dtype)
        experts = self._make_experts(reader, torch_dtype)
        mc = self.model_config
        cache = KVCache.with_budget(
            mc.num_layers, mc.num_kv_heads, mc.head_dim, self.config.kv_cache_bytes, self.config.kv_block_size, torch_dtype
        )
        eos = frozenset(mc.eos_token_ids) or (self.tokenizer.eos_token_ids if self.tokenizer else frozenset())
        self.engine = Engine(MixtralModel(mc, dense, experts, cache), eos, self.config.max_batch_tokens)
        self._request_ids = itertools.count()
        self._closed = False

    def _make_experts(self, reader: CheckpointReader, dtype: torch.dtype) -> ExpertsFn:
        if self.config.expert_actors == 0:
            return LocalExperts.from_checkpoint(reader, dtype)
        raise NotImplementedError("expert_actors > 0 needs the Ray cluster backend")

    # -- public API ---------------------------------------------------------------
    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); one output per prompt, in order."""
        self._check_open()
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(params, len(prompt_list))
        outputs, detoks, stops = {}, {}, {}
        for prompt, p in zip(prompt_list, params_list):
            request_id = str(next(self._request_ids))
            ids = self.encode(prompt)
            self.engine.add_request(request_id, ids, p)
            outputs[request_id] = RequestOutput(prompt_token_ids=ids)
            detoks[request_id] = IncrementalDetokenizer(self.tokenizer, prompt_ids=ids) if self.tokenizer else None
            stops[request_id] = StopStringMatcher(p.stop)
        try:
            while self.engine.has_work():
                for event in self.engine.step():
                    out = outputs[event.request_id]
                    out.token_ids.append(event.token_id)
                    detok = detoks[event.request_id]
                    finish = event.finish_reason
                    if detok is not None:
                        detok.push(event.token_id)
                        match = stops[event.request_id].search(detok.text)
                        out.text = detok.text if match is None else match.text
                        if match is not None and finish is None:
                            self.engine.abort(event.request_id)
                            finish = FinishReason.STOP
                    if finish is not None:
                        out.finish_reason = finish.value
        finally:
            for request_id in outputs:  # an exception must not leave requests holding the cache
                self.engine.abort(request_id)
        return list(outputs.values())

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 logits [T, vocab] of a prefill over ``token_ids``."""
        self._check_open()
        return self.engine.prompt_logits([int(t) for t in token_ids])

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model_dir} has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LLM is closed")


def _maybe_tokenizer(model_dir: Path) -> Tokenizer | None:
    if not any((model_dir / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        logger.warning("%s has no tokenizer; only token-id prompts will work", model_dir)
        return None
    return load_tokenizer(model_dir)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt of token ids
    return prompts


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params
