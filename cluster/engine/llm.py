"""The offline API: ``LLM(model_dir).generate(prompts, params)`` and ``LLM.logits(token_ids)``.

``expert_actors=0`` runs everything in this process: the reference path. With
``expert_actors=N`` a coordinator actor and N expert actors run on Ray, and
the outputs must equal the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeshard.cluster.engine.assembly import build_engine, read_model_files
from moeshard.cluster.engine.config import ClusterConfig, EngineConfig
from moeshard.cluster.engine.generation import RequestOutput, generate_to_completion
from moeshard.cluster.engine.generation_defaults import read_generation_defaults
from moeshard.cluster.engine.prompts import Prompt, as_prompt_list, encode_prompt
from moeshard.cluster.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from moeshard.cluster.analysis.capture import RoutedTokens

logger = logging.getLogger(__name__)

__all__ = ["LLM", "Prompt", "RequestOutput"]


class LLM:
    def __init__(
        self,
        model_dir: str | Path,
        expert_actors: int = 0,
        dtype: str = "auto",
        ray_address: str | None = None,
        cluster: dict | ClusterConfig | None = None,
        **options,
    ):
        cluster_fields = dict(cluster or {}) if not isinstance(cluster, ClusterConfig) else cluster.model_dump()
        cluster_fields.update(expert_actors=expert_actors, ray_address=ray_address)
        self.config = EngineConfig(model_dir=str(model_dir), dtype=dtype, cluster=cluster_fields, **options)
        files = read_model_files(model_dir)
        self.model_config = files.model_config
        self.tokenizer = files.tokenizer
        self.generation_defaults = read_generation_defaults(model_dir)
        self._engine = None
        self._cluster = None
        if expert_actors == 0:
            self._engine = build_engine(self.config, files)
        else:
            from moeshard.actors.launch import launch_cluster  # Ray is imported only for the cluster path

            self._cluster = launch_cluster(self.config, self.model_config)
        self._closed = False

    # -- public API ---------------------------------------------------------------
    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); one output per prompt, in order.

        Without ``params``, the model's own defaults (``default_sampling_params``).
        """
        self._check_open()
        prompt_ids = [self.encode(p) for p in as_prompt_list(prompts)]
        params_list = _as_params_list(params if params is not None else self.default_sampling_params(), len(prompt_ids))
        if self._cluster is not None:
            return self._cluster.generate(prompt_ids, params_list)
        return generate_to_completion(self._engine, self.tokenizer, prompt_ids, params_list)

    def default_sampling_params(self) -> SamplingParams:
        """``SamplingParams`` with the model's generation_config.json defaults (temperature, top_p, top_k, min_p,
        repetition_penalty, and max_new_tokens as max_tokens) where it sets them."""
        defaults = self.generation_defaults
        return SamplingParams(max_tokens=defaults.max_new_tokens or SamplingParams().max_tokens, **defaults.sampling_fields())

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 logits [T, vocab] of a prefill over ``token_ids``."""
        self._check_open()
        ids = [int(t) for t in token_ids]
        if self._cluster is not None:
            return self._cluster.logits(ids)
        return self._engine.prompt_logits(ids)

    def route_tokens(self, token_ids: Sequence[int]) -> RoutedTokens:
        """Every MoE layer's expert ids for a prefill over ``token_ids`` (a ``RoutedTokens``; see cluster/analysis/)."""
        self._check_open()
        ids = [int(t) for t in token_ids]
        if self._cluster is not None:
            return self._cluster.route_tokens(ids)
        from moeshard.cluster.analysis.capture import route_tokens

        return route_tokens(self._engine, ids)

    @property
    def engine(self):
        """The in-process ``Engine`` (its requests and steps), None when the experts run on actors."""
        return self._engine

    def placement(self) -> list[dict]:
        """Which actor (and node) hosts which (layer, expert); empty in single-process mode."""
        self._check_open()
        return self._cluster.placement_report() if self._cluster is not None else []

    def expert_health(self):
        """The expert actors' failures, the ones down now and the recoveries so far (a ``HealthSnapshot``); None in one process."""
        self._check_open()
        return self._cluster.expert_health() if self._cluster is not None else None

    def rebalance(self):
        """Rebalance the experts from the load measured since the last rebalance (a ``RebalanceReport``).

        Replicas of the hottest experts fill the spare slots (``cluster={"redundant_experts": R}``) and each
        actor's expected rows are evened out; the actors load their new experts in the background and the
        dispatch switches between two steps, so a generation running meanwhile goes on, with the same outputs.
        A shared pool (``cluster.pool_name``) is rebalanced by its manager, from every coordinator's load."""
        self._check_open()
        if self._cluster is None:
            raise RuntimeError("rebalance needs expert actors (expert_actors > 0)")
        return self._cluster.rebalance()

    def scale(self, expert_actors: int):
        """Grow or shrink the pool to ``expert_actors`` expert actors while generating (a ``ScaleReport``).

        New actors start and load their experts (on another node if that is where the cluster has room), the
        actors that stay load the experts moved to them, and the dispatch switches between two steps; removed
        actors are stopped once no coordinator sends them work. Outputs do not change."""
        self._check_open()
        if self._cluster is None:
            raise RuntimeError("scale needs expert actors (expert_actors > 0)")
        return self._cluster.scale(expert_actors)

    def expert_balance(self) -> dict | None:
        """Rows per actor per step and imbalance per layer since the last rebalance, and that rebalance; None in one process."""
        self._check_open()
        return self._cluster.expert_balance() if self._cluster is not None else None

    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(prompt, self.tokenizer)

    def close(self) -> None:
        """Release the model: stop the cluster's actors, or drop the in-process weights and KV cache."""
        if self._cluster is not None and not self._closed:
            self._cluster.shutdown()
        self._cluster = None
        self._engine = None
        self._closed = True

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LLM is closed")


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params
