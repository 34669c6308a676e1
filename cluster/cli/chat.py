"""``moeshard chat``: an interactive, streamed chat with a running server, keeping the conversation.

Reads one message per line from stdin (a terminal or a pipe), streams each reply to stdout followed by a
newline. ``/exit`` (or ``/quit``, or end of input) ends it; ``/reset`` forgets the conversation. A reply
the server refuses (400, e.g. the conversation outgrew the context) is reported and that turn dropped.
"""

from __future__ import annotations

import argparse
import sys

from moeshard.cluster.cli.server_flags import add_server_arguments, exits_on_client_error
from moeshard.cluster.client import Client
from moeshard.cluster.client.errors import BadRequest


def add_chat_command(commands) -> None:
    chat = commands.add_parser(
        "chat",
        help="chat with a model on a running server (streamed)",
        description="Chat with a model on a running moeshard (or any OpenAI-compatible) server. Type a message per line; "
        "the reply streams back and the conversation is kept. Input may be piped. /exit or end of input ends it, "
        "/reset starts over.",
    )
    add_server_arguments(chat)
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    chat.add_argument(
        "--temperature", type=float, default=None, help="0 for greedy (default: the server's: the model's generation_config.json, else 1.0)",
    )
    chat.add_argument("--max-tokens", type=int, default=None, help="tokens per reply at most (default: the rest of the context)")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed")
    chat.set_defaults(run=run_chat)


@exits_on_client_error
def run_chat(args: argparse.Namespace) -> None:
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    interactive = sys.stdin.isatty()
    with Client(args.url, args.api_key, model=args.model, timeout=args.timeout) as client:
        model = args.model or client.models()[0].id  # fails early on a wrong URL or key
        if interactive:
            print(f"chatting with {model} at {client.settings.base_url}; /exit or Ctrl-D ends, /reset starts over", file=sys.stderr)
        start = [{"role": "system", "content": args.system}] if args.system else []
        history = list(start)
        sampling = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed}
        while (line := _read_line(interactive)) is not None:
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = list(start)
                continue
            if not text:
                continue
            history.append({"role": "user", "content": text})
            reply = _reply(client, model, history, sampling)
            if reply is None:
                history.pop()
            else:
                history.append({"role": "assistant", "content": reply})


def _read_line(interactive: bool) -> str | None:
    """The next line of input, or None at its end."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line if line else None


def _reply(client: Client, model: str, history: list[dict], sampling: dict) -> str | None:
    """Stream one reply to stdout; None if the server refused it or the user interrupted it (Ctrl-C)."""
    parts: list[str] = []
    try:
        for event in client.chat_stream(history, model=model, **sampling):
            if event.text:
                parts.append(event.text)
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except (BadRequest, KeyboardInterrupt) as exc:
        if parts:
            print(flush=True)
        print("[interrupted]" if isinstance(exc, KeyboardInterrupt) else f"moeshard: error: {exc}", file=sys.stderr, flush=True)
        return None
    print(flush=True)
    return "".join(parts)
