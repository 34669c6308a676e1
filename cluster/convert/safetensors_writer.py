"""Writing a safetensors file one tensor at a time, the same tensor allowed under several keys.

``safetensors.torch.save_file`` refuses tensors that share memory, so a
checkpoint whose experts are copies of one matrix would need every copy
materialised first (gigabytes for the demo model). This writer streams each
key's bytes to disk from whatever tensor it names, so eight experts that are
one tensor cost that tensor's memory once. The file is the plain safetensors
format: an 8-byte little-endian header length, a JSON header (key -> dtype,
shape, byte range), then the raw little-endian data; it is written to a
temporary name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}
HEADER_ALIGNMENT = 8


def write_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (key -> CPU tensor, in this order) to ``path`` as one safetensors file."""
    path = Path(path)
    header: dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot write {key!r}: dtype {tensor.dtype} is not supported")
        if tensor.device.type != "cpu":
            raise ValueError(f"cannot write {key!r}: it is on {tensor.device}, not the CPU")
        size = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % HEADER_ALIGNMENT)

    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for tensor in tensors.values():
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # raw bytes, no copy
    os.replace(partial, path)
    logger.info("wrote %d tensors (%.2f GB) to %s", len(tensors), offset / 1e9, path)
