"""The Mixtral-Instruct chat format against mistral-common's v1 tokenizer, token for token."""

import importlib.resources
import shutil

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, TextChunk, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from moeshard.cluster.text.chat_format import (
    ChatMessage,
    Role,
    SpecialToken,
    mistral_instruct_segments,
    parse_messages,
)
from moeshard.cluster.text.tokenizer import load_tokenizer

MISTRAL_CLASSES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

CONVERSATIONS = {
    "single user turn": [{"role": "user", "content": "What is the capital of France?"}],
    "multi turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the expert cross the router? To get to the other top-k."},
        {"role": "user", "content": "Another one, please."},
    ],
    "system message": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Explain MoE."},
    ],
    "system message, multi turn": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Good night"},
    ],
    "two system messages": [
        {"role": "system", "content": "Be kind."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ],
    "empty system message": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Hello"},
    ],
    "unicode": [
        {"role": "system", "content": "用中文回答。😀"},
        {"role": "user", "content": "Qu'est-ce qu'un « expert » ? Ελληνικά, 日本語"},
        {"role": "assistant", "content": "专家是一个前馈网络 🧠 — naïve café"},
        {"role": "user", "content": "한국어로도 설명해 주세요 🇰🇷"},
    ],
    "whitespace and newlines": [
        {"role": "user", "content": "  leading\n\nand trailing  "},
        {"role": "assistant", "content": "\nreply with newline\n"},
        {"role": "user", "content": "multiple   spaces\ttab"},
    ],
    "empty user message": [{"role": "user", "content": ""}],
    "literal markers in text": [{"role": "user", "content": "What does [INST] mean? </s> <s>"}],
    "text parts": [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}],
}


def mistral_common_tokens(messages):
    converted = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [TextChunk(text=part["text"]) for part in content]
        converted.append(MISTRAL_CLASSES[m["role"]](content=content))
    request = ChatCompletionRequest(messages=converted)
    return MistralTokenizer.v1().encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    shutil.copy(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1", path / "tokenizer.model")
    return load_tokenizer(path)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_tokens_equal_mistral_common_v1(tok, name):
    messages = CONVERSATIONS[name]
    assert tok.encode_chat(messages) == mistral_common_tokens(messages)


def test_rendered_text(tok):
    messages = CONVERSATIONS["system message, multi turn"]
    assert tok.decode(tok.encode_chat(messages), skip_special_tokens=False) == (
        "<s>[INST] Answer in French.\n\nGood morning [/INST] Bonjour</s>[INST] Good night [/INST]"
    )


def test_segments():
    messages = parse_messages(CONVERSATIONS["system message, multi turn"])
    assert messages[0] == ChatMessage(Role.SYSTEM, "Answer in French.")
    assert mistral_instruct_segments(messages) == [
        SpecialToken.BOS,
        "[INST] Answer in French.\n\nGood morning [/INST]",
        "Bonjour",
        SpecialToken.EOS,
        "[INST] Good night [/INST]",
    ]


def test_system_message_after_first_turn_goes_to_first_user_message():
    messages = parse_messages([
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "system", "content": "s"},
        {"role": "user", "content": "c"},
    ])
    assert mistral_instruct_segments(messages)[1] == "[INST] s\n\na [/INST]"


U, A, S = ({"role": r, "content": "x"} for r in ("user", "assistant", "system"))

BAD_CONVERSATIONS = [
    ([], "at least one message"),
    ([S], "at least one user message"),
    ([A, U], "Unexpected role 'assistant' at the start"),
    ([S, A, U], "Unexpected role 'assistant' at the start"),
    ([U, U], "Unexpected role 'user' after role 'user'"),
    ([U, A, A, U], "Unexpected role 'assistant' after role 'assistant'"),
    ([U, A], "last message to be from the user"),
    ([U, {"role": "assistant", "content": ""}, U], "Assistant message 1 must have content"),
    ([{"role": "tool", "content": "x"}], "Message 0 has unsupported role 'tool'"),
    ([{"content": "x"}], "Message 0 must be a mapping with 'role' and 'content'"),
    (["user: hi"], "Message 0 must be a mapping"),
    ([{"role": "user", "content": 3}], "Message 0 content must be a string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "Message 0 content parts must be"),
    ("hello", "messages must be a list"),
]


@pytest.mark.parametrize("messages, error", BAD_CONVERSATIONS)
def test_bad_conversations_are_clear_errors(tok, messages, error):
    with pytest.raises(ValueError, match=error) as info:
        tok.encode_chat(messages)
    assert "\n" not in str(info.value)
