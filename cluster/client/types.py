"""The client SDK's typed responses: completions, chat completions, stream events, models, health and experts.

They mirror the server's JSON (OpenAI's shapes, plus moeshard's ``/health`` and ``/v1/experts``) and ignore
fields they do not know, so a newer server does not break an older client.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Response):
    """A completion choice's ``logprobs`` (asked for with ``logprobs=K``; with ``echo=True`` the prompt's tokens first)."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None for the prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(_Response):
    """``POST /v1/completions``; ``text`` and ``finish_reason`` are the first choice's."""

    id: str
    model: str
    created: int
    choices: list[CompletionChoice]
    usage: Usage

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason


class ChatMessage(_Response):
    role: str
    content: str | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Response):
    """A chat choice's ``logprobs`` (asked for with ``logprobs=True``, ``top_logprobs=K``): one entry per token."""

    content: list[TokenLogprob] | None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(_Response):
    """``POST /v1/chat/completions``; ``text`` and ``finish_reason`` are the first choice's."""

    id: str
    model: str
    created: int
    choices: list[ChatChoice]
    usage: Usage

    @property
    def text(self) -> str:
        return self.choices[0].message.content or ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason


class StreamEvent(_Response):
    """One event of a streamed completion.

    Every event but the last carries a text delta of choice ``index`` (a choice's last delta also has its
    ``finish_reason``), and when logprobs were asked for, the delta's ``logprobs``: ``CompletionLogprobs``
    from the completions route, ``ChatLogprobs`` from the chat route. The last event has ``done=True``,
    empty ``text``, the request's ``usage`` and the first choice's ``finish_reason``.
    """

    text: str = ""
    index: int = 0
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | ChatLogprobs | None = None
    usage: Usage | None = None
    done: bool = False


class Model(_Response):
    id: str
    created: int | None = None
    owned_by: str | None = None


class ActorHealth(_Response):
    actor: int
    state: str  # "ok", or "unavailable: <error>"
    description: str | None = None


class Health(_Response):
    """``GET /health``: the engine loop (coordinator) and every expert actor (only ``status`` without the API key)."""

    status: str
    coordinator: str | None = None
    expert_actors: list[ActorHealth] = []

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class ExpertPlacement(_Response):
    layer: int
    expert: int
    actors: list[int]  # the expert actors hosting it (more than one when replicated)
    nodes: list[str]  # the Ray node of each of those actors


class RoutingBaseline(_Response):
    """A router choosing uniformly at random: 1/E and 1 - C(E-k, k) / C(E, k)."""

    same_top1: float
    shared_any: float


class LayerRepetition(_Response):
    layer: int
    same_top1: float | None  # consecutive tokens with the same first-choice expert (None: no pair yet)
    shared_any: float | None  # consecutive tokens whose chosen experts intersect


class LiveRouting(_Response):
    """Repetition rates of consecutive tokens' routing over the server's last ``window_tokens`` token pairs."""

    window_tokens: int
    random_baseline: RoutingBaseline
    layers: list[LayerRepetition]  # MoE layers only


class RebalanceReport(_Response):
    """``POST /v1/experts/rebalance``: what a rebalance did (docs/cluster.md, Rebalancing)."""

    version: int  # the placement version in use afterwards
    switched: bool  # False: no load measured yet, or the switch timed out
    seconds: float
    bytes_loaded: int  # expert weights read from checkpoints, all actors
    moved: int  # (layer, expert, actor) replicas that are new
    steps: int  # steps in the window the plan came from
    imbalance_before: list[float]  # [layer] max/mean of the actors' expected load, old layout
    imbalance_after: list[float]  # [layer] the same, new layout
    measured_imbalance: list[float]  # [layer] max/mean of the rows the actors were sent
    rows_per_step: list[float]  # [actor]
    weight_bytes: list[int | None]  # [actor] expert weights held afterwards (None: it did not answer)
    failed_actors: list[int]


class ScaleReport(_Response):
    """``POST /v1/experts/scale``: what a scaling of the expert pool did (docs/cluster.md, Scaling)."""

    expert_actors_before: int
    expert_actors: int  # actors serving afterwards
    version: int  # the placement version in use afterwards
    switched: bool  # every coordinator uses the new placement (False: nothing to change, or one lagged)
    seconds: float
    started: list[int]  # actors started
    stopped: list[int]  # actors drained and stopped
    moved: int  # (layer, expert, actor) replicas that are new
    bytes_loaded: int  # expert weights the actors that stayed read from checkpoints
    failed_actors: list[int]


class ExpertBalance(_Response):
    """``/v1/experts``' ``balance``: the placement version, the load window since the last rebalance, and that rebalance."""

    placement_version: int
    slots_per_actor: list[int]
    window: dict  # steps, seconds, rows_per_step [actor], imbalance [layer], expected_imbalance [layer]
    rebalances: int
    last_rebalance: RebalanceReport | None = None


class Experts(_Response):
    """``GET /v1/experts``: where each expert lives, how many tokens were routed to it so far, and recent routing."""

    expert_actors: int
    placement: list[ExpertPlacement]  # empty when the experts run inside the server
    load: list[list[int]]  # [layer][expert] tokens routed
    routing: LiveRouting | None = None  # None from a server that does not report it
    balance: ExpertBalance | None = None  # None when the experts run inside the server

    def imbalance(self) -> list[float]:
        """Per layer, the busiest expert's tokens over the mean (1.0 is perfectly balanced; 0 with no tokens yet)."""
        out = []
        for layer in self.load:
            mean = sum(layer) / len(layer) if layer else 0.0
            out.append(max(layer) / mean if mean else 0.0)
        return out
