"""Chat formats: a conversation of role/content messages -> segments to tokenize.

The Mixtral-Instruct format (mistral-common's "v1" instruct tokenizer):

    <s>▁[INST] {system}\\n\\n{user_1} [/INST]▁{assistant_1}</s>▁[INST] {user_2} [/INST]

(▁ marks a space that comes from SentencePiece's dummy prefix, not from the text)

- every user turn is one text segment, ``"[INST] {content} [/INST]"``, encoded
  on its own, so SentencePiece's dummy prefix puts a space before ``[INST]``;
- every assistant turn is its own text segment (again with the dummy-prefix
  space) followed by EOS;
- v1 has no system role: the system messages, wherever they stand, are joined
  with a blank line and put in front of the first user message;
- the conversation ends with a user turn, so the sequence ends in ``[/INST]``,
  which is the generation prompt.

This module knows nothing about token ids: it returns ``ChatSegment``s (text to
encode, or a special token) that a tokenizer turns into ids.

``ChatTemplate`` renders a Hugging Face Jinja chat template (from
``tokenizer_config.json`` or ``chat_template.jinja``) the way ``transformers``
does: a sandboxed environment with ``trim_blocks``/``lstrip_blocks``,
``raise_exception``, ``strftime_now``, a non-escaping ``tojson``, and the
``{% generation %}`` tag accepted (rendered as its body).
"""

from __future__ import annotations

import datetime
import enum
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Joins system messages, and the text parts of one message (as mistral-common does).
_JOIN = "\n\n"


class Role(str, enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class SpecialToken(enum.Enum):
    BOS = "bos"
    EOS = "eos"


# Text to encode on its own (no BOS/EOS added), or one special token.
ChatSegment = str | SpecialToken


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


def parse_messages(messages: Sequence[Mapping]) -> list[ChatMessage]:
    """OpenAI-style message dicts -> ``ChatMessage``s (shape checks only, not order)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of role/content mappings, got {type(messages).__name__}")
    return [_parse_message(i, message) for i, message in enumerate(messages)]


def _parse_message(index: int, message: Mapping) -> ChatMessage:
    if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"Message {index} must be a mapping with 'role' and 'content', got {message!r}")
    try:
        role = Role(message["role"])
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise ValueError(
            f"Message {index} has unsupported role {message['role']!r}; expected one of {allowed}"
        ) from None
    return ChatMessage(role=role, content=_content_text(index, message.get("content")))


def _content_text(index: int, content: object) -> str:
    """A string, None (empty), or a list of OpenAI text parts joined with a blank line."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"Message {index} content parts must be {{'type': 'text', 'text': str}}, got {part!r}")
            if part["text"]:
                texts.append(part["text"])
        return _JOIN.join(texts)
    raise ValueError(f"Message {index} content must be a string or a list of text parts, got {type(content).__name__}")


def validate_conversation(messages: Sequence[ChatMessage]) -> None:
    """User and assistant turns alternate, starting and ending with a user turn.

    System messages may stand anywhere. Raises ValueError naming the first problem.
    """
    if not messages:
        raise ValueError("Conversation must have at least one message")
    turns = [(i, m) for i, m in enumerate(messages) if m.role is not Role.SYSTEM]
    if not turns:
        raise ValueError("Conversation must have at least one user message")
    previous: Role | None = None
    for i, message in turns:
        expected = Role.USER if previous in (None, Role.ASSISTANT) else Role.ASSISTANT
        if message.role is not expected:
            where = "at the start" if previous is None else f"after role '{previous.value}'"
            raise ValueError(
                f"Unexpected role '{message.role.value}' {where} (message {i}): "
                "user and assistant messages must alternate, starting with user"
            )
        if message.role is Role.ASSISTANT and not message.content:
            raise ValueError(f"Assistant message {i} must have content")
        previous = message.role
    if previous is not Role.USER:
        raise ValueError(f"Expected the last message to be from the user to generate a reply, got '{previous.value}'")


def mistral_instruct_segments(messages: Sequence[ChatMessage]) -> list[ChatSegment]:
    """The Mixtral-Instruct (v1) rendering of a validated conversation, with the generation prompt."""
    validate_conversation(messages)
    system = _JOIN.join(m.content for m in messages if m.role is Role.SYSTEM and m.content)
    segments: list[ChatSegment] = [SpecialToken.BOS]
    first_user = True
    for message in messages:
        if message.role is Role.USER:
            content = message.content
            if first_user and system:
                content = system + _JOIN + content
            first_user = False
            segments.append(f"[INST] {content} [/INST]")
        elif message.role is Role.ASSISTANT:
            segments += [message.content, SpecialToken.EOS]
    return segments


class ChatTemplate:
    """A compiled Jinja chat template."""

    def __init__(self, source: str):
        if not isinstance(source, str) or not source.strip():
            raise ValueError("A chat template must be a non-empty string")
        self.source = source
        self._template = _compile_template(source)

    def render(
        self, messages: Sequence[Mapping], special_tokens: Mapping[str, str], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as text; template errors (e.g. bad role order) become ValueError."""
        import jinja2

        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError(f"messages must be a list of role/content mappings, got {type(messages).__name__}")
        if not messages:
            raise ValueError("Conversation must have at least one message")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message:
                raise ValueError(f"Message {i} must be a mapping with 'role' and 'content', got {message!r}")
        # As transformers does: keys whose value is None are dropped (OpenAI sends content=None).
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(
                **special_tokens,
                messages=plain,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"Chat template error: {e}") from None


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"Chat template does not parse: {e.message} (line {e.lineno})") from None
