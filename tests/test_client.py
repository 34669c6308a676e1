"""The client SDK (sync and async) against a live server, its typed errors, and its retries against a flaky stub server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from moeshard.cluster.client import (
    AsyncClient,
    BadRequest,
    Client,
    ConnectionFailed,
    NotFound,
    Overloaded,
    RequestTimeout,
    Unauthorized,
)

API_KEY = "client-key"
MODEL = "tiny"
PROMPT = "The weather today"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory, live_server):
    model_dir = tiny_checkpoint_factory("tiny_client", seed=3, with_tokenizer=True, max_position_embeddings=512)
    with live_server({"/": {"model_dir": str(model_dir), "model_name": MODEL, "api_key": API_KEY, "expert_actors": 1}}) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with Client(f"{server}/v1", API_KEY, timeout=120, max_retries=0) as c:
        yield c


def test_models_health_experts(client):
    assert [m.id for m in client.models()] == [MODEL]
    health = client.health()
    assert health.ok and health.coordinator == "ok"
    assert [a.state for a in health.expert_actors] == ["ok"]
    experts = client.experts()
    assert experts.expert_actors == 1
    assert len(experts.placement) == 2 * 8  # layers x experts, all on actor 0
    assert all(p.actors == [0] and len(p.nodes) == 1 for p in experts.placement)
    assert len(experts.load) == 2 and all(len(layer) == 8 for layer in experts.load)


def test_complete_and_stream_agree(client):
    plain = client.complete(PROMPT, max_tokens=12, temperature=0)
    events = list(client.stream(PROMPT, max_tokens=12, temperature=0))
    *deltas, last = events
    assert all(not e.done and e.text for e in deltas) and last.done and last.text == ""
    assert "".join(e.text for e in deltas) == plain.text and plain.text
    assert plain.finish_reason == last.finish_reason == "length"
    assert last.usage == plain.usage and plain.usage.completion_tokens == 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 12


def test_chat_and_chat_stream_agree_and_experts_count_load(client):
    before = sum(map(sum, client.experts().load))
    plain = client.chat(CHAT, max_tokens=10, temperature=0)
    assert plain.choices[0].message.role == "assistant"
    *deltas, last = list(client.chat_stream(CHAT, max_tokens=10, temperature=0))
    assert "".join(e.text for e in deltas) == plain.text
    assert last.done and last.usage == plain.usage and last.finish_reason == plain.finish_reason
    after = client.experts()
    # both requests ran the prompt and every generated token but the last through 2 layers, each to top-2 experts;
    # the second found the prompt's full 16-token blocks computed by the first (prefix caching) and skipped them
    fed = plain.usage.prompt_tokens + plain.usage.completion_tokens - 1
    cached = (plain.usage.prompt_tokens - 1) // 16 * 16
    assert sum(map(sum, after.load)) - before == (2 * fed - cached) * 2 * 2
    assert all(x >= 1.0 for x in after.imbalance())


def test_async_client_equals_sync(server, client):
    sync_text = client.complete(PROMPT, max_tokens=8, temperature=0).text
    sync_chat = client.chat(CHAT, max_tokens=8, temperature=0).text

    async def run():
        async with AsyncClient(server, API_KEY, timeout=120, max_retries=0) as aclient:
            models = await aclient.models()
            health = await aclient.health()
            experts = await aclient.experts()
            completion, chat = await asyncio.gather(
                aclient.complete(PROMPT, max_tokens=8, temperature=0), aclient.chat(CHAT, max_tokens=8, temperature=0)
            )
            streamed = [e async for e in aclient.stream(PROMPT, max_tokens=8, temperature=0)]
            chat_streamed = [e async for e in aclient.chat_stream(CHAT, max_tokens=8, temperature=0)]
            return models, health, experts, completion, chat, streamed, chat_streamed

    models, health, experts, completion, chat, streamed, chat_streamed = asyncio.run(run())
    assert [m.id for m in models] == [MODEL] and health.ok and experts.expert_actors == 1
    assert completion.text == sync_text == "".join(e.text for e in streamed)
    assert chat.text == sync_chat == "".join(e.text for e in chat_streamed)
    assert streamed[-1].done and streamed[-1].usage == completion.usage
    assert chat_streamed[-1].done and chat_streamed[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_errors_are_typed_with_status_and_message(server, client):
    with pytest.raises(Unauthorized) as info:
        Client(server, "wrong", max_retries=0).models()
    assert info.value.status == 401 and "API key" in info.value.message and info.value.type == "authentication_error"
    with pytest.raises(NotFound) as info:
        client.complete(PROMPT, model="no-such-model", max_tokens=2)
    assert info.value.status == 404 and "no-such-model" in info.value.message
    with pytest.raises(BadRequest) as info:
        client.complete(PROMPT, max_tokens=2, temperature=-1)
    assert info.value.status == 400 and "temperature" in info.value.message
    with pytest.raises(BadRequest) as info:
        list(client.chat_stream(CHAT, max_tokens=0))
    assert info.value.status == 400 and "max_tokens" in info.value.message

    async def async_errors():
        async with AsyncClient(server, "wrong", max_retries=0) as aclient:
            with pytest.raises(Unauthorized):
                await aclient.complete(PROMPT, model=MODEL)
        async with AsyncClient(server, API_KEY, max_retries=0) as aclient:
            with pytest.raises(BadRequest) as info:
                [e async for e in aclient.stream(PROMPT, top_p=0)]
            return info.value

    assert asyncio.run(async_errors()).status == 400
    assert client.complete(PROMPT, max_tokens=2).usage.completion_tokens == 2  # still serving


def test_unreachable_server_is_connection_failed(free_port):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        Client(url, max_retries=2, backoff=0.01).models()
    assert info.value.status is None and str(info.value) == f"cannot reach {url}: connection refused"
    assert time.monotonic() - started < 5

    async def run():
        async with AsyncClient(url, max_retries=1, backoff=0.01) as aclient:
            await aclient.health()

    with pytest.raises(ConnectionFailed, match="connection refused"):
        asyncio.run(run())


# -- retries, against a stub server that fails on purpose ---------------------------------------------------


COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": MODEL,
    "choices": [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}
STREAM = [
    {"choices": [{"index": 0, "text": "hel", "finish_reason": None}]},
    {"choices": [{"index": 0, "text": "lo", "finish_reason": "length"}]},
    {"choices": [], "usage": COMPLETION["usage"]},
]


class Stub:
    """A local HTTP server: answers the first ``failures`` requests with ``fail_status``, then ``mode``
    ("ok": a completion or a full stream, "cut": one stream chunk then a dropped connection, "slow": nothing for 2 s,
    "long": a stream of 200 chunks 10 ms apart; ``hangups`` counts the streams the client closed before their end)."""

    def __init__(self, failures: int = 0, fail_status: int = 503, mode: str = "ok"):
        self.failures, self.fail_status, self.mode, self.attempts, self.hangups = failures, fail_status, mode, 0, 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.attempts += 1
                if stub.attempts <= stub.failures:
                    message, kind = {503: ("the server is overloaded", "overloaded_error"), 400: ("bad", "invalid_request_error")}[
                        stub.fail_status
                    ]
                    error = {"error": {"message": message, "type": kind, "param": None, "code": stub.fail_status}}
                    return self._send(stub.fail_status, json.dumps(error).encode(), "application/json")
                if stub.mode == "slow":
                    time.sleep(2)
                if not body.get("stream"):
                    return self._send(200, json.dumps(COMPLETION).encode(), "application/json")
                chunks = {"cut": STREAM[:1], "long": STREAM[:1] * 200}.get(stub.mode, STREAM)
                try:
                    self._stream(chunks, done=stub.mode != "cut")
                except (BrokenPipeError, ConnectionResetError):
                    stub.hangups += 1

            def _send(self, status: int, data: bytes, kind: str):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, chunks: list[dict], done: bool):
                """Server-sent events in chunked encoding, as the real server sends them; without ``done``, hang up midway."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + (["data: [DONE]\n\n"] if done else [])
                for event in events:
                    data = event.encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    if stub.mode == "long":
                        time.sleep(0.01)
                if done:
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self) -> Stub:
        return self

    def __exit__(self, *exc_info) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_503_is_retried_with_backoff_until_it_succeeds():
    with Stub(failures=2) as stub:
        started = time.monotonic()
        result = Client(stub.url, model=MODEL, max_retries=3, backoff=0.1).complete("hi")
        assert result.text == "hello" and stub.attempts == 3
        assert time.monotonic() - started >= 0.5 * (0.1 + 0.2)  # two backoffs, jittered down to half at most


