"""Hostile requests at the edge: auth before the body, body and prompt limits, total work, fair admission, bounded fields.

Every refusal is checked for its status and OpenAI's error shape naming the field, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from urllib.parse import urlparse

import httpx2 as httpx
import openai
import pytest

from moeshard.cluster.engine.assembly import token_limit

API_KEY = "edge-key"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMITS = {"max_body_bytes": 64 * 1024, "max_prompt_chars": 2000, "max_request_tokens": 200, "max_sequences_per_client": 4}


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory, live_server):
    model_dir = str(tiny_checkpoint_factory("tiny_edge", seed=5, with_tokenizer=True, max_position_embeddings=512))
    base = {"model_dir": model_dir, "model_name": MODEL, "api_key": API_KEY, "client_header": "x-client-id", "limits": LIMITS}
    apps = {
        "/": {**base, "expert_actors": 2},
        "/open": {**base, "public_docs": True, "public_metrics": True},
    }
    with live_server(apps, num_cpus=5) as base_url:
        yield base_url


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status and error["message"]
    return error


def _raw_headers_only(url: str, request_line: str, headers: dict[str, str]) -> tuple[int, float]:
    """Send a request's headers but none of its body; the status line and how long it took to come."""
    parsed = urlparse(url)
    started = time.monotonic()
    with socket.create_connection((parsed.hostname, parsed.port), timeout=20) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": parsed.netloc, **headers}.items())
        sock.sendall(f"{request_line}\r\n{head}\r\n".encode())
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), time.monotonic() - started


@pytest.mark.parametrize("path", ["/v1/models", "/v1/experts", "/metrics", "/docs", "/redoc", "/openapi.json", "/no/such/route"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"bearer {API_KEY}"}, {"Authorization": API_KEY}])
def test_every_route_but_liveness_needs_the_key(server, path, headers):
    error = _error(httpx.get(f"{server}{path}", headers=headers, timeout=30), 401)
    assert error["type"] == "authentication_error"


def test_liveness_is_bare_without_the_key_and_routes_work_with_it(server):
    assert httpx.get(f"{server}/health", timeout=30).json() == {"status": "ok"}
    assert [a["state"] for a in httpx.get(f"{server}/health", headers=AUTH, timeout=30).json()["expert_actors"]] == ["ok", "ok"]
    assert httpx.get(f"{server}/metrics", headers=AUTH, timeout=30).status_code == 200
    assert httpx.get(f"{server}/openapi.json", headers=AUTH, timeout=30).json()["info"]["title"] == "moeshard"
    assert _error(httpx.get(f"{server}/no/such/route", headers=AUTH, timeout=30), 404)["type"] == "not_found_error"
    _error(httpx.get(f"{server}/v1/completions", headers=AUTH, timeout=30), 405)


def test_flags_open_docs_and_metrics_only(server):
    assert httpx.get(f"{server}/open/openapi.json", timeout=30).status_code == 200
    assert httpx.get(f"{server}/open/docs", timeout=30).status_code == 200
    assert b"moeshard_requests_total" in httpx.get(f"{server}/open/metrics", timeout=30).content
    _error(httpx.get(f"{server}/open/v1/models", timeout=30), 401)


def test_auth_and_body_size_are_answered_before_the_body_is_read(server):
    """A 100 MB body is declared and never sent: the answer still comes at once."""
    huge = {"Content-Type": "application/json", "Content-Length": str(100 * 2**20)}
    status, seconds = _raw_headers_only(server, "POST /v1/completions HTTP/1.1", huge)
    assert status == 401 and seconds < 10
    status, seconds = _raw_headers_only(server, "POST /v1/completions HTTP/1.1", {**huge, **AUTH})
    assert status == 413 and seconds < 10


def test_chunked_body_over_the_limit_gets_413(server):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(40):
            yield b"a" * 4096
        yield b'"}'

    with httpx.Client(timeout=60) as client:
        response = client.post(f"{server}/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert "larger than this server's limit" in _error(response, 413)["message"]


def _post(server: str, body, path: str = "/v1/completions", **headers) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server}{path}", content=content, headers={**AUTH, "Content-Type": "application/json", **headers}, timeout=60)


