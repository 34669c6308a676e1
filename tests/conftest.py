"""Shared fixtures: tiny checkpoints of every family written by transformers' own save_pretrained."""

from __future__ import annotations

import os

# Triton kernels run on CPU only through the interpreter; set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import asyncio  # noqa: E402
import importlib.resources  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=50,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
)


def mistral_tokenizer_path() -> Path:
    """The real Mixtral SentencePiece model (32000 tokens) shipped in mistral-common's wheel."""
    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


# The fine-grained families: sizes in their own config names (moe_intermediate_size, num_experts, ...).
FAMILY_BASE = {
    "Qwen2MoeForCausalLM": dict(
        vocab_size=128, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, shared_expert_intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
        max_position_embeddings=256, eos_token_id=2,
    ),
    "Qwen3MoeForCausalLM": dict(
        vocab_size=128, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, head_dim=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
        max_position_embeddings=256, eos_token_id=2,
    ),
    "OlmoeForCausalLM": dict(
        vocab_size=128, hidden_size=64, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, max_position_embeddings=256,
        eos_token_id=2, pad_token_id=1,
    ),
}


def _hf_classes(architecture: str):
    import transformers

    model_cls = getattr(transformers, architecture)
    return model_cls.config_class, model_cls


def _randomise(model) -> None:
    """Weights large enough that greedy choices are clear-cut; norms around 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))


def write_tiny_family(out_dir: Path, architecture: str, seed: int = 0, **overrides) -> Path:
    """Save a random model of ``architecture`` (a transformers class name) with transformers' own save_pretrained."""
    config_cls, model_cls = _hf_classes(architecture)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**FAMILY_BASE[architecture], **overrides})).eval()
    _randomise(model)
    model.save_pretrained(out_dir)
    return out_dir


def write_tiny_mixtral(out_dir: Path, seed: int = 0, with_tokenizer: bool = False, **overrides) -> Path:
    """Save a random MixtralForCausalLM with weights large enough that greedy choices are clear-cut."""
    from transformers import MixtralConfig, MixtralForCausalLM

    params = {**TINY_BASE, **overrides}
    if with_tokenizer:
        params["vocab_size"] = 32000
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**params)).eval()
    _randomise(model)
    model.save_pretrained(out_dir)
    if with_tokenizer:
        shutil.copy(mistral_tokenizer_path(), out_dir / "tokenizer.model")
    return out_dir


def skew_router(model, hot: dict[int, float], offset: float = 1.0) -> None:
    """Send most tokens to the ``hot`` experts in every layer: every embedding gets ``offset`` in hidden dimension 0,
    and each hot expert's router row weight ``hot[e]`` on it (the residual stream keeps the offset's sign)."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = offset
        for layer in model.model.layers:
            for expert, weight in hot.items():
                layer.mlp.gate.weight[expert, 0] = weight


def write_skewed_mixtral(out_dir: Path, with_tokenizer: bool = False) -> Path:
    """The tiny Mixtral with a skewed router: experts 5 and 6 take most choices (the spare slots start with 0-3)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    params = dict(TINY_BASE, vocab_size=32000) if with_tokenizer else TINY_BASE
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**params)).eval()
    _randomise(model)
    skew_router(model, {5: 3.0, 6: 1.5})
    model.save_pretrained(out_dir)
    if with_tokenizer:
        shutil.copy(mistral_tokenizer_path(), out_dir / "tokenizer.model")
    return out_dir


@pytest.fixture(scope="session")
def skewed_mixtral_dir(tmp_path_factory) -> Path:
    return write_skewed_mixtral(tmp_path_factory.mktemp("skewed_mixtral"))


@pytest.fixture(scope="session")
def skewed_chat_mixtral_dir(tmp_path_factory) -> Path:
    """The skewed tiny Mixtral with Mixtral's tokenizer, for the server."""
    return write_skewed_mixtral(tmp_path_factory.mktemp("skewed_chat_mixtral"), with_tokenizer=True)


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory) -> Path:
    """The default tiny checkpoint: 8 experts, top-2, GQA 2."""
    return write_tiny_mixtral(tmp_path_factory.mktemp("tiny_mixtral"))


