"""Property-based fuzzing of the HTTP API against a live server with expert actors, while honest streams run.

Hypothesis draws requests field by field from the request schemas: every field of ``CompletionRequest`` and
``ChatCompletionRequest`` has a strategy of accepted values and one of edge and junk values. Half the bodies are
accepted values with at most one field hostile (so the accepted space, sampling included, is explored), half
are hostile throughout; plus odd paths, methods, headers and raw bodies. Each must be answered 2xx, or 4xx with an OpenAI error body: never a 5xx, an error event or a hang. Honest
greedy and seeded streams run from another client the whole time, and each must equal its fault-free text.

The CI budget is ``FUZZ_EXAMPLES`` requests (default 60); set ``MOESHARD_FUZZ_EXAMPLES`` for a larger run.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import threading
import time

import httpx2 as httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeshard.deploy.protocol import ChatCompletionRequest, CompletionRequest

API_KEY = "fuzz-key"
MODEL = "tiny"
FUZZ_EXAMPLES = int(os.environ.get("MOESHARD_FUZZ_EXAMPLES", "60"))
REQUEST_TIMEOUT_S = 60  # a request not answered by then is a hang
LIMITS = {"max_body_bytes": 256 * 1024, "max_prompt_chars": 4000, "max_request_tokens": 64, "max_sequences_per_client": 32}
HONEST = [
    ("completion", "The weather today", {"max_tokens": 24, "temperature": 0}),
    ("completion", "Paris is", {"max_tokens": 24, "temperature": 0.8, "seed": 11}),
    ("chat", "What is the capital of France?", {"max_tokens": 20, "temperature": 0}),
]

# -- strategies: one per schema field ---------------------------------------------------------------
big_ints = st.sampled_from([2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 5, -(2**63), -(2**63) - 1, 10**40])
ints = st.one_of(st.integers(-3, 40), big_ints)
edge_floats = st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e-30, 1e-8, 0.5, 1.0, 1.5, 2.0, 2.0000001, 1e308, -1e-300, -1.0])
floats = st.one_of(edge_floats, st.floats(min_value=0.0, max_value=2.0), st.floats(allow_nan=True, allow_infinity=True))
leaf = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=20))
junk = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=8)
token_ids = st.one_of(st.integers(0, 31999), st.integers(-5, 32005), big_ints)
prompts = st.one_of(
    st.text(max_size=300),
    st.lists(token_ids, max_size=24),
    st.lists(st.text(max_size=40), max_size=5),
    st.lists(st.lists(token_ids, max_size=12), max_size=4),
)
content_parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""]), "text": st.text(max_size=60)}), max_size=3
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", ""]), "content": st.one_of(st.none(), st.text(max_size=200), content_parts)}
    ),
    max_size=5,
)
FIELDS = {
    "model": st.one_of(st.just(MODEL), st.just(MODEL), st.text(max_size=300)),
    "max_tokens": st.one_of(st.integers(1, 12), ints, st.none()),
    "max_completion_tokens": st.one_of(st.integers(1, 12), ints, st.none()),
    "temperature": floats,
    "top_p": floats,
    "top_k": ints,
    "n": ints,
    "seed": st.one_of(st.none(), ints),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "stop": st.one_of(st.none(), st.text(max_size=6), st.lists(st.text(max_size=300), max_size=6)),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.one_of(floats, st.sampled_from([-2.0, -2.1, 2.5])),
    "frequency_penalty": st.one_of(floats, st.sampled_from([-2.0, -2.1, 2.5])),
    "repetition_penalty": st.one_of(floats, st.sampled_from([0.0, -1.0, 100.0, 100.5])),
    "min_p": floats,
    "logit_bias": st.one_of(
        st.none(), st.dictionaries(st.one_of(token_ids.map(str), st.text(max_size=6)), st.one_of(floats, edge_floats.map(lambda f: f * 100)), max_size=6)
    ),
    "logprobs": st.one_of(st.sampled_from([None, False, True, 0, 3, 20, 21, -1]), ints),
    "top_logprobs": st.one_of(st.none(), ints),
    "prompt": prompts,
    "echo": st.booleans(),
    "suffix": st.one_of(st.none(), st.text(max_size=5)),
    "best_of": st.sampled_from([None, 1, 2]),
    "messages": messages,
    "user": st.one_of(st.none(), st.text(max_size=300)),
    "metadata": st.one_of(st.none(), st.just({}), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)),
    "store": st.one_of(st.none(), st.booleans()),
    "service_tier": st.sampled_from([None, "auto", "default", "flex", "priority"]),
    "tools": st.one_of(st.none(), st.just([]), st.just([{"type": "function", "function": {"name": "f"}}])),
    "functions": st.one_of(st.none(), st.just([]), st.just([{"name": "f"}])),
    "tool_choice": st.sampled_from([None, "none", "auto", "required"]),
    "function_call": st.sampled_from([None, "none", "auto"]),
    "parallel_tool_calls": st.one_of(st.none(), st.booleans()),
    "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}]),
    "audio": st.sampled_from([None, {"voice": "alloy", "format": "wav"}]),
    "modalities": st.sampled_from([None, ["text"], ["text", "audio"]]),
    "prediction": st.sampled_from([None, {"type": "content", "content": "x"}]),
    "reasoning_effort": st.sampled_from([None, "low", "high"]),
    "web_search_options": st.sampled_from([None, {}]),
    "verbosity": st.sampled_from([None, "low"]),
}
NEUTRAL = {  # the unsupported OpenAI fields, at the values that ask for nothing
    "user": st.text(max_size=20),
    "metadata": st.sampled_from([None, {}]),
    "store": st.sampled_from([None, False]),
    "service_tier": st.sampled_from([None, "auto", "default"]),
    "tools": st.sampled_from([None, []]),
    "functions": st.sampled_from([None, []]),
    "tool_choice": st.sampled_from([None, "none"]),
    "function_call": st.sampled_from([None, "none"]),
    "parallel_tool_calls": st.one_of(st.none(), st.booleans()),
    "response_format": st.sampled_from([None, {"type": "text"}]),
    "modalities": st.sampled_from([None, ["text"]]),
    **{name: st.none() for name in ("audio", "prediction", "reasoning_effort", "web_search_options", "verbosity")},
}


VALID = {
    "model": st.just(MODEL),
    "max_tokens": st.integers(1, 8),
    "max_completion_tokens": st.integers(1, 8),
    "temperature": st.one_of(st.floats(0.0, 2.0), st.sampled_from([0.0, 5e-324, 1e-300, 1e-8, 2.0])),
    "top_p": st.one_of(st.floats(5e-324, 1.0), st.sampled_from([5e-324, 1e-300, 1.0])),
    "top_k": st.one_of(st.just(-1), st.integers(1, 40000), st.just(2**63 - 1)),
    "n": st.integers(1, 3),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "stop": st.one_of(st.none(), st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=20), max_size=4)),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "repetition_penalty": st.one_of(st.floats(0.01, 3.0), st.sampled_from([1e-9, 100.0])),
    "min_p": st.floats(0.0, 1.0),
    "logit_bias": st.dictionaries(st.integers(0, 31999).map(str), st.floats(-100.0, 100.0), max_size=4),
    "logprobs": st.sampled_from([None, False, True, 0, 1]),
    "top_logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "prompt": st.one_of(st.text(min_size=1, max_size=200), st.lists(st.integers(0, 31999), min_size=1, max_size=24)),
    "echo": st.booleans(),
    "suffix": st.sampled_from([None, ""]),
    "best_of": st.sampled_from([None, 1]),
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=100)}),
        min_size=1,
        max_size=3,
    ),
    **NEUTRAL,
}


def _body(fields: set[str], required: set[str]) -> st.SearchStrategy[dict]:
    """Accepted values with at most one hostile field, or hostile throughout (each field edge, junk or absent)."""
    hostile = {name: st.one_of(FIELDS[name], FIELDS[name], junk) for name in fields}
    mostly_valid = st.fixed_dictionaries(
        {name: VALID[name] for name in required}, optional={name: VALID[name] for name in fields - required}
    )
    one_bad = st.tuples(mostly_valid, st.sampled_from(sorted(fields))).flatmap(
        lambda pair: hostile[pair[1]].map(lambda value: {**pair[0], pair[1]: value})
    )
    chaos = st.fixed_dictionaries({name: hostile[name] for name in required}, optional={n: hostile[n] for n in fields - required})
    return st.one_of(mostly_valid, one_bad, chaos, st.fixed_dictionaries({}, optional=hostile))


COMPLETION_FIELDS, CHAT_FIELDS = set(CompletionRequest.model_fields), set(ChatCompletionRequest.model_fields)
fuzz_requests = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/completions"), _body(COMPLETION_FIELDS, {"model", "prompt"}).map(json.dumps)),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), _body(CHAT_FIELDS, {"model", "messages"}).map(json.dumps)),
    st.tuples(
        st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
        st.sampled_from(["/v1/models", "/v1/experts", "/health", "/metrics", "/openapi.json", "/v1/completions", "/v1/x", "/%2e%2e/"]),
        st.one_of(st.just(""), junk.map(json.dumps), st.binary(max_size=64).map(lambda b: b.decode("latin-1"))),
    ),
)
auth_headers = st.sampled_from(
    [{"Authorization": f"Bearer {API_KEY}"}] * 10 + [{}, {"Authorization": "Bearer x"}, {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": "Bearer"}]
)
content_types = st.sampled_from(["application/json", "application/json", "text/plain", "application/x-www-form-urlencoded", ""])


# -- the server and the honest streams -----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory, live_server):
    model_dir = str(tiny_checkpoint_factory("tiny_fuzz", seed=9, with_tokenizer=True, max_position_embeddings=512))
    app = {"model_dir": model_dir, "model_name": MODEL, "api_key": API_KEY, "expert_actors": 2, "client_header": "x-client-id", "limits": LIMITS}
    with live_server({"/": app}, num_cpus=5) as base_url:
        yield base_url


async def _honest_once(client: openai.AsyncOpenAI, kind: str, text: str, params: dict) -> str:
    if kind == "chat":
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], stream=True, **params)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    stream = await client.completions.create(model=MODEL, prompt=text, stream=True, **params)
    return "".join([c.choices[0].text async for c in stream])


class HonestStreams:
    """Runs the honest requests over and over on a thread of their own until stopped; records every result."""

    def __init__(self, server: str):
        self.server = server
        self.results: list[tuple[int, str | BaseException]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def _client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.server}/v1", api_key=API_KEY, max_retries=0, timeout=REQUEST_TIMEOUT_S, default_headers={"x-client-id": "honest"}
        )

    async def once(self) -> list[str]:
        async with self._client() as client:
            return list(await asyncio.gather(*(_honest_once(client, *job) for job in HONEST)))

    async def _run(self) -> None:
        async with self._client() as client:
            while not self._stop.is_set():
                outcomes = await asyncio.gather(*(_honest_once(client, *job) for job in HONEST), return_exceptions=True)
                self.results.extend(enumerate(outcomes))

    def __enter__(self) -> "HonestStreams":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT_S * 2)
        assert not self._thread.is_alive(), "an honest stream hung"


def _check_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] == response.status_code and error["message"] and error["type"]
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[-300:]
        for event in map(json.loads, events[:-1]):
            assert "error" not in event, event


def test_every_schema_field_is_fuzzed():
    assert COMPLETION_FIELDS | CHAT_FIELDS <= set(FIELDS) & set(VALID)


def test_fuzzed_requests_never_hurt_the_server_or_honest_streams(server):
    fault_free = asyncio.run(HonestStreams(server).once())
    assert all(fault_free)
    http = httpx.Client(base_url=server, timeout=REQUEST_TIMEOUT_S)
    statuses: list[int] = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False, suppress_health_check=list(HealthCheck))
    @given(request=fuzz_requests, auth=auth_headers, content_type=content_types)
    def fuzz(request, auth, content_type):
        method, path, body = request
        headers = {**auth, "x-client-id": "fuzz", **({"Content-Type": content_type} if content_type else {})}
        response = http.request(method, path, content=body.encode("utf-8", "surrogatepass"), headers=headers)
        statuses.append(response.status_code)
        _check_answer(response)

    started = time.monotonic()
    with HonestStreams(server) as honest:
        fuzz()
    http.close()
    histogram = dict(sorted(collections.Counter(statuses).items()))
    print(f"\nfuzz: {len(statuses)} requests in {time.monotonic() - started:.0f} s, statuses {histogram}; "
          f"{len(honest.results)} honest streams alongside")
    assert len(statuses) >= FUZZ_EXAMPLES and any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)
    assert honest.results, "no honest stream finished while fuzzing"
    for index, outcome in honest.results:
        assert outcome == fault_free[index], f"honest stream {index}: {outcome!r}"