def test_503_gives_overloaded_once_retries_are_spent():
    with Stub(failures=5) as stub:
        with pytest.raises(Overloaded) as info:
            Client(stub.url, model=MODEL, max_retries=1, backoff=0.01).complete("hi")
        assert stub.attempts == 2
        assert info.value.status == 503 and info.value.message == "the server is overloaded"


def test_400_is_not_retried():
    with Stub(failures=1, fail_status=400) as stub:
        with pytest.raises(BadRequest):
            Client(stub.url, model=MODEL, max_retries=3, backoff=0.01).complete("hi")
        assert stub.attempts == 1


def test_async_503_is_retried():
    async def run(url: str):
        async with AsyncClient(url, model=MODEL, max_retries=2, backoff=0.01) as aclient:
            return await aclient.complete("hi"), [e async for e in aclient.stream("hi")]

    with Stub(failures=2) as stub:
        completion, events = asyncio.run(run(stub.url))
        assert completion.text == "hello" and stub.attempts == 4  # 2 refusals, the completion, the stream
        assert [e.text for e in events] == ["hel", "lo", ""] and events[-1].usage.total_tokens == 5


def test_stream_is_retried_before_output_but_not_after():
    with Stub(failures=1) as stub:
        events = list(Client(stub.url, model=MODEL, max_retries=2, backoff=0.01).stream("hi"))
        assert stub.attempts == 2 and "".join(e.text for e in events) == "hello" and events[-1].finish_reason == "length"
    with Stub(mode="cut") as stub:
        got = []
        with pytest.raises(ConnectionFailed, match="mid-stream"):
            for event in Client(stub.url, model=MODEL, max_retries=3, backoff=0.01).stream("hi"):
                got.append(event.text)
        assert got == ["hel"] and stub.attempts == 1

    async def cut(url: str) -> list[str]:
        got = []
        async with AsyncClient(url, model=MODEL, max_retries=3, backoff=0.01) as aclient:
            with pytest.raises(ConnectionFailed):
                async for event in aclient.stream("hi"):
                    got.append(event.text)
        return got

    with Stub(mode="cut") as stub:
        assert asyncio.run(cut(stub.url)) == ["hel"] and stub.attempts == 1


