"""Logprobs, echo, the sampling controls, generation_config defaults and refused fields over HTTP, with the
official openai client (the shapes) and transformers' model on the same checkpoint (the values)."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
import torch

from moeshard.cluster import LLM, SamplingParams

MODEL = "tiny"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GENERATION_CONFIG = {"temperature": 0.0, "repetition_penalty": 1.4, "max_new_tokens": 5, "top_k": 0}


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("tiny_logprobs", seed=5, with_tokenizer=True, max_position_embeddings=512)


@pytest.fixture(scope="module")
def configured_dir(model_dir, tmp_path_factory):
    """The same checkpoint with a generation_config.json of its own."""
    out = tmp_path_factory.mktemp("configured") / "model"
    shutil.copytree(model_dir, out)
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return out


@pytest.fixture(scope="module")
def server(model_dir, configured_dir, live_server):
    apps = {
        "/": {"model_dir": str(model_dir), "model_name": MODEL, "expert_actors": 0},
        "/configured": {"model_dir": str(configured_dir), "model_name": MODEL, "expert_actors": 0},
    }
    with live_server(apps, num_cpus=4) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_dir):
    with LLM(model_dir) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager").eval()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)  # [T, V]


def test_echo_with_logprobs_scores_the_prompt_as_transformers(client, reference, hf):
    """What lm-evaluation-harness's local-completions sends to score a continuation."""
    out = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1, temperature=0)
    choice = out.choices[0]
    prompt_ids = reference.encode(PROMPT)
    ids = prompt_ids + reference.generate(PROMPT, SamplingParams(max_tokens=1, temperature=0))[0].token_ids
    expected = hf_logprobs(hf, ids)
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(float(expected[pos - 1, ids[pos]]), abs=1e-4)
        assert lp.top_logprobs[pos][lp.tokens[pos]] == pytest.approx(lp.token_logprobs[pos])
        assert max(lp.top_logprobs[pos].values()) == pytest.approx(float(expected[pos - 1].max()), abs=1e-4)
    assert "".join(lp.tokens[1:]) == choice.text  # the first token (BOS) adds no text
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_with_max_tokens_zero_scores_the_prompt_alone(client, reference, hf):
    prompt_ids = reference.encode(PROMPT)
    expected = hf_logprobs(hf, prompt_ids)
    kwargs = dict(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    out = client.completions.create(**kwargs)
    choice = out.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(prompt_ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(prompt_ids) and lp.token_logprobs[0] is None
    for pos in range(1, len(prompt_ids)):
        assert lp.token_logprobs[pos] == pytest.approx(float(expected[pos - 1, prompt_ids[pos]]), abs=1e-4)

    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == PROMPT and chunks[-1].finish_reason == "length"
    assert [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs] == lp.token_logprobs

    with pytest.raises(openai.BadRequestError, match="0 only with echo"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)


def test_sdk_streams_carry_the_logprobs(server, client):
    from moeshard.cluster.client import Client
    from moeshard.cluster.client.types import ChatLogprobs, CompletionLogprobs

    kwargs = dict(max_tokens=4, temperature=0, logprobs=2)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, **kwargs).choices[0].logprobs
    chat_kwargs = dict(max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    plain_chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, **chat_kwargs).choices[0].logprobs
    with Client(server, api_key="unused", model=MODEL) as sdk:
        events = [e for e in sdk.stream(PROMPT, **kwargs) if e.logprobs is not None]
        chat_events = [e for e in sdk.chat_stream(MESSAGES, **chat_kwargs) if e.logprobs is not None]
        assert all(e.logprobs is None for e in sdk.stream(PROMPT, max_tokens=2))
    assert all(isinstance(e.logprobs, CompletionLogprobs) for e in events)
    assert [x for e in events for x in e.logprobs.token_logprobs] == plain.token_logprobs
    assert [t for e in events for t in e.logprobs.tokens] == plain.tokens
    assert all(isinstance(e.logprobs, ChatLogprobs) for e in chat_events)
    assert [t.logprob for e in chat_events for t in e.logprobs.content] == [t.logprob for t in plain_chat.content]


def test_sdk_types_carry_the_logprobs(server, client):
    from moeshard.cluster.client import Client

    kwargs = dict(echo=True, logprobs=2, max_tokens=2, temperature=0)
    expected = client.completions.create(model=MODEL, prompt=PROMPT, **kwargs).choices[0].logprobs
    chat_kwargs = dict(max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    expected_chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, **chat_kwargs).choices[0].logprobs
    with Client(server, api_key="unused", model=MODEL) as sdk:
        got = sdk.complete(PROMPT, **kwargs).choices[0].logprobs
        got_chat = sdk.chat(MESSAGES, **chat_kwargs).choices[0].logprobs
        assert sdk.complete(PROMPT, max_tokens=1).choices[0].logprobs is None
    assert got.model_dump() == expected.model_dump()
    assert [(t.token, t.logprob, [x.logprob for x in t.top_logprobs]) for t in got_chat.content] == [
        (t.token, t.logprob, [x.logprob for x in t.top_logprobs]) for t in expected_chat.content
    ]


def test_completion_logprobs_streamed_equal_plain_and_transformers(client, reference, hf):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=11, logprobs=3)
    plain = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    streamed = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    assert streamed == plain.logprobs.token_logprobs and len(streamed) == 6
    ids = reference.encode(PROMPT)
    generated = reference.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0.8, seed=11))[0].token_ids
    expected = hf_logprobs(hf, ids + generated)
    for i, token_id in enumerate(generated):
        row = expected[len(ids) - 1 + i]
        assert plain.logprobs.token_logprobs[i] == pytest.approx(float(row[token_id]), abs=1e-4)
        top = sorted(plain.logprobs.top_logprobs[i].values(), reverse=True)[:3]
        assert top == pytest.approx(torch.topk(row, 3).values.tolist(), abs=1e-4)
    assert "".join(plain.logprobs.tokens) == plain.text


