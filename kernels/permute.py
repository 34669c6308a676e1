"""permute (the dispatch gather): token rows regrouped so each destination's rows are contiguous.

    dest_ids [T, K] -> counts per destination -> exclusive scan (offsets)
                    -> stable rank of each (token, j) within its destination
                    -> rows[n] = hidden[source_token[n]]          (the gather)

Dimensions: T tokens, D hidden, K chosen per token, N rows sent (ids >= 0).

A destination is an expert (then ``num_dest`` = E) or an expert actor (then
``num_dest`` = actors). The id -1 means "not sent": no row, ``slot`` -1. Rows
are ordered by destination, then token, then j (stable). The index plan is
the same steps everywhere: numpy for CPU ids; on a device, numpy on a host copy
of a few ids (a decode step's: one copy down in the plan's one sync, one up,
where the torch steps launch about a dozen ops), torch ops on the device for
more; the Triton kernel is the row gather.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from moeshard.kernels.backend import resolve_backend, tile_rows
from moeshard.kernels.host_copy import from_host

logger = logging.getLogger(__name__)

# Device ids up to this many (T * K) are planned on the host: a copy down (the plan's one sync either way), numpy's
# few microseconds, one copy up; the torch steps launch about a dozen ops, which costs a launch-bound decode step
# more host time. Past it, numpy's sort grows with the ids while the device's does not.
HOST_PLAN_MAX_IDS = 1024


@dataclass(frozen=True)
class Permutation:
    rows: torch.Tensor  # [N, D] hidden rows grouped by destination, hidden's dtype
    expert_offsets: torch.Tensor  # [num_dest + 1] int64: destination d owns rows[off[d]:off[d + 1]]
    source_token: torch.Tensor  # [N] int64: the token each row came from
    slot: torch.Tensor  # [T, K] int64: the row of token t's j-th choice, -1 where not sent
    host_offsets: tuple[int, ...]  # [num_dest + 1] expert_offsets as Python ints (copied in the plan's one sync)

    @property
    def dest_offsets(self) -> torch.Tensor:
        """``expert_offsets`` under its general name, for destinations that are actors."""
        return self.expert_offsets

    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def num_dest(self) -> int:
        return self.expert_offsets.shape[0] - 1


class PermutationPlan(NamedTuple):
    expert_offsets: torch.Tensor  # [num_dest + 1] int64
    source_token: torch.Tensor  # [N] int64
    slot: torch.Tensor  # [T, K] int64
    host_offsets: tuple[int, ...]  # [num_dest + 1] expert_offsets as Python ints


def plan_permutation(dest_ids: torch.Tensor, num_dest: int) -> PermutationPlan:
    """The index half of permute: offsets, source token of each row, slot of each (token, j)."""
    assert dest_ids.dim() == 2 and not dest_ids.is_floating_point(), dest_ids.shape
    assert num_dest >= 1, num_dest
    if dest_ids.device.type == "cpu":
        return _plan_permutation_numpy(dest_ids, num_dest)
    if dest_ids.numel() <= HOST_PLAN_MAX_IDS:
        return _plan_permutation_on_host(dest_ids, num_dest)
    return _plan_permutation_torch(dest_ids, num_dest)


def _plan_permutation_on_host(dest_ids: torch.Tensor, num_dest: int) -> PermutationPlan:
    """``plan_permutation`` for a few device ids: planned in numpy on a host copy (the one sync), and the plan
    copied back to the ids' device as one tensor (offsets, source, slot end to end) without waiting."""
    T, K = dest_ids.shape
    plan = _plan_permutation_numpy(dest_ids.to("cpu"), num_dest)
    n = plan.source_token.shape[0]
    packed = from_host(torch.cat((plan.expert_offsets, plan.source_token, plan.slot.view(-1))), dest_ids.device)
    offsets, source, slot = packed.split((num_dest + 1, n, T * K))  # views: [num_dest + 1], [N], [T*K]
    return PermutationPlan(offsets, source, slot.view(T, K), plan.host_offsets)


