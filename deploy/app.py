"""The Ray Serve application: an OpenAI-compatible HTTP server in front of the MoE engine.

``build_app(args)`` is the one builder, usable from ``serve run deploy/serve.yaml``
(``import_path: moeshard.deploy.app:build_app``) and from ``moeshard serve``.
The ingress replica is the coordinator: it runs embeddings, attention with its
KV cache, routers and LM head, and dispatches every MoE layer to the expert
actors it started (or to local experts when ``expert_actors`` is 0).

Before a route runs, the edge guard (``edge.py``) checks the API key and the body size. A route
then checks the model name and the prompt's length in characters (``limits.py``), tokenizes off
the event loop, checks the request's total work, and admits its sequences: per client
(``admission.py``, 429) and into the engine's queue (503). Every error is OpenAI-shaped JSON.
"""

# No "from __future__ import annotations": FastAPI must see real types on the Serve ingress methods.
import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException

from moeshard.actors.pool.service import PoolManagerUnavailable, SharedExpertPool
from moeshard.cluster.analysis.live_window import attach_live_window
from moeshard.cluster.engine.assembly import build_engine, read_model_files
from moeshard.cluster.engine.async_engine import (
    AsyncEngine,
    EngineStopped,
    Overloaded,
    RequestFailed,
    RequestHandle,
    StreamDelta,
)
from moeshard.cluster.engine.generation_defaults import read_generation_defaults
from moeshard.cluster.engine.prompts import encode_prompt
from moeshard.cluster.errors import one_line
from moeshard.deploy.admission import ClientAdmission, client_id
from moeshard.deploy.config import ServeArgs, replica_cpus
from moeshard.deploy.edge import EdgeGuard, configure_edge
from moeshard.deploy.errors import APIError, error_body, error_response, validation_error_response
from moeshard.deploy.limits import check_choices, check_prompt_chars, check_work
from moeshard.deploy.logprobs import ChoiceLogprobs
from moeshard.deploy.metrics import ServerMetrics
from moeshard.deploy.protocol import ChatCompletionRequest, CompletionRequest, ScaleRequest, envelope, usage_counts

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

api = FastAPI(title="moeshard", description="OpenAI-compatible serving of Mixture-of-Experts models")
api.add_middleware(EdgeGuard)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.retry_after_s)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error_response(exc)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route 404, wrong method 405, unparsable body 400) in OpenAI's shape."""
    return error_response(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, TaskCancelledError):  # Serve cancels a request's receive when its client goes away
        logger.info("client went away during %s", request.url.path)
    else:
        logger.exception("unexpected error on %s", request.url.path)
    return error_response(500, f"internal error: {one_line(exc)}")