def test_chat_logprobs_streamed_equal_plain_and_transformers(client, reference, hf):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    content = plain.logprobs.content
    streamed = [x for c in chunks if c.logprobs for x in c.logprobs.content]
    assert [(x.token, x.logprob) for x in streamed] == [(x.token, x.logprob) for x in content]
    ids = reference.tokenizer.encode_chat(MESSAGES)
    generated = reference.generate([ids], SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    expected = hf_logprobs(hf, ids + generated)
    assert len(content) == len(generated)
    for i, entry in enumerate(content):
        row = expected[len(ids) - 1 + i]
        assert entry.logprob == pytest.approx(float(row[generated[i]]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(torch.topk(row, 2).values.tolist(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
    assert "".join(x.token for x in content) == plain.message.content
    no_logprobs = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
    assert no_logprobs.choices[0].logprobs is None


def test_sampling_controls_over_http_equal_offline(client, reference):
    controls = dict(frequency_penalty=1.2, presence_penalty=0.6, logit_bias={"4": 3.0}, min_p=0.02, top_k=50, top_p=0.9)
    body = {k: v for k, v in controls.items() if k not in ("min_p", "top_k")}
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.9, seed=3, **body,
        extra_body={"min_p": 0.02, "top_k": 50, "repetition_penalty": 1.2, "ignore_eos": True},
    )  # fmt: skip
    params = SamplingParams(
        max_tokens=10, temperature=0.9, seed=3, repetition_penalty=1.2, ignore_eos=True, **{**controls, "logit_bias": {4: 3.0}}
    )
    assert out.choices[0].text == reference.generate(PROMPT, params)[0].text


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(logit_bias={"40000": 1.0}), "logit_bias"),
        (dict(logit_bias={"5": 101}), "logit_bias"),
        (dict(frequency_penalty=2.5), "frequency_penalty"),
        (dict(logprobs=21), "logprobs"),
        (dict(best_of=2), "best_of"),
        (dict(suffix="tail"), "suffix"),
        (dict(extra_body={"min_p": 1.5}), "min_p"),
        (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    ],
)
def test_refused_completion_fields_are_named(client, kwargs, field):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **kwargs)
    assert info.value.status_code == 400 and info.value.body["param"] == field


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(response_format={"type": "json_object"}), "response_format"),
        (dict(top_logprobs=2), "top_logprobs"),
        (dict(logprobs=True, top_logprobs=30), "top_logprobs"),
        (dict(store=True), "store"),
        (dict(reasoning_effort="low"), "reasoning_effort"),
        (dict(modalities=["text", "audio"]), "modalities"),
    ],
)
def test_refused_chat_fields_are_named(client, kwargs, field):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **kwargs)
    assert info.value.status_code == 400 and info.value.body["param"] == field


def test_generation_config_defaults_apply_when_a_request_omits_them(server, reference):
    configured = openai.OpenAI(base_url=f"{server}/configured/v1", api_key="unused", max_retries=0, timeout=120)
    out = configured.completions.create(model=MODEL, prompt=PROMPT, extra_body={"ignore_eos": True})
    defaults = SamplingParams(max_tokens=5, temperature=0.0, repetition_penalty=1.4, ignore_eos=True)
    assert out.usage.completion_tokens == 5
    assert out.choices[0].text == reference.generate(PROMPT, defaults)[0].text
    given = dict(max_tokens=7, temperature=0.0, extra_body={"repetition_penalty": 1.0, "ignore_eos": True})
    out = configured.completions.create(model=MODEL, prompt=PROMPT, **given)
    assert out.choices[0].text == reference.generate(PROMPT, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0].text
    chat = configured.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"ignore_eos": True})
    ids = reference.tokenizer.encode_chat(MESSAGES)
    assert chat.choices[0].message.content == reference.tokenizer.decode(reference.generate([ids], defaults)[0].token_ids)
