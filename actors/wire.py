"""The bytes that cross between coordinator and expert actors: raw tensor buffers behind a small msgpack header.

No pickled torch objects travel: a message is ``[4-byte header length][msgpack header][tensor bytes...]``,
and each tensor is described in the header by name, dtype and shape.

Dimensions: n rows sent to one actor, D hidden, K chosen per token.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import msgpack
import torch

# Sent to (and returned by) an actor with no rows this layer. Not empty: an empty message can
# stall a compiled graph's cross-node channel; a real message is never shorter than 4 bytes.
NO_WORK = b"\x00"

_DTYPES = {str(dt).removeprefix("torch."): dt for dt in (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64)}
_NAMES = {dt: name for name, dt in _DTYPES.items()}
_ITEMSIZE = {name: dt.itemsize for name, dt in _DTYPES.items()}

# A tensor over the message's bytes is read-only; nothing writes into these inputs (one filter, set once).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning, module=__name__)


def pack_tensors(meta: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise named tensors (any of float32/bfloat16/float16/int32/int64) plus plain metadata."""
    specs, buffers = [], []
    for name, tensor in tensors.items():
        if tensor.requires_grad or tensor.device.type != "cpu" or not tensor.is_contiguous():
            tensor = tensor.detach().contiguous().cpu()  # (checked first: three calls fewer per tensor otherwise)
        specs.append([name, _NAMES[tensor.dtype], list(tensor.shape)])
        # A view of the bytes (numpy has no bfloat16: those go as raw bytes); join copies them once.
        buffers.append(tensor.reshape(-1).view(torch.uint8).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy())
    header = msgpack.packb({"meta": meta, "tensors": specs})
    return b"".join([len(header).to_bytes(4, "little"), header, *buffers])


def unpack_tensors(message: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """Inverse of ``pack_tensors``; tensors are read-only views of ``message``, nothing is copied."""
    header_len = int.from_bytes(message[:4], "little")
    header = msgpack.unpackb(message[4 : 4 + header_len])
    offset = 4 + header_len
    tensors = {}
    for name, dtype_name, shape in header["tensors"]:
        dtype = _DTYPES[dtype_name]
        count = 1
        for size in shape:
            count *= size
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(message, dtype=dtype, count=count, offset=offset).view(shape)
        offset += count * _ITEMSIZE[dtype_name]
    return header["meta"], tensors


@dataclass(frozen=True)
class ExpertBatch:
    """What the coordinator sends one expert actor for one MoE layer."""

    layer: int
    tag: int  # this dispatch's number, echoed in the reply: a late reply is never taken for another dispatch's
    rows: torch.Tensor  # [n, D] hidden states of the tokens routed here (each token once)
    local_ids: torch.Tensor  # [n, K] int32 index into the actor's stack of this layer, -1 = expert not here
    weights: torch.Tensor  # [n, K] float32 routing weights (0 where local_ids is -1)
    version: int = 0  # the placement whose stacks local_ids index

    def encode(self) -> bytes:
        meta = {"layer": self.layer, "tag": self.tag, "version": self.version}
        return pack_tensors(meta, {"rows": self.rows, "local_ids": self.local_ids, "weights": self.weights})

    @classmethod
    def decode(cls, message: bytes) -> "ExpertBatch":
        meta, t = unpack_tensors(message)
        return cls(
            layer=meta["layer"], tag=meta["tag"], rows=t["rows"], local_ids=t["local_ids"], weights=t["weights"],
            version=meta.get("version", 0),
        )  # fmt: skip


@dataclass(frozen=True)
class ExpertReply:
    """An actor's answer to one ``ExpertBatch``."""

    tag: int  # the batch's tag
    rows: torch.Tensor  # [n, D] weighted expert outputs ([0, D] when ``stale``)
    stale: bool = False  # the actor holds no stacks of the batch's placement version (restarted since): not computed

    def encode(self) -> bytes:
        return pack_tensors({"tag": self.tag, "stale": self.stale}, {"rows": self.rows})

    @classmethod
    def decode(cls, message: bytes) -> "ExpertReply":
        meta, t = unpack_tensors(message)
        return cls(tag=meta["tag"], rows=t["rows"], stale=meta.get("stale", False))