OK = {"model": MODEL, "prompt": "Hello there", "max_tokens": 2, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    "change, param",
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"top_k": 2**63}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"max_tokens": 2**64}, "max_tokens"),
        ({"max_tokens": 2**62}, "max_tokens"),  # within 64 bits, beyond the request's work
        ({"n": 17}, "n"),
        ({"n": 2**70}, "n"),
        ({"temperature": 1e308 * 10}, "temperature"),  # json.dumps writes Infinity
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": "x" * 300}, "stop"),
        ({"model": "m" * 300}, "model"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [32000]}, "prompt"),  # one past the tokenizer's (and the model's) vocabulary
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "word " * 500}, "prompt"),  # 2500 characters, over max_prompt_chars before any tokenizing
        ({"prompt": ["a"] * 40, "n": 2}, "n"),  # 80 sequences in one request
        ({"n": 4, "max_tokens": 60}, "max_tokens"),  # 240 output tokens over max_request_tokens
        ({"echo": [1]}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logit_bias": {"32000": 1.0}}, "logit_bias"),  # one past the vocabulary
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"repetition_penalty": 1e308 * 10}, "repetition_penalty"),
        ({"min_p": 1.01}, "min_p"),
    ],
)
def test_bad_fields_get_400_naming_the_field(server, change, param):
    error = _error(_post(server, {**OK, **change}), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].split(".")[0] == param, error


@pytest.mark.parametrize(
    "messages, param",
    [
        ([{"role": "user", "content": "hi"}] * 1025, "messages"),
        ([{"role": "user", "content": "y" * 2500}], "messages"),
        ([{"role": "tool", "content": "hi"}], "messages"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages"),
        ([], "messages"),
    ],
)
def test_bad_messages_get_400(server, messages, param):
    error = _error(_post(server, {**CHAT, "messages": messages}, "/v1/chat/completions"), 400)
    assert error["param"].split(".")[0] == param


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[]", b'"text"', b"null", b"[" * 30_000 + b"]" * 30_000, b'{"model": "tiny", "prompt": 1e999999}', b"\xff\xfe"],
)
def test_unparsable_bodies_get_400(server, body):
    _error(_post(server, body), 400)


def test_malformed_json_names_no_field_and_says_where(server):
    body = b'{"model": "tiny", "prompt": "Hello there", "max_tokens": 2,}'
    error = _error(_post(server, body), 400)
    assert error["param"] is None
    assert "not valid JSON" in error["message"] and f"at character {len(body) - 1}" in error["message"]


def test_unknown_model_is_404_and_the_server_keeps_serving(server):
    assert _error(_post(server, {**OK, "model": "other"}), 404)["param"] == "model"
    assert _post(server, OK).json()["choices"][0]["finish_reason"] == "length"


def test_one_heavy_client_cannot_starve_another(server):
    """Client A floods (n=2 each, 4 sequences allowed): some of it is refused 429 while client B is served."""

    async def run() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {**OK, "max_tokens": 40, "n": 2, "ignore_eos": True}
            heavy = [
                client.post(f"{server}/v1/completions", json=body, headers={**AUTH, "x-client-id": "A"}) for _ in range(5)
            ]
            flood = asyncio.gather(*heavy)
            await asyncio.sleep(0.5)
            light = await client.post(f"{server}/v1/completions", json=OK, headers={**AUTH, "x-client-id": "B"})
            return list(await flood), light

    heavy, light = asyncio.run(run())
    assert light.status_code == 200 and light.json()["choices"][0]["text"]
    refused = [r for r in heavy if r.status_code == 429]
    served = [r for r in heavy if r.status_code == 200]
    assert refused and served and len(refused) + len(served) == 5
    assert all(r.headers["retry-after"] == "1" and _error(r, 429)["type"] == "rate_limit_error" for r in refused)
    assert all(len(r.json()["choices"]) == 2 for r in served)
    # A's share is returned when its sequences finish.
    assert _post(server, {**OK, "n": 2}, **{"x-client-id": "A"}).status_code == 200


def test_official_client_sees_openai_errors(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"seed": 2**64})
    assert info.value.body["param"] == "seed"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0).models.list()


class _Tokenizer:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


def test_token_limit_is_the_smaller_vocabulary(tiny_mixtral_dir):
    from moeshard.cluster.model.config import ModelConfig

    config = ModelConfig.from_model_dir(tiny_mixtral_dir)  # vocabulary of 128
    assert token_limit(config, None) == 128
    assert token_limit(config, _Tokenizer(100)) == 100
    assert token_limit(config, _Tokenizer(500)) == 128
