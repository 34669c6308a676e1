"""The model's generation_config.json as sampling defaults: read, applied offline, and capped by the context."""

from __future__ import annotations

import json
import logging

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.engine.generation_defaults import GenerationDefaults, read_generation_defaults
from moeshard.deploy.protocol import ChatCompletionRequest, CompletionRequest

PROMPT = [1, 5, 9, 33, 17]


def test_read_sampling_fields_and_nothing_else(tmp_path, caplog):
    assert read_generation_defaults(tmp_path) == GenerationDefaults()
    config = {"bos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 0, "max_new_tokens": 9}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    defaults = read_generation_defaults(tmp_path)
    assert defaults.sampling_fields() == {"temperature": 0.6, "top_p": 0.9, "top_k": -1}
    assert defaults.max_new_tokens == 9
    (tmp_path / "generation_config.json").write_text('{"temperature": -1}')
    with caplog.at_level(logging.WARNING):
        assert read_generation_defaults(tmp_path) == GenerationDefaults()
    assert "generation_config.json" in caplog.text


def test_offline_generate_without_params_uses_the_models_defaults(tiny_checkpoint_factory):
    model_dir = tiny_checkpoint_factory("tiny_defaults", seed=4)
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "repetition_penalty": 1.5, "max_new_tokens": 7}))
    with LLM(model_dir) as llm:
        assert llm.default_sampling_params() == SamplingParams(max_tokens=7, temperature=0.0, repetition_penalty=1.5)
        out = llm.generate([PROMPT])[0]
        explicit = llm.generate([PROMPT], SamplingParams(max_tokens=7, temperature=0, repetition_penalty=1.5))[0]
        plain = llm.generate([PROMPT], SamplingParams(max_tokens=7, temperature=0))[0]
    assert out.token_ids == explicit.token_ids
    assert len(out.token_ids) == 7 or out.finish_reason == "stop"
    assert out.token_ids != plain.token_ids or len(set(plain.token_ids)) == len(plain.token_ids)


def test_request_fields_win_and_a_default_max_tokens_fits_the_context():
    defaults = GenerationDefaults(temperature=0.3, top_k=5, max_new_tokens=1000)
    completion = CompletionRequest(model="m", prompt="x", temperature=1.2)
    params = completion.sampling_params(16, 0, defaults, room=40)
    assert (params.temperature, params.top_k, params.max_tokens) == (1.2, 5, 40)
    assert CompletionRequest(model="m", prompt="x", max_tokens=3).sampling_params(16, 0, defaults, room=40).max_tokens == 3
    assert CompletionRequest(model="m", prompt="x").sampling_params(16).max_tokens == 16
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=4)
    assert chat.sampling_params(100, 0, defaults, room=100).max_tokens == 4
