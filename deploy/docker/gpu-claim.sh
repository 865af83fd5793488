#!/bin/sh
# Entry point of the GPU images: claim one GPU for this container's lifetime,
# then exec the command.
#
# Why: `docker compose up --scale generation=N` gives every replica the same
# device request, and Docker's `count: 1` always hands out the *first* GPU, so
# N replicas would share GPU 0. Instead each GPU container sees all GPUs and
# takes the first one whose lock file (on a volume shared by the GPU
# containers, E3_GPU_LOCK_DIR) it can flock. The lock lives on file
# descriptor 9, which the exec'd process and its children inherit, so it is
# released exactly when the container stops.
#
# Without E3_GPU_LOCK_DIR (Kubernetes: the device plugin already gives each
# pod its own GPU) or without nvidia-smi (the CPU image) it only execs.
set -eu

if [ -z "${E3_GPU_LOCK_DIR:-}" ] || ! command -v nvidia-smi >/dev/null 2>&1; then
    exec "$@"
fi

count=$(nvidia-smi --list-gpus | wc -l)
mkdir -p "$E3_GPU_LOCK_DIR"
index=0
while [ "$index" -lt "$count" ]; do
    exec 9>"$E3_GPU_LOCK_DIR/gpu$index.lock"
    if flock --nonblock 9; then
        echo "e3-gpu-claim: using GPU $index of $count" >&2
        export CUDA_VISIBLE_DEVICES="$index"
        exec "$@"
    fi
    exec 9>&-
    index=$((index + 1))
done
echo "e3-gpu-claim: all $count GPUs are taken by other e3 containers; scale down or add GPUs" >&2
exit 1
