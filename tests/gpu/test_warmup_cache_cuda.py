"""A restarted process warms up from Triton's on-disk cache: the autotuner's choices are read back, nothing is timed.

Each run is a fresh Python process (as a restarted engine or expert actor is) on one Triton cache folder. The
first warms up the grouped SwiGLU and paged attention in bfloat16 and times configurations; the second meets
every key it needs in the cache. Both print how long the warm-up took, which docs/gpu.md records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

WARM_UP = r"""
import json, time
import torch
from triton.runtime.autotuner import Autotuner
from moeshard.kernels.warmup import warm_up_expert_ffn, warm_up_paged_attention

found = []
check = Autotuner.check_disk_cache
def counted(self, *args, **kwargs):
    hit = check(self, *args, **kwargs)
    found.append(bool(hit))
    return hit
Autotuner.check_disk_cache = counted

E, I, D = 8, 2048, 1024
w1, w3 = (torch.randn(E, I, D, device="cuda").to(torch.bfloat16) for _ in range(2))
w2 = torch.randn(E, D, I, device="cuda").to(torch.bfloat16)
started = time.perf_counter()
calls = warm_up_expert_ffn(w1, w3, w2)
calls += warm_up_paged_attention(32, 8, 128, 16, None, 2048, torch.bfloat16, torch.device("cuda"))
torch.cuda.synchronize()
print(json.dumps({"calls": calls, "keys": len(found), "from_cache": sum(found), "seconds": time.perf_counter() - started}))
"""


def _warm_up(cache_dir: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache_dir, MOESHARD_AUTOTUNE="1")  # tune, even in a quick run
    done = subprocess.run([sys.executable, "-c", WARM_UP], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_restart_reads_the_autotuned_choices_back(compiled_triton, tmp_path):
    first = _warm_up(str(tmp_path))
    second = _warm_up(str(tmp_path))
    print(f"warm-up: {first['seconds']:.1f} s cold, {second['seconds']:.1f} s from the cache ({first['keys']} tuned keys)")
    assert first["calls"] == second["calls"] > 0
    assert first["keys"] > 0 and first["from_cache"] == 0  # a cold cache: every key that had a choice to make was timed
    assert second["keys"] == first["keys"] and second["from_cache"] == second["keys"]  # nothing timed again
