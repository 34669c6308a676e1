"""Soak test: many clients for many minutes with random disconnects; nothing lost, nothing leaked.

    python -m moeshard.cluster.loadtest.soak [--clients 32] [--minutes 10] [--disconnect 0.25] [--model-dir DIR]
        [--quantization experts_int8] [--batch-invariant]

1. Start Ray and Serve with ``build_app`` (a small synthetic Mixtral unless ``--model-dir``, experts on
   ``--expert-actors`` actors, an API key).
2. ``--clients`` clients loop until the time is up, each sending one request at a time: completions or chat,
   streamed or not, greedy, 4 to ``--max-tokens`` tokens. With probability ``--disconnect`` a client goes away
   mid-request (after a few stream events, or a random delay) by closing its connection.
3. Every other request must be answered with its whole text: a finish reason (and ``[DONE]`` when streamed),
   and the same text as the first answer to the same prompt (greedy). Anything else is lost.
4. Every ``--sample-s`` seconds the coordinator's ``/metrics`` give its resident memory, KV cache usage and
   running sequences; after the load, KV usage and the running count must return to 0.

Prints the figures (requests by outcome, memory at start, peak and end) as one table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
from pydantic import BaseModel

from moeshard.cluster.choices import BATCH_INVARIANT_HELP, QUANTIZATION_HELP, QUANTIZATIONS
from moeshard.cluster.loadtest.loadgen import synthetic_prompt
from moeshard.cluster.loadtest.serving_bench import free_port, write_synthetic_mixtral

logger = logging.getLogger(__name__)

MODEL_NAME = "soak"
API_KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Sample(BaseModel):
    at_s: float
    rss_bytes: float
    kv_usage: float
    running: float


class SoakResult(BaseModel):
    clients: int
    duration_s: float
    completed: int = 0
    disconnected: int = 0
    refused: int = 0  # 429 or 503: answered, not served
    lost: int = 0  # errors, truncated answers, wrong text, hangs
    lost_examples: list[str] = []
    output_tokens: int = 0
    samples: list[Sample] = []
    idle_after_s: float | None = None  # how long KV usage and running took to reach 0 after the load; None: never

    def record_lost(self, what: str) -> None:
        self.lost += 1
        if len(self.lost_examples) < 10:
            self.lost_examples.append(what[:300])


# Run by runpy beside another __main__ (python -m cProfile -m ...), pydantic would look up the postponed
# annotations there: resolve them here, in this module's namespace.
SoakResult.model_rebuild()


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics", headers=AUTH)).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def sampler(client: httpx.AsyncClient, result: SoakResult, started: float, every_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        m = await metrics(client)
        result.samples.append(
            Sample(
                at_s=time.monotonic() - started,
                rss_bytes=m["process_resident_memory_bytes"],
                kv_usage=m["moeshard_kv_cache_usage_ratio"],
                running=m["moeshard_running_requests"],
            )
        )
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


def request_body(rng: random.Random, prompts: list[str], max_tokens: int) -> tuple[str, dict, str]:
    """(path, body, key): the key names the request, so greedy answers to the same one must be equal."""
    prompt, tokens, stream = rng.choice(prompts), rng.randint(4, max_tokens), rng.random() < 0.5
    common = {"model": MODEL_NAME, "max_tokens": tokens, "temperature": 0, "stream": stream}
    if rng.random() < 0.5:
        return "/v1/completions", {**common, "prompt": prompt}, f"c|{prompt}|{tokens}"
    return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}, f"m|{prompt}|{tokens}"


def answer_text(path: str, body: dict, response: httpx.Response, events: list[str]) -> tuple[str, str | None]:
    """The text and finish reason of a whole answer (stream events or one JSON body)."""
    chat = path.endswith("chat/completions")
    if not body["stream"]:
        choice = response.json()["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]), choice["finish_reason"]
    text, finish = [], None
    for event in events[:-1]:
        chunk = json.loads(event)
        if "error" in chunk:
            raise ValueError(f"error event: {chunk['error']}")
        for choice in chunk["choices"]:
            text.append((choice["delta"].get("content") or "") if chat else choice["text"])
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


async def exchange(client: httpx.AsyncClient, path: str, body: dict, cut_after: int | None) -> tuple[httpx.Response, list[str]]:
    """Send one request and read its answer; with ``cut_after``, leave after that many stream events."""
    events: list[str] = []
    async with client.stream("POST", path, json=body, headers=AUTH) as response:
        if response.status_code != 200 or not body["stream"]:
            await response.aread()
            return response, events
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
                if cut_after is not None and len(events) >= cut_after:
                    break  # leaving the block closes the connection mid-stream
    return response, events


async def one_request(client: httpx.AsyncClient, rng: random.Random, args, prompts, texts: dict, result: SoakResult) -> None:
    path, body, key = request_body(rng, prompts, args.max_tokens)
    disconnect = rng.random() < args.disconnect
    cut_after = rng.randint(1, 6) if disconnect and body["stream"] else None
    # A client that does not stream goes away after a random delay (if its answer has not come by then).
    timeout = rng.uniform(0.05, 1.0) if disconnect and not body["stream"] else args.request_timeout_s
    try:
        response, events = await asyncio.wait_for(exchange(client, path, body, cut_after), timeout)
    except asyncio.TimeoutError:
        if disconnect:
            result.disconnected += 1
        else:
            result.record_lost(f"{key}: no answer within {args.request_timeout_s} s")
        return
    except httpx.HTTPError as exc:
        result.record_lost(f"{key}: {type(exc).__name__}: {exc}")
        return
    if response.status_code in (429, 503):
        result.refused += 1
        return
    if response.status_code != 200:
        result.record_lost(f"{key}: {response.status_code}: {response.text[:200]}")
        return
    if cut_after is not None and len(events) >= cut_after and events[-1] != "[DONE]":
        result.disconnected += 1
        return
    if body["stream"] and (not events or events[-1] != "[DONE]"):
        result.record_lost(f"{key}: stream ended without [DONE]")
        return
    try:
        text, finish = answer_text(path, body, response, events)
    except (ValueError, KeyError) as exc:
        result.record_lost(f"{key}: {exc}")
        return
    expected = texts.setdefault(key, text)
    if finish is None or text != expected:
        result.record_lost(f"{key}: finish {finish!r}, text {text!r} vs first {expected!r}")
        return
    result.completed += 1


async def soak(url: str, args: argparse.Namespace) -> SoakResult:
    rng = random.Random(args.seed)
    prompts = [synthetic_prompt(rng, rng.randint(8, 48)) for _ in range(24)]
    texts: dict[str, str] = {}
    result = SoakResult(clients=args.clients, duration_s=args.minutes * 60)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout_s, limits=limits) as client:
        await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "warm up", "max_tokens": 4}, headers=AUTH)
        started, stop = time.monotonic(), asyncio.Event()
        deadline = started + args.minutes * 60
        watch = asyncio.create_task(sampler(client, result, started, args.sample_s, stop))

        async def run_client(i: int) -> None:
            client_rng = random.Random(args.seed * 1000 + i)
            while time.monotonic() < deadline:
                await one_request(client, client_rng, args, prompts, texts, result)

        await asyncio.gather(*(run_client(i) for i in range(args.clients)))
        load_ended = time.monotonic()
        while time.monotonic() - load_ended < 60:
            m = await metrics(client)
            if m["moeshard_kv_cache_usage_ratio"] == 0 and m["moeshard_running_requests"] == 0 and m["moeshard_queue_depth"] == 0:
                result.idle_after_s = time.monotonic() - load_ended
                break
            await asyncio.sleep(0.2)
        stop.set()
        await watch
        result.samples.append(Sample(at_s=time.monotonic() - started, rss_bytes=(await metrics(client))["process_resident_memory_bytes"], kv_usage=0, running=0))
        result.output_tokens = int((await metrics(client))["moeshard_generation_tokens_total"])
    return result


def run_server(model_dir: Path, args: argparse.Namespace) -> SoakResult:
    import ray
    from ray import serve

    from moeshard.actors.ray_init import init_ray
    from moeshard.deploy.app import build_app

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray"))
    port = free_port()
    init_ray(num_cpus=args.expert_actors + 2, include_dashboard=False, logging_level="WARNING")
    try:
        quiet = {"log_level": "WARNING", "enable_access_log": False}
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
        app = {"model_dir": str(model_dir), "model_name": MODEL_NAME, "api_key": API_KEY, "expert_actors": args.expert_actors,
               "engine": {"quantization": args.quantization, "batch_invariant": args.batch_invariant}}  # fmt: skip
        serve.run(build_app(app), name="soak", route_prefix="/", logging_config=quiet)
        return asyncio.run(soak(f"http://127.0.0.1:{port}", args))
    finally:
        serve.shutdown()
        ray.shutdown()


def format_result(r: SoakResult) -> str:
    mib = 2**20
    first, last = r.samples[0], r.samples[-1]
    peak = max(s.rss_bytes for s in r.samples)
    minute_marks = [s for s in r.samples if s.at_s >= 60]
    after_1min = minute_marks[0].rss_bytes if minute_marks else first.rss_bytes
    lines = [
        "| clients | minutes | completed | disconnected | refused | lost | output tokens | idle after (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        (
            f"| {r.clients} | {r.duration_s / 60:g} | {r.completed} | {r.disconnected} | {r.refused} | {r.lost} | "
            f"{r.output_tokens} | {'never' if r.idle_after_s is None else f'{r.idle_after_s:.1f}'} |"
        ),
        "",
        "| coordinator RSS (MiB) | at start | after 1 min | peak | at end | growth start->end | growth 1 min->end |",
        "|---|---:|---:|---:|---:|---:|---:|",
        (
            f"| | {first.rss_bytes / mib:.0f} | {after_1min / mib:.0f} | {peak / mib:.0f} | {last.rss_bytes / mib:.0f} | "
            f"{(last.rss_bytes - first.rss_bytes) / mib:+.1f} | {(last.rss_bytes - after_1min) / mib:+.1f} |"
        ),
    ]
    if r.lost_examples:
        lines += ["", "lost:"] + [f"  {e}" for e in r.lost_examples]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moeshard.cluster.loadtest.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="a Mixtral checkpoint with a tokenizer (default: a small synthetic one)")
    parser.add_argument("--expert-actors", type=int, default=2)
    parser.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help=QUANTIZATION_HELP)
    parser.add_argument("--batch-invariant", action="store_true", help=BATCH_INVARIANT_HELP)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--disconnect", type=float, default=0.25, help="probability a client goes away mid-request")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--request-timeout-s", type=float, default=300.0, help="a request unanswered this long is lost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results (with every sample) to FILE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="moeshard-soak") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else write_synthetic_mixtral(Path(tmp) / "synthetic-mixtral")
        result = run_server(model_dir, args)
    print(format_result(result))
    if args.json is not None:
        Path(args.json).write_text(result.model_dump_json(indent=2) + "\n")
    return 0 if result.lost == 0 and result.idle_after_s is not None else 1


if __name__ == "__main__":
    sys.exit(main())
