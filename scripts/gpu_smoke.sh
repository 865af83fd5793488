#!/usr/bin/env bash
# The GPU check of the trainer and the whole stack (docs/training.md), for a machine with a GPU and no network.
#
#   bash scripts/gpu_smoke.sh            # both parts; about 8 minutes on one GPU
#   E3_GPU_SMOKE_PARTS=trainer bash scripts/gpu_smoke.sh   # part 1 only (torch with CUDA is all it needs)
#
# 1. trainer: FSDP2 on NCCL, float32 on the GPU, gives the CPU process's update
#    within 1e-4, with and without the KL reference, and resumes its checkpoint
#    on one rank (tests/unit/test_fsdp_ranks.py; 2 ranks where 2 GPUs exist, else 1).
# 2. stack: the end-to-end test (tests/e2e/test_training_loop.py) with the tiny
#    Qwen2 in bfloat16, the trainer and both vLLM replicas sharing the GPU(s),
#    the trainer on 2 ranks where 2 GPUs exist: every planned rollout generated,
#    scored and trained once, the sampler's and the trainer's log-probabilities
#    close, every policy version served. Needs vLLM (the CUDA build), redis-server
#    and the project's dependencies (`make setup` on a machine with nvidia-smi installs the CUDA vLLM).
#
# A skipped test fails the smoke: a check that did not run proves nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
parts=${E3_GPU_SMOKE_PARTS:-trainer,stack}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_smoke: $PY has no usable CUDA GPU (torch.cuda.is_available() is False)" >&2
    exit 2
fi
"$PY" -c 'import torch; print("gpu_smoke: torch", torch.__version__, "CUDA", torch.version.cuda, "GPUs", torch.cuda.device_count(), torch.cuda.get_device_name(0))'

run_pytest() {  # fails on a failure and on a skip
    local log
    log=$(mktemp)
    set +e
    "$PY" -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -ne 0 ]; then exit "$rc"; fi
    if grep -qE '[0-9]+ skipped' "$log"; then
        echo "gpu_smoke: a test was skipped (see above); the smoke needs every check to run" >&2
        exit 1
    fi
}

started=$(date +%s)
if [[ $parts == *trainer* ]]; then
    echo "gpu_smoke: part 1, the trainer on FSDP2 over NCCL"
    E3_FSDP_DEVICE=cuda run_pytest tests/unit/test_fsdp_ranks.py  # its own process: its job runs on NCCL
fi
if [[ $parts == *stack* ]]; then
    echo "gpu_smoke: part 2, the four services on the GPU"
    "$PY" -c 'import vllm' || { echo "gpu_smoke: vLLM is not installed for $PY; run part 1 alone with E3_GPU_SMOKE_PARTS=trainer" >&2; exit 2; }
    command -v redis-server >/dev/null || { echo "gpu_smoke: redis-server is not on PATH" >&2; exit 2; }
    E3_E2E_DEVICE=cuda run_pytest tests/e2e/test_training_loop.py
fi
echo "gpu_smoke: passed in $(( $(date +%s) - started )) s"