# Serve pickles the class as it is decorated: what its methods call must be imported above, not defined below.
@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress(api)
class ServingCoordinator:
    def __init__(self, args: dict):
        self.args = ServeArgs(**args)
        configure_edge(self.args.edge_settings())  # first: a missing key fails the replica before anything loads
        config = self.args.engine_config()
        torch.set_num_threads(replica_cpus(config))  # the CPUs it asked Ray for
        files = read_model_files(config.model_dir)
        self.tokenizer = files.tokenizer
        self.defaults = read_generation_defaults(config.model_dir)  # for the fields a request omits
        self.pool = None
        self.experts = None  # None: the experts run in this process
        if config.cluster.expert_actors > 0:
            from moeshard.actors.dispatch import remote_experts
            from moeshard.actors.pool.service import attach_expert_pool

            # The shared pool, started by the first replica; its manager scales and rebalances it.
            self.pool = attach_expert_pool(config, files.model_config)
            self.experts = remote_experts(config, self.pool.placement, self.pool.actors)
            self.pool.follow(self.experts)  # report load, and switch with the pool when it changes
        engine = build_engine(config, files, self.experts)
        self.routing = attach_live_window(engine, self.args.routing_window)  # /v1/experts' routing
        self.engine = AsyncEngine(engine, self.tokenizer, self.args.max_waiting, self.args.request_timeout_s)
        self.admission = ClientAdmission(self.args.limits.max_sequences_per_client, self.args.limits.retry_after_s)
        self.coordinator_id = ray.get_runtime_context().get_actor_id()
        self.metrics = ServerMetrics()
        self.metrics.coordinator_info.labels(self.coordinator_id).set(1)
        self.created = int(time.time())
        logger.info("serving %s as %r", config.model_dir, self.args.served_model_name)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown()

    # -- plumbing -------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.args.served_model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.args.served_model_name}'", "model")

    def _submit(self, prompt_ids: list[int], params, with_prompt: bool, on_done) -> RequestHandle:
        try:
            return self.engine.submit(prompt_ids, params, detokenize_with_prompt=with_prompt, on_done=on_done)
        except (Overloaded, EngineStopped) as exc:
            self.metrics.requests.labels("overloaded").inc()
            raise APIError(503, str(exc), retry_after_s=self.args.limits.retry_after_s) from None
        except ValueError as exc:
            self.metrics.requests.labels("invalid").inc()
            raise APIError(400, one_line(exc), "prompt") from None

    def _submit_all(self, request: Request, jobs: list[tuple[list[int], object]], with_prompt: bool) -> list[RequestHandle]:
        """Admit every choice or none (checked for total work and the client's share first)."""
        try:
            self.engine.engine.check_params(jobs[0][1])  # what depends on the model: logit_bias ids against the vocabulary
        except ValueError as exc:
            raise APIError(400, one_line(exc), "logit_bias") from None
        check_work(len(jobs), max(params.max_tokens for _, params in jobs), self.args.limits)
        client = client_id(request.scope, self.args.client_header)
        try:
            self.admission.acquire(client, len(jobs))
        except APIError:
            self.metrics.requests.labels("limited").inc()
            raise
        handles: list[RequestHandle] = []
        try:
            for prompt_ids, params in jobs:
                handles.append(self._submit(prompt_ids, params, with_prompt, self.admission.releaser(client)))
        except APIError:
            self.admission.release(client, len(jobs) - len(handles))
            for handle in handles:  # each returns its own slot when the engine drops it
                handle.abort()
            raise
        return handles

    async def _encode_prompts(self, body: CompletionRequest) -> list[list[int]]:
        """Token ids of every prompt, tokenized off the event loop after a length check in characters."""
        check_prompt_chars(body.texts(), self.args.limits, "prompt")
        try:
            prompts = body.prompts()
            check_choices(len(prompts) * body.n)
            return await asyncio.to_thread(lambda: [encode_prompt(p, self.tokenizer) for p in prompts])
        except ValueError as exc:
            raise APIError(400, one_line(exc), "prompt") from None

    async def _encode_chat(self, body: ChatCompletionRequest) -> list[int]:
        """The chat prompt's token ids, templated and tokenized off the event loop after a length check."""
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat")
        check_prompt_chars(body.texts(), self.args.limits, "messages")
        try:
            return await asyncio.to_thread(self.tokenizer.encode_chat, body.plain_messages())
        except ValueError as exc:
            raise APIError(400, one_line(exc), "messages") from None

    async def _timed(self, index: int, handle: RequestHandle, started: float) -> AsyncIterator[tuple[int, StreamDelta]]:
        """A choice's deltas, recording time to first token and time per output token."""
        last = None
        async for delta in handle.stream():
            now = time.monotonic()
            if last is None:
                self.metrics.time_to_first_token.observe(now - started)
            else:
                self.metrics.time_per_output_token.observe(now - last)
            last = now
            self.metrics.generation_tokens.inc(len(delta.token_ids))
            yield index, delta

    async def _collect(self, handles: list[RequestHandle]) -> list[dict]:
        started = time.monotonic()

        async def one(index: int, handle: RequestHandle) -> dict:
            text, ids, logprobs, prompt_logprobs, finish = [], [], [], None, None
            async for _, delta in self._timed(index, handle, started):
                text.append(delta.text)
                ids += delta.token_ids
                logprobs += delta.logprobs or []
                prompt_logprobs = delta.prompt_logprobs or prompt_logprobs
                finish = delta.finish_reason
            return {
                "index": index, "text": "".join(text), "tokens": len(ids), "token_ids": ids, "finish_reason": finish,
                "logprobs": logprobs, "prompt_logprobs": prompt_logprobs,
            }  # fmt: skip

        try:
            results = await asyncio.gather(*(one(i, h) for i, h in enumerate(handles)))
        except RequestFailed as exc:
            self.metrics.requests.labels("failed").inc()
            for handle in handles:
                handle.abort()
            raise APIError(500, f"generation failed: {exc}") from None
        self.metrics.requests.labels("ok").inc()
        return results

    async def _merged(self, handles: list[RequestHandle]) -> AsyncIterator[tuple[int, StreamDelta]]:
        """Every choice's deltas as they come; cancelling this generator cancels (and frees) them all."""
        started = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle) -> None:
            try:
                async for item in self._timed(index, handle, started):
                    await queue.put(item)
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            for handle in handles:
                handle.abort()

    def _sse(self, chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
                self.metrics.requests.labels("ok").inc()
            except RequestFailed as exc:
                self.metrics.requests.labels("failed").inc()
                yield f"data: {json.dumps(error_body(500, f'generation failed: {exc}'))}\n\n"
            except APIError as exc:
                self.metrics.requests.labels("failed").inc()
                yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.param))}\n\n"
            except asyncio.CancelledError:
                self.metrics.requests.labels("cancelled").inc()
                raise
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    # -- routes ---------------------------------------------------------------------
    @api.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.args.served_model_name, "object": "model", "created": self.created, "owned_by": "moeshard"}],
        }

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        prompts = await self._encode_prompts(body)
        n = body.n
        room = self.engine.engine.max_model_len
        jobs = [
            (ids, body.sampling_params(DEFAULT_COMPLETION_MAX_TOKENS, c, self.defaults, max(1, room - len(ids))))
            for ids in prompts
            for c in range(n)
        ]
        handles = self._submit_all(request, jobs, with_prompt=True)
        prompt_tokens = sum(len(ids) for ids in prompts)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        model = self.args.served_model_name
        echoes = body.echo_texts(prompts, self.tokenizer.decode if self.tokenizer else None)  # "" without echo
        trackers = [ChoiceLogprobs(self.tokenizer, [] if body.echo else prompts[i // n]) for i in range(len(jobs))]
        wants_logprobs = body.logprobs is not None

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            return envelope(request_id, "text_completion", created, model, choices, usage)

        def choice(index: int, text: str, ids: list[int], logprobs, prompt_logprobs, finish: str | None) -> dict:
            formatted = trackers[index].with_prompt(prompts[index // n], prompt_logprobs, ids, logprobs) if wants_logprobs else None
            return {"index": index, "text": text, "logprobs": formatted, "finish_reason": finish}

        if not body.stream:
            results = await self._collect(handles)
            if body.echo_only:  # the one sampled token is not part of the answer
                results = [{**r, "text": "", "token_ids": [], "logprobs": [], "tokens": 0} for r in results]
            choices = [
                choice(r["index"], echoes[r["index"] // n] + r["text"], r["token_ids"], r["logprobs"], r["prompt_logprobs"], r["finish_reason"])
                for r in results
            ]
            return chunk(choices, usage_counts(prompt_tokens, sum(r["tokens"] for r in results)))

        async def chunks() -> AsyncIterator[dict]:
            generated, started = 0, set()
            async for index, delta in self._merged(handles):
                if body.echo_only:
                    delta = replace(delta, token_ids=[], text="", logprobs=[])
                generated += len(delta.token_ids)
                echo = "" if index in started else echoes[index // n]
                started.add(index)
                if delta.text or delta.finish_reason or echo or wants_logprobs:
                    c = choice(index, echo + delta.text, delta.token_ids, delta.logprobs, delta.prompt_logprobs, delta.finish_reason)
                    yield chunk([c])
            if body.include_usage:
                yield chunk([], usage_counts(prompt_tokens, generated))

        return self._sse(chunks())

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        prompt_ids = await self._encode_chat(body)
        remaining = max(1, self.engine.engine.max_model_len - len(prompt_ids))
        jobs = [(prompt_ids, body.sampling_params(remaining, c, self.defaults, remaining)) for c in range(body.n)]
        handles = self._submit_all(request, jobs, with_prompt=False)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        model = self.args.served_model_name
        trackers = [ChoiceLogprobs(self.tokenizer, prompt_ids) for _ in range(body.n)]

        def chunk(choices: list[dict], usage: dict | None = None, final: bool = False) -> dict:
            kind = "chat.completion" if final else "chat.completion.chunk"
            return envelope(request_id, kind, created, model, choices, usage)

        def logprobs(index: int, ids: list[int], entries) -> dict | None:
            return trackers[index].chat(ids, entries or []) if body.logprobs else None

        if not body.stream:
            results = await self._collect(handles)
            choices = [
                {
                    "index": r["index"],
                    "message": {"role": "assistant", "content": r["text"]},
                    "logprobs": logprobs(r["index"], r["token_ids"], r["logprobs"]),
                    "finish_reason": r["finish_reason"],
                }
                for r in results
            ]
            return chunk(choices, usage_counts(len(prompt_ids), sum(r["tokens"] for r in results)), final=True)

        async def chunks() -> AsyncIterator[dict]:
            for index in range(body.n):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            generated = 0
            async for index, delta in self._merged(handles):
                generated += len(delta.token_ids)
                if delta.text or delta.finish_reason or body.logprobs:
                    content = {"content": delta.text} if delta.text else {}
                    lp = logprobs(index, delta.token_ids, delta.logprobs)
                    yield chunk([{"index": index, "delta": content, "logprobs": lp, "finish_reason": delta.finish_reason}])
            if body.include_usage:
                yield chunk([], usage_counts(len(prompt_ids), generated))

        return self._sse(chunks())

    @api.get("/health")
    async def health(self, request: Request) -> JSONResponse:
        """Liveness for anyone (status only); with the API key (or none set), the coordinator's and each expert actor's state."""
        experts = await asyncio.to_thread(self.pool.health, self.experts.health.snapshot()) if self.pool is not None else []
        alive = self.engine.is_running
        healthy = alive and all(e["state"] != "down" for e in experts)
        degraded = healthy and any(e["state"] != "ok" for e in experts)  # serving through replicas or a restart
        body = {"status": "degraded" if degraded else "ok" if healthy else "unhealthy"}
        if request.state.authorized:
            body.update(degraded=degraded, coordinator="ok" if alive else "stopped", expert_actors=experts)
            body.update(coordinator_id=self.coordinator_id, coordinator_pid=os.getpid(), pool=await asyncio.to_thread(self._pool_info))
        return JSONResponse(status_code=200 if healthy else 503, content=body)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        dispatch = self.experts.health.snapshot() if self.experts is not None else None
        balance = await asyncio.to_thread(self._balance)
        text = self.metrics.render(self.engine.stats(), self.engine.engine.model.expert_load, dispatch, balance)
        return Response(content=text, media_type="text/plain; version=0.0.4")

    @api.get("/v1/experts")
    async def experts(self) -> dict:
        """Expert placement (which actor and node hosts each expert), tokens routed to each so far, the balance
        (rows per actor per step and imbalance per layer since the last rebalance, and that rebalance), and the
        repetition rates of consecutive tokens' routing over the last ``routing_window`` token pairs."""
        placement = await asyncio.to_thread(self.pool.placement_report) if self.pool is not None else []
        load = self.engine.engine.model.expert_load.tolist()
        balance = await asyncio.to_thread(self._balance)
        routing = self.routing.snapshot().model_dump()
        return {
            "expert_actors": len(self.pool.layout()[1]) if self.pool is not None else 0, "placement": placement, "load": load, "balance": balance,
            "routing": routing,
        }  # fmt: skip

    @api.post("/v1/experts/rebalance")
    async def rebalance(self) -> dict:
        """Rebalance the experts from the load all coordinators measured since the last rebalance, while serving
        (docs/cluster.md#rebalancing)."""
        if self.pool is None:
            raise APIError(400, "this server runs its experts in one process: there is nothing to rebalance")
        from moeshard.actors.rebalance.live import RebalanceBusy

        try:
            report = await asyncio.to_thread(self.pool.rebalance)
        except RebalanceBusy as exc:
            raise APIError(409, f"{exc}, or the pool is being scaled") from None
        except PoolManagerUnavailable as exc:
            raise APIError(503, str(exc)) from None
        return report.to_dict()

    @api.post("/v1/experts/scale")
    async def scale(self, body: ScaleRequest) -> dict:
        """Grow or shrink the expert pool to ``expert_actors`` while serving (docs/cluster.md#scaling-the-pool-while-serving)."""
        if self.pool is None:
            raise APIError(400, "this server runs its experts in one process: there is no expert pool to scale")
        from moeshard.actors.rebalance.scale import ScaleBusy, ScaleError

        try:
            return await asyncio.to_thread(self.pool.scale, body.expert_actors)
        except ScaleBusy as exc:
            raise APIError(409, str(exc)) from None
        except (ScaleError, PoolManagerUnavailable) as exc:
            raise APIError(503, str(exc)) from None

    def _balance(self) -> dict | None:
        """The pool's balance (its load window over all coordinators, and its last rebalance); None in one process,
        or while the pool's manager does not answer (the rest of /metrics still renders)."""
        if self.pool is None:
            return None
        try:
            return self.pool.balance()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            logger.warning("expert pool balance: %s", one_line(exc))
            return None

    def _pool_info(self) -> dict | None:
        """The expert pool's name and the coordinators attached to it (this one alone for a pool of its own)."""
        if self.pool is None:
            return None
        name = self.pool.name if isinstance(self.pool, SharedExpertPool) else None
        coordinators = self.pool.coordinators() if isinstance(self.pool, SharedExpertPool) else [self.coordinator_id]
        return {"name": name, "coordinators": coordinators, "expert_actors": len(self.pool.actors)}

    def check_health(self) -> None:
        """Serve's own health probe: the engine loop runs and no expert actor is down past its recovery timeout."""
        if not self.engine.is_running:
            raise RuntimeError("the engine loop has stopped")
        if self.experts is not None:
            limit = self.args.engine_config().cluster.recovery_timeout_s
            for actor, down_for in self.experts.health.snapshot().down_since.items():
                if down_for > limit:
                    raise RuntimeError(f"expert actor {actor} has been down for {down_for:.0f}s")


def build_app(args: dict) -> serve.Application:
    """The Serve application for ``args`` (see ``ServeArgs``); the replica asks Ray for a GPU when it will use one,
    and for its CPUs (``replica_cpus``)."""
    validated = ServeArgs(**args)
    config = validated.engine_config()  # a bad combination fails here, before any replica starts
    cpus = replica_cpus(config)
    resources = {"num_cpus": cpus, "num_gpus": 1} if replica_wants_gpu(validated.device) else {"num_cpus": cpus}
    return ServingCoordinator.options(
        num_replicas=validated.coordinators, max_ongoing_requests=validated.max_ongoing_requests, ray_actor_options=resources
    ).bind(validated.model_dump())


def replica_wants_gpu(device: str) -> bool:
    """``cuda``/``cuda:N``, or ``auto`` on a Ray cluster that has a GPU (Ray then gives the replica one)."""
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
