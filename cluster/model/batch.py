"""One forward step's tokens: several sequences' new tokens laid end to end.

A step mixes prefill chunks (many tokens of one sequence) and decode tokens
(one token of a sequence) in one flat token dimension T, which is what every
MoE layer routes and dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeshard.kernels.host_copy import from_host


@dataclass(frozen=True)
class SequenceChunk:
    """Tokens ``start_pos .. start_pos + num_tokens - 1`` of sequence ``seq_id``."""

    seq_id: int
    start_pos: int
    num_tokens: int

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass(frozen=True)
class StepBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    chunks: tuple[SequenceChunk, ...]  # in token order, contiguous

    @classmethod
    def build(cls, chunk_tokens: list[tuple[SequenceChunk, list[int]]]) -> "StepBatch":
        chunks, ids, positions = [], [], []
        for chunk, tokens in chunk_tokens:
            if len(tokens) != chunk.num_tokens or chunk.num_tokens <= 0:
                raise ValueError(f"chunk {chunk} given {len(tokens)} tokens")
            chunks.append(chunk)
            ids.extend(tokens)
            positions.extend(range(chunk.start_pos, chunk.end_pos))
        return cls(
            token_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            chunks=tuple(chunks),
        )

    def to(self, device: torch.device) -> "StepBatch":
        """The same batch with its id and position tensors on ``device`` (itself when they are there)."""
        if self.token_ids.device == device:
            return self
        return StepBatch(from_host(self.token_ids, device), from_host(self.positions, device), self.chunks)

    def split_in_two(self) -> tuple["StepBatch", "StepBatch"]:
        """Two batches of whole chunks, in order, about half the tokens each (each non-empty; needs 2+ chunks)."""
        assert len(self.chunks) >= 2, "a batch of one chunk cannot be split"
        sizes = [c.num_tokens for c in self.chunks]
        total, running, cut = sum(sizes), 0, 1
        for i, size in enumerate(sizes[:-1]):
            running += size
            cut = i + 1
            if 2 * running >= total:
                break
        rows = sum(sizes[:cut])
        first = StepBatch(self.token_ids[:rows], self.positions[:rows], self.chunks[:cut])
        second = StepBatch(self.token_ids[rows:], self.positions[rows:], self.chunks[cut:])
        return first, second

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def last_token_rows(self) -> torch.Tensor:
        """Row index [B] of each chunk's last token (the row whose logits pick the next token)."""
        ends = torch.tensor([c.num_tokens for c in self.chunks], dtype=torch.int64).cumsum(0)
        return ends - 1
