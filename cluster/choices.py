"""The names a setting may take, in one place for the config tree, the CLI's flags and the benchmarks.

Plain strings only, no torch: the CLI builds its ``--help`` from these without loading the model stack.
"""

from __future__ import annotations

# Dispatch transports (actors/transport.py): frames over a TCP connection per actor, Ray actor calls, a compiled graph,
# tensors over a torch.distributed pair per actor (gloo on the CPU, NCCL between GPUs).
TRANSPORTS = ("socket", "actor_calls", "compiled_graph", "collective")

# Expert weights as stored: "none" (the model's dtype) or int8 per output channel with int8 activations per row
# (kernels/int8_linear.py), quantized from the checkpoint at load: vLLM's name for online int8 experts.
QUANTIZATIONS = ("none", "experts_int8")
QUANTIZATION_HELP = "experts_int8: expert weights int8, quantized at load (half bfloat16's bytes; CPU only); default none"

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)  # auto: bfloat16 on a GPU, float32 on the CPU


def check_device_name(name: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else raises a one-line ValueError."""
    if name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")

BATCH_INVARIANT_HELP = (
    "every request's output the same bit for bit whatever else is batched with it, however its prompt is chunked "
    "and whether its prefix is cached (slower; CPU only)"
)