@pytest.fixture(scope="session")
def tiny_family_factory(tmp_path_factory):
    """make(name, architecture, seed=0, **config overrides) -> a checkpoint directory."""

    def make(name: str, architecture: str, **overrides) -> Path:
        return write_tiny_family(tmp_path_factory.mktemp(name), architecture, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory):
    def make(name: str, **overrides) -> Path:
        return write_tiny_mixtral(tmp_path_factory.mktemp(name), **overrides)

    return make


@pytest.fixture(scope="session")
def pids_mentioning():
    """pids_mentioning(text): ids of the processes whose command line contains ``text`` (e.g. a Ray temp dir)."""

    def pids(text: str) -> list[int]:
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    return pids


@pytest.fixture(scope="session")
def expert_actor_pid():
    """pid(llm, actor, timeout_s=120): an offline cluster's expert actor's process id, once it answers
    (a restarting actor refuses calls until it is back)."""
    import time

    import ray

    def pid(llm, actor: int, timeout_s: float = 120) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(llm._cluster.expert_actors[actor].info.remote(), timeout=timeout_s)["pid"]
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    return pid


RAY_WORKER_NODES = ("node_a", "node_b")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, monkeypatch_module):
    """A multi-node Ray cluster on this machine (ray.cluster_utils): a head with resource "head" and two
    worker nodes with resources "node_a" and "node_b" to pin actors to; yields {node name: node id}."""
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch_module.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 1}})
    nodes = {name: cluster.add_node(num_cpus=4, resources={name: 100}) for name in RAY_WORKER_NODES}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield {name: node.node_id for name, node in nodes.items()}
    ray.shutdown()
    cluster.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function returning a port on 127.0.0.1 that nothing listens on right now."""
    return _free_port


def _start_serve(serve, attempts: int = 3) -> int:
    """Start Serve's proxy on a free port, after Ray's own ports are taken; another free port if it was taken
    between choosing and binding (Ray's workers take ephemeral ports too)."""
    for attempt in range(attempts):
        port = _free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return port
        except Exception as exc:  # noqa: BLE001 - only a lost port race is retried
            if "Failed to bind" not in str(exc) or attempt == attempts - 1:
                raise
            serve.shutdown()
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """Start Ray, Ray Serve on a free 127.0.0.1 port and the given apps ({route_prefix: build_app args}).

    Use as ``with live_server({"/": {...}}) as base_url: ...``; everything is shut down on exit.
    """
    import contextlib

    @contextlib.contextmanager
    def start(apps: dict[str, dict], num_cpus: int = 4):
        import ray
        from ray import serve

        from moeshard.deploy.app import build_app

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
            try:
                port = _start_serve(serve)
                for prefix, args in apps.items():
                    serve.run(build_app(args), name=prefix.strip("/") or "main", route_prefix=prefix)
                yield f"http://127.0.0.1:{port}"
            finally:
                serve.shutdown()
                ray.shutdown()

    return start


class BackgroundRounds:
    """Load that runs while a test acts on the cluster: ``run_round`` again and again on a thread until ``stop``;
    every round's result is kept, and the first error ends the rounds (``stop`` asserts there was none)."""

    def __init__(self, run_round: Callable[[], object]):
        self.run_round, self.results, self.errors = run_round, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(self.run_round())
            except Exception as exc:  # noqa: BLE001 - asserted on in stop
                self.errors.append(exc)
                return

    def wait_for(self, count: int, timeout_s: float = 120) -> None:
        """Until ``count`` rounds have finished (or a round failed, or ``timeout_s`` passed)."""
        deadline = time.monotonic() + timeout_s
        while len(self.results) < count and not self.errors and time.monotonic() < deadline:
            time.sleep(0.05)

    def wait_for_next(self, timeout_s: float = 120) -> None:
        """Until one more round has finished."""
        self.wait_for(len(self.results) + 1, timeout_s)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(timeout=300)
        assert not self.errors, self.errors
        return self.results


@pytest.fixture
def background_rounds():
    """background_rounds(run_round) -> BackgroundRounds: a round of requests repeated on a thread while the test acts."""
    return BackgroundRounds


class StreamsAndAction(NamedTuple):
    texts: list[str]  # one per prompt, in order
    acted: object  # what the action returned


async def streams_while_acting(
    client, model: str, prompts: list[str], max_tokens: int, after_chunks: int, action
) -> StreamsAndAction:
    """Stream a greedy completion of every prompt through ``client`` (an ``openai.AsyncOpenAI``); once one of
    them has ``after_chunks`` chunks, ``await action()`` while they go on. The action lands in the middle of
    the work on a fast machine as on a slow one."""
    started = asyncio.Event()

    async def run(prompt: str) -> str:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        parts = []
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            if len(parts) == after_chunks:
                started.set()
        return "".join(parts)

    async def act():
        await started.wait()
        return await action()

    *texts, acted = await asyncio.gather(*(run(p) for p in prompts), act())
    return StreamsAndAction(list(texts), acted)


@pytest.fixture
def stream_while():
    """await stream_while(client, model, prompts, max_tokens, after_chunks, action) -> StreamsAndAction."""
    return streams_while_acting


class MidGeneration:
    """Faults in the middle of an offline cluster's generation: the SIGKILL and stuck-actor tests."""

    @staticmethod
    def steps(llm) -> int:
        return llm.expert_balance()["window"]["steps"]  # steps counted since the last rebalance

    @staticmethod
    def once_decoding(llm, action: Callable[[], object], steps: int = 8, timeout_s: float = 120) -> None:
        """Run ``action`` once the coordinator has dispatched ``steps`` more steps than when this was called: the
        fault lands in the middle of the generation however fast the machine is (not after it, nor in the warm-up)."""
        start = MidGeneration.steps(llm)
        deadline = time.monotonic() + timeout_s
        while MidGeneration.steps(llm) < start + steps:
            assert time.monotonic() < deadline, "the generation did not get going"
            time.sleep(0.01)
        action()

    @staticmethod
    def generate_while(llm, prompts: list[list[int]], params, faults: Callable[[], object]) -> list[list[int]]:
        """Generate ``prompts`` on a thread while ``faults()`` runs here; the outputs' token ids. Fails on a hang or
        an error."""
        from moeshard.cluster import SamplingParams

        outcome: dict = {}
        # Bring the transport up first (a compiled graph compiles on first use), so that the faults land while
        # layers are dispatched: a kill during Ray's graph compile can crash the coordinator's own Ray worker.
        llm.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0))

        def run():
            try:
                outcome["tokens"] = [o.token_ids for o in llm.generate(prompts, params)]
            except Exception as exc:  # noqa: BLE001 - reported below
                outcome["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        faults()
        worker.join(timeout=240)
        assert not worker.is_alive(), "generation hung"
        assert "error" not in outcome, outcome.get("error")
        return outcome["tokens"]


@pytest.fixture(scope="session")
def mid_generation() -> type[MidGeneration]:
    return MidGeneration


class TransformersOracle:
    """Our single process against a transformers model on the same checkpoint: the parity tests' two checks."""

    @staticmethod
    def assert_prefill_logits(llm, reference, prompts: list[list[int]], tolerance: float = 1e-4) -> None:
        """Every prompt's logits at every position within ``tolerance`` of the reference's forward."""
        import torch

        for prompt in prompts:
            ours = llm.logits(prompt)
            with torch.no_grad():
                theirs = reference(torch.tensor([prompt])).logits[0].float()
            assert ours.shape == theirs.shape == (len(prompt), reference.config.vocab_size)
            assert (ours - theirs).abs().max().item() < tolerance

    @staticmethod
    def assert_greedy_tokens(llm, reference, prompts: list[list[int]], max_tokens: int) -> None:
        """Greedy tokens (batched here) equal the reference's ``generate`` of each prompt alone, up to and
        including its EOS, with the finish reason that follows."""
        import torch

        from moeshard.cluster import SamplingParams

        eos = reference.config.eos_token_id
        outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
        for prompt, out in zip(prompts, outputs):
            with torch.no_grad():
                generated = reference.generate(
                    torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
                )[0, len(prompt) :].tolist()
            if eos in generated:
                generated = generated[: generated.index(eos) + 1]
            assert out.token_ids == generated
            assert out.finish_reason == ("stop" if generated[-1] == eos else "length")


@pytest.fixture(scope="session")
def transformers_oracle() -> type[TransformersOracle]:
    return TransformersOracle
