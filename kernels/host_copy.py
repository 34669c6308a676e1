"""Small tensors built on the host for one step (tables, slots, token ids), copied to the device.

``tensor.to("cuda")`` from ordinary host memory waits for the stream's queued work before it returns (torch
synchronises the copy), so each such copy in a step was a host sync like an ``.item()``. ``from_host`` pins the
tensor (torch's caching host allocator, which keeps the pinned block until the copy has run) and copies it
without waiting: the kernels that read it are queued after the copy on the same stream. On the CPU it is
``tensor.to(device)``.
"""

from __future__ import annotations

import torch


def from_host(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``, queued behind the stream's work instead of waiting for it; a tensor
    already on a device is moved as ``.to`` moves it."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