def _plan_permutation_torch(dest_ids: torch.Tensor, num_dest: int) -> PermutationPlan:
    """``plan_permutation`` in torch ops, on the ids' device, with one host sync: the id range and the offsets
    (whose last is the number of rows sent) come back together (``bincount`` would add its own sync on CUDA; the
    offsets are searched instead). The host's copy of the offsets spares its users (dispatch, the grouped
    kernel's block table) syncs of their own."""
    T, K = dest_ids.shape
    flat = dest_ids.reshape(-1).long()  # [T*K]
    keys = torch.where(flat >= 0, flat, num_dest)  # [T*K] "not sent" sorts last
    sorted_keys, order = torch.sort(keys, stable=True)  # [T*K] (dest, token, j) order
    dests = torch.arange(num_dest + 1, device=flat.device)  # [num_dest + 1]
    offsets = torch.searchsorted(sorted_keys, dests)  # [num_dest + 1] first row of each destination; last = N
    host_offsets = (0,) * (num_dest + 1)
    if flat.numel():
        lo, hi = torch.aminmax(flat)
        lo, hi, *host_offsets = torch.cat((torch.stack((lo, hi)), offsets)).tolist()  # the layer's one sync here
        assert lo >= -1 and hi < num_dest, f"dest ids must be in [-1, {num_dest}), got [{lo}, {hi}]"
    n = host_offsets[-1]
    order = order[:n]  # [N]
    slot = torch.full((T * K,), -1, dtype=torch.int64, device=flat.device)
    slot[order] = torch.arange(n, device=flat.device)
    return PermutationPlan(offsets, torch.div(order, K, rounding_mode="floor"), slot.view(T, K), tuple(host_offsets))


def _plan_permutation_numpy(dest_ids: torch.Tensor, num_dest: int) -> PermutationPlan:
    """``plan_permutation`` for CPU ids: the torch path's steps in numpy, the same plan (tested), 3x faster for a
    decode step's few dozen ids (22 against 66 µs), where each torch op costs several times a numpy one."""
    T, K = dest_ids.shape
    flat = dest_ids.reshape(-1).numpy().astype(np.int64, copy=False)  # [T*K] only read: every array below is new
    if flat.size:
        lo, hi = flat.min(), flat.max()
        assert lo >= -1 and hi < num_dest, f"dest ids must be in [-1, {num_dest}), got [{lo}, {hi}]"
    keys = np.where(flat >= 0, flat, num_dest)  # [T*K] "not sent" sorts last
    order = np.argsort(keys, kind="stable")  # [T*K] (dest, token, j) order
    counts = np.bincount(keys, minlength=num_dest + 1)[:num_dest]  # [num_dest]
    offsets = np.zeros(num_dest + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    n = int(offsets[-1])
    order = order[:n]  # [N]
    slot = np.full(T * K, -1, dtype=np.int64)
    slot[order] = np.arange(n)
    source = order // K  # [N]
    return PermutationPlan(
        torch.from_numpy(offsets), torch.from_numpy(source), torch.from_numpy(slot).view(T, K), tuple(offsets.tolist())
    )


def permute(
    hidden: torch.Tensor,
    dest_ids: torch.Tensor,
    num_dest: int,
    *,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> Permutation:
    """hidden [T, D], dest_ids [T, K] in [-1, num_dest) -> rows grouped by destination (see module doc)."""
    assert hidden.dim() == 2 and dest_ids.dim() == 2, (hidden.shape, dest_ids.shape)
    assert dest_ids.shape[0] == hidden.shape[0], (hidden.shape, dest_ids.shape)
    assert dest_ids.device == hidden.device, (hidden.device, dest_ids.device)
    plan = plan_permutation(dest_ids, num_dest)
    n, D = plan.source_token.shape[0], hidden.shape[1]
    if out is None:
        out = torch.empty(n, D, dtype=hidden.dtype, device=hidden.device)
    assert out.shape == (n, D) and out.dtype == hidden.dtype, (out.shape, out.dtype)
    if resolve_backend(backend, hidden.device) == "triton":
        gather_rows_triton(hidden, plan.source_token, out)
    else:
        torch.index_select(hidden, 0, plan.source_token, out=out)
    return Permutation(out, plan.expert_offsets, plan.source_token, plan.slot, plan.host_offsets)


def gather_rows_triton(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out[n] = src[index[n]] for src [T, D], index [N], out [N, D]."""
    N, D = out.shape
    if N == 0 or D == 0:
        return
    src = src if src.stride(1) == 1 else src.contiguous()
    assert out.stride(1) == 1, "out must have unit stride along D"
    block_d = min(256, triton.next_power_of_2(D))
    block_n = tile_rows(block_d, N)
    grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_d))
    _gather_rows_kernel[grid](
        src, index, out, N, D, src.stride(0), out.stride(0), BLOCK_N=block_n, BLOCK_D=block_d
    )


@triton.jit
def _gather_rows_kernel(
    src_ptr, index_ptr, out_ptr, N, D, stride_src, stride_out, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    """One program copies a [BLOCK_N, BLOCK_D] tile of gathered rows.

    src_ptr   [T, D] any dtype (unit stride along D)
    index_ptr [N]    int64, row of src for each output row
    out_ptr   [N, D] src's dtype (unit stride along D)
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    row_ok = rows < N
    src_rows = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BN]
    mask = row_ok[:, None] & (cols[None, :] < D)  # [BN, BD]
    tile = tl.load(src_ptr + src_rows[:, None] * stride_src + cols[None, :], mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], tile, mask=mask)
