"""The OpenAI-compatible server, checked with the official openai client against a live Ray Serve app."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import openai
import pytest

from moeshard.cluster import LLM, SamplingParams

API_KEY = "test-key"
MODEL = "tiny"
PROMPTS = ["Hello, my name is", "The weather today", "One two three four five six seven", "Paris is"]


@pytest.fixture(scope="module")
def chat_model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("tiny_chat", seed=3, with_tokenizer=True, max_position_embeddings=512)


@pytest.fixture(scope="module")
def server(chat_model_dir, live_server):
    # A second app with room for one sequence and a one-request queue, to show 503 and recovery.
    tight_cache = 2 * 2 * 64 * 2 * 32 * 4  # blocks of 64 tokens: 2 layers x (K, V) x 64 x 2 heads x 32 dims x 4 bytes
    apps = {
        "/": {"model_dir": str(chat_model_dir), "model_name": MODEL, "api_key": API_KEY, "expert_actors": 2},
        "/tight": {
            "model_dir": str(chat_model_dir),
            "model_name": MODEL,
            "max_waiting": 1,
            "engine": {"kv_cache_bytes": tight_cache, "kv_block_size": 64},
        },
        # Experts in the replica on two threads: the replica asks Ray for two CPUs.
        "/threads": {"model_dir": str(chat_model_dir), "model_name": MODEL, "engine": {"expert_threads": 2}},
    }
    with live_server(apps, num_cpus=8) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(chat_model_dir):
    with LLM(chat_model_dir) as llm:
        yield llm


def _get(url: str, key: str | None = API_KEY) -> bytes:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30).read()


def _metrics(server: str) -> dict[str, float]:
    text = _get(f"{server}/metrics").decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _wait_idle(server: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(server)
        if m["moeshard_kv_cache_usage_ratio"] == 0 and m["moeshard_running_requests"] == 0:
            return m
        assert time.monotonic() < deadline, f"KV cache not freed: {m['moeshard_kv_cache_usage_ratio']}"
        time.sleep(0.2)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = json.loads(_get(f"{server}/health"))
    assert health["status"] == "ok" and health["coordinator"] == "ok"
    assert [a["state"] for a in health["expert_actors"]] == ["ok", "ok"]
    assert json.loads(_get(f"{server}/health", key=None)) == {"status": "ok"}  # liveness only, without the key


def test_completion_streamed_equals_plain_equals_offline(client, reference):
    for prompt in PROMPTS:
        plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        streamed = "".join(
            c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        )
        offline = reference.generate(prompt, SamplingParams(max_tokens=12, temperature=0))[0]
        assert plain.choices[0].text == streamed == offline.text
        assert plain.choices[0].finish_reason == offline.finish_reason
        assert plain.usage.prompt_tokens == len(offline.prompt_token_ids)
        assert plain.usage.completion_tokens == len(offline.token_ids)


def test_chat_streamed_equals_plain_equals_offline(client, reference):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    prompt_ids = reference.tokenizer.encode_chat(messages)
    offline = reference.generate([prompt_ids], SamplingParams(max_tokens=10, temperature=0))[0]
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == streamed == reference.tokenizer.decode(offline.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids) == plain.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == len(offline.token_ids)


def test_stop_seed_and_n(client, reference):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0).choices[0].text
    stop = full[5:8]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    sampled = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0.9, top_p=0.95, seed=7, n=3)
    first, again = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert len({c.text for c in first.choices}) > 1  # each choice draws its own sample
    assert 3 <= first.usage.completion_tokens <= 3 * 12


def test_a_shared_prefix_is_served_from_the_prefix_cache(server, client, reference):
    preamble = "You are a careful assistant. Answer briefly and cite nothing. " * 6
    before = _metrics(server)
    texts = []
    for question in ("Where is Paris?", "Who wrote Hamlet?"):
        out = client.completions.create(model=MODEL, prompt=preamble + question, max_tokens=8, temperature=0)
        texts.append(out.choices[0].text)
    after = _metrics(server)
    prefix_tokens = len(reference.tokenizer.encode(preamble))
    hits = after["moeshard_prefix_cache_hits_total"] - before["moeshard_prefix_cache_hits_total"]
    assert hits >= (prefix_tokens - 16) // 16 * 16 > 0
    assert after["moeshard_prefix_cache_queries_total"] > before["moeshard_prefix_cache_queries_total"] + hits
    assert 0 < after["moeshard_prefix_cache_hit_rate"] < 1
    params = SamplingParams(max_tokens=8, temperature=0)
    assert texts == [reference.generate(preamble + q, params)[0].text for q in ("Where is Paris?", "Who wrote Hamlet?")]


async def _stream_alone_and_together(server: str, jobs: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
    aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def run(prompt: str, max_tokens: int) -> str:
        stream = await aclient.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        return "".join([c.choices[0].text async for c in stream])

    alone = [await run(p, n) for p, n in jobs]
    together = await asyncio.gather(*(run(p, n) for p, n in jobs))
    await aclient.close()
    return alone, list(together)


def test_sixteen_concurrent_streams_equal_each_alone(server):
    jobs = [(PROMPTS[i % 4] + " x" * (i % 5), 4 + 3 * i) for i in range(16)]
    alone, together = asyncio.run(_stream_alone_and_together(server, jobs))
    assert together == alone
    assert all(text for text in alone)
    _wait_idle(server)


def test_a_replica_with_expert_threads_serves_what_one_thread_computes(server, reference):
    jobs = [(PROMPTS[i % 4] + " y" * (i % 3), 5 + 2 * i) for i in range(8)]
    alone, together = asyncio.run(_stream_alone_and_together(f"{server}/threads", jobs))
    offline = [reference.generate(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].text for p, n in jobs]
    assert alone == together == offline
    assert all(offline)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(temperature=-1), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_p=0), "top_p"),
        (dict(n=0), "n"),
        (dict(extra_body={"top_k": 0}), "top_k"),
        (dict(max_tokens=600), "maximum context length is 512 tokens"),
    ],
)
def test_invalid_requests_get_400_and_server_keeps_serving(client, kwargs, fragment):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], **kwargs)
    assert info.value.status_code == 400
    assert fragment in info.value.body["message"] if isinstance(info.value.body, dict) else fragment in str(info.value)
    assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2, temperature=0).choices[0].text


def test_too_long_prompt_names_both_lengths(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="word " * 600, max_tokens=4)
    message = str(info.value)
    assert "maximum context length is 512 tokens" in message and "in the prompt" in message


def test_auth_and_unknown_model(server, client):
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad_key.models.list()
    assert info.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert info.value.status_code == 404 and "no-such-model" in str(info.value)
    assert client.models.list().data


def test_overload_gets_503_then_recovers(server):
    tight = openai.OpenAI(base_url=f"{server}/tight/v1", api_key="unused", max_retries=0, timeout=120)

    async def flood() -> list:
        aclient = openai.AsyncOpenAI(base_url=f"{server}/tight/v1", api_key="unused", max_retries=0, timeout=120)
        calls = [
            aclient.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
            for _ in range(8)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await aclient.close()
        return results

    results = asyncio.run(flood())
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert refused and all(r.status_code == 503 and r.response.headers["retry-after"] == "1" for r in refused)
    assert served and all(len(r.choices[0].text) > 0 for r in served)
    assert "overloaded" in str(refused[0])
    assert tight.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=0).choices[0].text
    _wait_idle(f"{server}/tight")


def test_client_disconnect_cancels_and_frees_cache(server, client):
    before = _metrics(server)
    body = json.dumps(
        {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    ).encode()
    request = urllib.request.Request(
        f"{server}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    response = urllib.request.urlopen(request, timeout=60)
    first = response.readline()
    assert first.startswith(b"data: ")
    response.close()  # the client goes away mid-stream
    after = _wait_idle(server)
    generated = after["moeshard_generation_tokens_total"] - before["moeshard_generation_tokens_total"]
    assert generated < 400  # generation stopped early
    assert after.get('moeshard_requests_total{status="cancelled"}', 0) >= 1


def test_a_client_gone_before_the_response_starts_frees_its_requests(server):
    """The socket closes once the engine has the request, and nothing of the answer is ever read."""
    import socket
    from urllib.parse import urlsplit

    before = _metrics(server)
    body = json.dumps(
        {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True, "n": 2}
    ).encode()
    url = urlsplit(server)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 30
        while _metrics(server)["moeshard_prompt_tokens_total"] == before["moeshard_prompt_tokens_total"]:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.02)
    after = _wait_idle(server, timeout=60)
    generated = after["moeshard_generation_tokens_total"] - before["moeshard_generation_tokens_total"]
    assert generated < 2 * 400  # both choices stopped early

