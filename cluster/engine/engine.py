"""The engine: sequences of token ids in, one sampled token per sequence per step out.

It knows nothing about text. Each ``step`` builds one batch under a token
budget (every running decode gets its token, then prefill chunks fill the
rest), runs the model once, samples, and reports token events.

KV blocks are taken as sequences grow; with prefix caching a sequence shares
the computed full blocks its tokens start with (``kv_cache``) and its prefill
starts after them. A request that asks for prompt logprobs computes its whole
prompt (every row's logits are needed). A waiting request is admitted when its
prompt fits with a block of headroom per running sequence; when a running
sequence cannot grow, the most recently admitted other sequence is preempted:
its blocks are freed and it goes back to the head of the queue, to be
recomputed (prompt + tokens so far) when room returns. At most ``max_running``
sequences run at once.

A request that asks for logprobs gets, on each token event, the log-softmax of
the raw logits at that token (and its top alternatives); one that asks for prompt
logprobs gets them on its first event, from the logits of every row of its own
prefill chunks (other chunks give only their last row).

The model runs on its device (``model/device.py``); the step's logits come back to the host in one copy
and sampling runs there, in float64 with a CPU generator per request, so a seeded request samples the
same tokens on every device and in every batch. Greedy sequences without bias or penalties (what most load is)
take their tokens in one argmax over their rows together; the others sample one by one. On a GPU a step whose
sequences read nothing of their logits but that argmax (plain greedy, no logprobs) takes it there and brings
back its tokens, not the logits (``greedy_on_device``). Sampling fails per
sequence: a sequence whose token cannot be sampled finishes
with ``FinishReason.ERROR`` (its event carries the error) and frees its cache;
the others in the step go on.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field, replace
from enum import Enum

import torch

from moeshard.cluster.engine.logprobs import TokenLogprobs, token_logprobs
from moeshard.cluster.engine.sampling import SamplingParams, greedy_rows, make_generator, sample_token
from moeshard.cluster.errors import one_line
from moeshard.cluster.model.batch import SequenceChunk, StepBatch
from moeshard.cluster.model.model import MoeModel
from moeshard.kernels.host_copy import from_host

logger = logging.getLogger(__name__)


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"  # this sequence failed (its event's ``error`` says why); the others go on


class RequestTooLong(ValueError):
    """A prompt (plus max_tokens) longer than the model's context."""


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int  # -1 on an ERROR event: no token was sampled
    finish_reason: FinishReason | None  # set on the request's last event
    error: str | None = None  # why the sequence failed, with FinishReason.ERROR
    logprobs: TokenLogprobs | None = None  # when the request asked for logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the first event, when asked for


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    token_ids: list[int]  # prompt + generated
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator
    num_computed: int = 0
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    prompt_entries: list[TokenLogprobs | None] = field(default_factory=lambda: [None])  # prompt logprobs so far
    prompt_entries_sent: bool = False
    block_keys: tuple[int, list] | None = None  # (tokens hashed, their full blocks' prefix-cache keys) while it waits

    def wants_prompt_rows(self, chunk: SequenceChunk) -> bool:
        """Whether this chunk's every row is needed: its prompt logprobs are asked for and not all computed yet."""
        k = self.params.prompt_logprobs
        return k is not None and not self.prompt_entries_sent and len(self.prompt_entries) < self.prompt_len

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len


def _samples(seq: Sequence, chunk: SequenceChunk) -> bool:
    """Whether the sequence samples a token after this step's chunk: the chunk reaches its last token."""
    return chunk.end_pos == len(seq.token_ids)


