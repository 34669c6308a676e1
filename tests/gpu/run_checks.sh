#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine that may have no package index:
#   1. the GPU tests (tests/gpu: compiled kernels against torch, the model on CUDA against the CPU and
#      transformers, the collective channel over NCCL, the warm-up from Triton's cache), without timing
#      configurations (MOESHARD_AUTOTUNE=0 unless set: each key compiles the first that fits), except the
#      warm-up test, which tunes;
#   2. the kernel benchmark (Triton, autotuned, against torch at Mixtral 8x7B's shapes: speed, the configuration
#      chosen and its values' error);
#   3. prefill and decode in one process against transformers, both on the GPU in bfloat16;
#   4. what an engine step asks of the host and the device (step_profile: launches, syncs, host and device
#      time per decode and prefill step), on the GPU in bfloat16;
#   5. the same with every permutation planned on the device (--host-plan-max-ids 0), to weigh the host plan
#      that a decode step's few ids get against the device's.
# Each step runs under its own time limit and writes its log into REPORT_DIR; summary.txt holds one line per
# step (exit status and seconds; 124 = out of time). A step that fails or runs out of time does not stop the
# next. Run it from anywhere:
#
#   bash tests/gpu/run_checks.sh REPORT_DIR
#
# PYTHON       the interpreter that has torch with CUDA, triton, transformers, safetensors, tokenizers,
#              sentencepiece, msgpack, jinja2 and pytest (default: python3)
# WHEELS       a folder of wheels for what that interpreter lacks (pydantic and its own dependencies): they and
#              moeshard itself (from this checkout) are installed into a scratch folder without an index
#              when moeshard does not import yet
# STEP_LIMITS  seconds for steps 1 to 5 (default: "200 120 110 60 60", under 10 minutes in all; the model step
#              tunes the kernels at load, and the profiles find them in Triton's cache)
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash tests/gpu/run_checks.sh REPORT_DIR" >&2
    exit 2
fi
report=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot write to $1" >&2; exit 2; }
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
read -r tests_limit kernels_limit model_limit profile_limit device_plan_limit <<<"${STEP_LIMITS:-200 120 110 60 60}"
summary="$report/summary.txt"
: >"$summary"

if ! "$python" -c "import moeshard.cluster.engine" 2>/dev/null; then
    site=$(mktemp -d)
    wheels=()
    if [ -n "${WHEELS:-}" ]; then
        shopt -s nullglob
        wheels=("$WHEELS"/*.whl)
        shopt -u nullglob
    fi
    if ! "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" "${wheels[@]}" . \
        >"$report/install.log" 2>&1; then
        echo "install: failed (install.log)" | tee -a "$summary"
        exit 1
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    "$python" - <<'EOF'
import platform
import torch, transformers, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, transformers {transformers.__version__}")
print(f"GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
EOF
} >"$report/machine.txt" 2>&1

# step NAME LIMIT COMMAND...: runs COMMAND with its output in REPORT_DIR/NAME.log and a line in the summary.
step() {
    local name=$1 limit=$2 started status
    shift 2
    started=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$report/$name.log" 2>&1
    status=$?
    echo "$name: exit $status after $(($(date +%s) - started)) s (limit $limit s)" | tee -a "$summary"
}

export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
MOESHARD_AUTOTUNE=${MOESHARD_AUTOTUNE:-0} step tests "$tests_limit" "$python" -m pytest tests/gpu -m gpu -p no:cacheprovider -v -s -rA --durations=15
step kernels "$kernels_limit" "$python" -m moeshard.kernels.benchmarks.kernels --repeats 10
if "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    step model "$model_limit" "$python" -m moeshard.cluster.loadtest.prefill_bench --device cuda --dtype bfloat16 \
        --lengths 512,4096 --json "$report/model.json"
    step profile "$profile_limit" "$python" -m moeshard.cluster.loadtest.step_profile --device cuda --dtype bfloat16 \
        --table 25
    step device_plan "$device_plan_limit" "$python" -m moeshard.cluster.loadtest.step_profile --device cuda \
        --dtype bfloat16 --host-plan-max-ids 0
else
    for name in model profile device_plan; do
        echo "$name: skipped, no CUDA GPU" | tee -a "$summary"
    done
fi
