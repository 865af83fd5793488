#!/bin/bash
# Entry point of the GPU images: claim E3_GPU_COUNT GPUs (default 1) for this
# container's lifetime, then exec the command with CUDA_VISIBLE_DEVICES set to them.
#
# Why: `docker compose up --scale generation=N` gives every replica the same
# device request, and Docker's `count: 1` always hands out the *first* GPU, so
# N replicas would share GPU 0. Instead each GPU container sees all GPUs and
# takes the first free ones whose lock files (on a volume shared by the GPU
# containers, E3_GPU_LOCK_DIR) it can flock. Each lock lives on a file
# descriptor that the exec'd process and its children inherit, so it is
# released exactly when the container stops. Claims are made one container at
# a time (claim.lock), so two containers never split the GPUs both need.
# The trainer sets E3_GPU_COUNT to its number of ranks; torchrun
# --nproc-per-node=gpu then starts one rank per claimed GPU.
#
# Without E3_GPU_LOCK_DIR (Kubernetes: the device plugin already gives each
# pod its own GPUs) or without nvidia-smi (the CPU image) it only execs.
set -eu

if [ -z "${E3_GPU_LOCK_DIR:-}" ] || ! command -v nvidia-smi >/dev/null 2>&1; then
    exec "$@"
fi

want="${E3_GPU_COUNT:-1}"
case "$want" in
    ''|*[!0-9]*|0) echo "e3-gpu-claim: E3_GPU_COUNT must be a positive integer, got '$want'" >&2; exit 2 ;;
esac
count=$(nvidia-smi --list-gpus | wc -l)
mkdir -p "$E3_GPU_LOCK_DIR"
exec {claiming}>"$E3_GPU_LOCK_DIR/claim.lock"
flock "$claiming"
claimed=()
index=0
while [ "$index" -lt "$count" ] && [ "${#claimed[@]}" -lt "$want" ]; do
    exec {fd}>"$E3_GPU_LOCK_DIR/gpu$index.lock"
    if flock --nonblock "$fd"; then
        claimed+=("$index")
    else
        exec {fd}>&-
    fi
    index=$((index + 1))
done
exec {claiming}>&-
if [ "${#claimed[@]}" -lt "$want" ]; then
    echo "e3-gpu-claim: wanted $want GPU(s) but only ${#claimed[@]} of $count are free (the others are taken by" \
         "other e3 containers); scale down or add GPUs" >&2
    exit 1
fi
visible=$(IFS=,; echo "${claimed[*]}")
echo "e3-gpu-claim: using GPU(s) $visible of $count" >&2
export CUDA_VISIBLE_DEVICES="$visible"
exec "$@"