class Engine:
    def __init__(
        self,
        model: MoeModel,
        eos_token_ids: frozenset[int],
        max_batch_tokens: int = 2048,
        max_running: int = 256,
        token_limit: int | None = None,
    ):
        self.model = model
        self.cache = model.cache
        self.eos_token_ids = eos_token_ids
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        # Token ids in prompts and samples stay below this: the model's vocabulary, or the tokenizer's when smaller.
        self.token_limit = min(token_limit or model.config.vocab_size, model.config.vocab_size)
        self.max_model_len = min(model.config.max_position_embeddings, self.cache.capacity_tokens)
        self._ids = itertools.count()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        # Where a step whose sampling reads no logits but its argmaxes takes them: None, on the logits' device
        # unless that is the CPU (a GPU sends back a few ints instead of R x V logits); True or False to force it.
        self.greedy_on_device: bool | None = None

    # -- requests -----------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.check_prompt(prompt_ids, params.max_tokens)
        self.check_params(params)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        self.waiting.append(
            Sequence(
                seq_id=next(self._ids),
                request_id=request_id,
                token_ids=list(prompt_ids),
                prompt_len=len(prompt_ids),
                params=params,
                generator=make_generator(params),
                stop_ids=stop_ids,
            )
        )

    def check_params(self, params: SamplingParams) -> None:
        """Raise a one-line ValueError for token ids in ``logit_bias`` outside the vocabulary."""
        bad = [t for t in params.logit_bias if not 0 <= t < self.token_limit]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is out of range for a vocabulary of {self.token_limit}")

    def check_prompt(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Raise a one-line ValueError for an empty prompt, a bad token id, or too long a request."""
        prompt_len = len(prompt_ids)
        if prompt_len == 0:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.token_limit
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range for a vocabulary of {vocab}")
        if prompt_len + max_tokens > self.max_model_len:
            raise RequestTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens, but {prompt_len + max_tokens} "
                f"were requested ({prompt_len} in the prompt, {max_tokens} for the completion)"
            )

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its cache; True if it was known."""
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.cache.free(seq.seq_id)
                    return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        self._admit()
        scheduled = self._schedule()
        if not scheduled:
            return []
        batch = StepBatch.build([(chunk, seq.token_ids[chunk.start_pos : chunk.end_pos]) for seq, chunk in scheduled])
        rows, spans = self._logit_rows(scheduled)
        # [R, V] on the model's device: per chunk its last row, or all its rows
        greedy, logits = self._greedy_and_host_logits(scheduled, spans, self.model.forward(batch, logits_rows=rows))
        events = []
        for (seq, chunk), span in zip(scheduled, spans):
            self.cache.commit(seq.seq_id, seq.token_ids, chunk.end_pos)
            if seq.wants_prompt_rows(chunk):
                self._record_prompt_logprobs(seq, chunk, logits[span])  # [chunk rows, V]
            seq.num_computed = chunk.end_pos
            if seq.num_computed < len(seq.token_ids):
                continue  # a prefill chunk that has not reached the end of the prompt
            row = logits[span.stop - 1] if logits is not None else None  # [V]
            events.append(self._sample(seq, row, greedy.get(seq.seq_id)))
        return events

    def _greedy_and_host_logits(
        self, scheduled: list[tuple[Sequence, SequenceChunk]], spans: list[slice], logits: torch.Tensor
    ) -> tuple[dict[int, int], torch.Tensor | None]:
        """The step's plain-greedy tokens (seq_id -> token) and its logits [R, V] on the host, where sampling runs;
        one sync (two when a greedy row on the device is not finite). A step whose sequences read nothing of
        their rows but the argmax (plain greedy, no logprobs) takes the argmaxes where the logits are and leaves
        them there (None): on a GPU that brings back a few ints, not R x V floats (64 rows of a 151936-token
        vocabulary are 39 MB)."""
        on_device = self.greedy_on_device if self.greedy_on_device is not None else logits.device.type != "cpu"
        if on_device and all(self._reads_only_argmax(seq, chunk) for seq, chunk in scheduled):
            greedy = self._greedy_choices(scheduled, spans, logits)
            sampling = sum(_samples(seq, chunk) for seq, chunk in scheduled)
            if len(greedy) == sampling:
                return greedy, None
            # a row that is not finite: sample_token on the host reports it on that sequence alone
        host = logits.cpu()
        return self._greedy_choices(scheduled, spans, host), host

    @staticmethod
    def _reads_only_argmax(seq: Sequence, chunk: SequenceChunk) -> bool:
        """Whether the sequence needs nothing of this step's logits but its row's argmax (or nothing at all)."""
        if seq.wants_prompt_rows(chunk):
            return False
        return not _samples(seq, chunk) or (seq.params.plain_greedy and seq.params.logprobs is None)

    def _greedy_choices(
        self, scheduled: list[tuple[Sequence, SequenceChunk]], spans: list[slice], logits: torch.Tensor
    ) -> dict[int, int]:
        """seq_id -> its token, for the sequences that sample this step under plain greedy parameters: one argmax
        over their rows together (logits [R, V]). A row that is not finite is left to ``sample_token``."""
        picked = [
            (seq.seq_id, span.stop - 1)
            for (seq, chunk), span in zip(scheduled, spans)
            if _samples(seq, chunk) and seq.params.plain_greedy
        ]
        if not picked:
            return {}
        first, last = picked[0][1], picked[-1][1]
        if last - first + 1 == len(picked):  # consecutive rows (a decode step's, usually all of them): a view, no copy
            rows = logits[first : last + 1]  # [G, V]
        else:
            index = torch.tensor([row for _, row in picked], dtype=torch.int64)  # [G]
            rows = logits.index_select(0, from_host(index, logits.device))  # [G, V]
        choices = greedy_rows(rows[:, : self.token_limit]).token_ids
        return {seq_id: choice for (seq_id, _), choice in zip(picked, choices) if choice is not None}

    @staticmethod
    def _logit_rows(scheduled: list[tuple[Sequence, SequenceChunk]]) -> tuple[torch.Tensor, list[slice]]:
        """The batch rows whose logits are needed [R], and each chunk's slice of them."""
        rows: list[int] = []
        spans: list[slice] = []
        start = 0
        for seq, chunk in scheduled:
            end = start + chunk.num_tokens
            first = start if seq.wants_prompt_rows(chunk) else end - 1
            spans.append(slice(len(rows), len(rows) + end - first))
            rows.extend(range(first, end))
            start = end
        return torch.tensor(rows, dtype=torch.int64), spans

    def _record_prompt_logprobs(self, seq: Sequence, chunk: SequenceChunk, logits: torch.Tensor) -> None:
        """logits [chunk rows, V]: row i (position start_pos + i) scores prompt token start_pos + i + 1."""
        for i in range(logits.shape[0]):
            target = chunk.start_pos + i + 1
            if target == len(seq.prompt_entries) and target < seq.prompt_len:
                token_id = seq.token_ids[target]
                seq.prompt_entries.append(token_logprobs(logits[i, : self.token_limit], token_id, seq.params.prompt_logprobs))

    def _sample(self, seq: Sequence, row: torch.Tensor | None, chosen: int | None = None) -> TokenEvent:
        """The sequence's next token event (``chosen``: its greedy token, already taken with others'; ``row``, its
        logits on the host, may then be None unless logprobs are asked for); a sampling error fails this sequence
        alone."""
        assert row is not None or (chosen is not None and seq.params.logprobs is None), seq.request_id
        row = row[: self.token_limit] if row is not None else None  # [V]
        try:
            output_ids = seq.token_ids[seq.prompt_len :]
            if chosen is not None:
                token_id = chosen
            else:
                token_id = sample_token(row, seq.params, seq.generator, seq.token_ids[: seq.prompt_len], output_ids)
        except Exception as exc:  # noqa: BLE001 - reported on this sequence's event
            logger.warning("sampling failed for %s: %s", seq.request_id, exc)
            self.running.remove(seq)
            self.cache.free(seq.seq_id)
            return TokenEvent(seq.request_id, -1, FinishReason.ERROR, error=one_line(exc))
        event = self._append_token(seq, token_id)
        if seq.params.logprobs is not None:
            event = replace(event, logprobs=token_logprobs(row, token_id, seq.params.logprobs))
        if seq.params.prompt_logprobs is not None and not seq.prompt_entries_sent:
            event, seq.prompt_entries_sent = replace(event, prompt_logprobs=seq.prompt_entries), True
        return event

    def _admit(self) -> None:
        """Admit waiting sequences in order while each fits, keeping one block of growth per running sequence.

        A sequence starts after the computed blocks it shares from the prefix cache; one whose next
        full block another running sequence is computing waits a step for it (and so do those behind it).
        """
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            keys = None
            if self.cache.prefix_caching:  # hashed once while it waits, not every step
                if seq.block_keys is None or seq.block_keys[0] != len(seq.token_ids):
                    seq.block_keys = (len(seq.token_ids), self.cache.block_keys(seq.token_ids))
                keys = seq.block_keys[1]
            plan = self.cache.plan_admission(seq.token_ids, use_cache=seq.params.prompt_logprobs is None, keys=keys)
            if plan.waits_for_other or plan.blocks_to_take + len(self.running) > self.cache.num_free_blocks:
                return
            self.waiting.popleft()
            seq.num_computed = self.cache.admit(seq.seq_id, seq.token_ids, plan)
            self.running.append(seq)

    def _schedule(self) -> list[tuple[Sequence, SequenceChunk]]:
        """Decodes first (one token each), then prefill chunks until the token budget is spent."""
        budget = self.max_batch_tokens
        decodes = [s for s in self.running if len(s.token_ids) - s.num_computed == 1]
        prefills = [s for s in self.running if len(s.token_ids) - s.num_computed > 1]
        scheduled: list[tuple[Sequence, SequenceChunk]] = []
        for seq in decodes + prefills:
            if seq not in self.running:
                continue  # preempted to make room for an earlier one
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if n <= 0:
                break
            if not self._make_room(seq, seq.num_computed + n, {s.seq_id for s, _ in scheduled}):
                continue
            scheduled.append((seq, SequenceChunk(seq.seq_id, seq.num_computed, n)))
            budget -= n
        return scheduled

    def _make_room(self, seq: Sequence, length: int, keep: set[int]) -> bool:
        """Reserve ``length`` slots for ``seq``, preempting the newest unscheduled others; False if ``seq`` itself went."""
        while not self.cache.can_reserve(seq.seq_id, length):
            victims = [s for s in self.running if s.seq_id not in keep and s is not seq]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        self.cache.reserve(seq.seq_id, length)
        return True

    def _preempt(self, seq: Sequence) -> None:
        logger.info("KV cache full: preempting %s after %d tokens (recomputed later)", seq.request_id, seq.num_generated)
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _append_token(self, seq: Sequence, token_id: int) -> TokenEvent:
        seq.token_ids.append(token_id)
        finish = None
        if token_id in seq.stop_ids:
            finish = FinishReason.STOP
        elif seq.num_generated >= seq.params.max_tokens:
            finish = FinishReason.LENGTH
        if finish is not None:
            self.running.remove(seq)
            self.cache.free(seq.seq_id)
        return TokenEvent(seq.request_id, token_id, finish)

    # -- whole-prompt logits ------------------------------------------------------
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [T, V] of a prefill over ``token_ids`` (a scratch sequence, freed afterwards)."""
        self.check_prompt(token_ids, 0)
        seq_id = next(self._ids)
        self.cache.reserve(seq_id, len(token_ids))
        try:
            batch = StepBatch.build([(SequenceChunk(seq_id, 0, len(token_ids)), list(token_ids))])
            return self.model.forward(batch, logits_rows=torch.arange(len(token_ids))).cpu()
        finally:
            self.cache.free(seq_id)