def test_leaving_a_stream_early_closes_its_connection():
    with Stub(mode="long") as stub:
        with Client(stub.url, model=MODEL) as client:
            for _event in client.stream("hi"):
                break
            time.sleep(0.5)  # the stub notices at its next write
            assert stub.hangups == 1

        async def leave_early(url: str) -> None:
            async with AsyncClient(url, model=MODEL) as aclient:
                async with contextlib.aclosing(aclient.stream("hi")) as events:
                    async for _event in events:
                        break
                await asyncio.sleep(0.5)
                assert stub.hangups == 2
                async for _event in aclient.chat_stream(CHAT):
                    break  # no aclosing: the generator is closed when it is finalised
                await asyncio.sleep(0.5)
                assert stub.hangups == 3

        asyncio.run(leave_early(stub.url))
        assert stub.attempts == 3


def test_timeout_is_not_retried():
    with Stub(mode="slow") as stub:
        with pytest.raises(RequestTimeout):
            Client(stub.url, model=MODEL, timeout=0.3, max_retries=3).complete("hi")
        assert stub.attempts == 1


def test_importing_the_client_loads_neither_torch_nor_ray(tmp_path):
    code = (
        "import sys\n"
        "import moeshard.cluster.client, moeshard.cluster.client.async_client, moeshard.cluster.loadtest.loadgen\n"
        "from moeshard.cluster.client import AsyncClient, Client\n"
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"
