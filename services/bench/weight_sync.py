"""Weight sync: from "the trainer has new weights" to "every replica serves them", against the disk.

For each model size a stack without trainer runs (reward, scheduler, the
replicas on vLLM) and this process plays the trainer with the trainer's own
code: it changes the weights in memory, then the clock starts; it publishes
them with `publish_policy` (safetensors into a fresh version directory,
renamed into place), reports the step with the new version over gRPC, and
polls every replica's /readyz until all of them report that version. So the
figure includes the whole path: the write, the scheduler adopting the
version, the replica learning it from its next lease reply (replicas with
nothing to do ask every 0.2 s) and vLLM's in-place reload. The reload alone
is the replica's own `e3_weight_sync_seconds` histogram.

The yardstick is the same number of bytes written to and read back from a
file in the same directory, without fsync (as publish does not fsync);
read-back mostly hits the page cache, as the replicas' reads do.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from e3.config import load_config
from e3.model.llama import ModelSpec, build_model, count_parameters, save_model_dir
from services.bench.harness import NullTrainer, metric_value, replica_version, scrape
from services.trainer.publish import publish_policy

# Named by their parameter count with the 53-token character vocabulary.
SIZES: dict[str, ModelSpec] = {
    "1M": ModelSpec(hidden_size=128, num_layers=4, num_heads=4, head_dim=32, intermediate_size=512),
    "10M": ModelSpec(hidden_size=256, num_layers=10, num_heads=8, head_dim=32, intermediate_size=1024),
    "50M": ModelSpec(hidden_size=512, num_layers=12, num_heads=16, head_dim=32, intermediate_size=2048),
}
SYNC_METRIC = "e3_weight_sync_seconds"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def disk_round_trip(directory: Path, nbytes: int, repeats: int) -> dict:
    """Median seconds to write `nbytes` to a new file in `directory` and to read them back.

    `fsync_s` adds forcing the write to the device: not what publishing
    does, but what the disk itself costs, for reference.
    """
    payload = os.urandom(nbytes)  # random, so no layer can shortcut zeros
    path = directory / "disk-probe.bin"
    writes, reads, syncs = [], [], []
    for _ in range(repeats):
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        with path.open("wb") as f:
            f.write(payload)
            f.flush()
            writes.append(time.perf_counter() - start)
            os.fsync(f.fileno())
            syncs.append(time.perf_counter() - start)
        start = time.perf_counter()
        with path.open("rb") as f:
            f.read()
        reads.append(time.perf_counter() - start)
    path.unlink(missing_ok=True)
    return {"write_s": statistics.median(writes), "read_s": statistics.median(reads),
            "total_s": statistics.median(w + r for w, r in zip(writes, reads)),
            "fsync_total_s": statistics.median(w + r for w, r in zip(syncs, reads))}


def _wait_versions(urls: list[str], version: int, timeout_s: float = 120.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(replica_version(url) == version for url in urls):
            return time.perf_counter()
        time.sleep(0.005)
    raise TimeoutError(f"replicas did not all serve policy version {version} within {timeout_s:.0f}s")


def measure_size(name: str, spec: ModelSpec, work_dir: Path, syncs: int, replicas: int) -> dict:
    from services.launcher import start_stack

    model = build_model(spec, seed=0)
    base = work_dir / f"model-{name}"
    save_model_dir(model, base)
    config = load_config(
        environ={}, preset="grpo", base_model=str(base.resolve()),
        # The smallest step that still goes through lease, sample, score and submit.
        data={"train_size": 2 * (syncs + 2), "valid_size": 1},
        allocation={"n": 1, "n_low": 1, "n_high": 1, "n_update": 0},
        training={"steps": syncs + 2, "batch_questions": 2, "max_tokens": 1},
        generation={"replicas": replicas},
        # The bench plays the trainer and reports training steps only: no validation tasks.
        validation_questions=0,
    )
    run_dir = work_dir / f"stack-{name}"
    running = start_stack(config, run_dir, trainer=False)
    trainer = NullTrainer(f"{running.config.scheduler.host}:{running.config.scheduler.grpc_port}",
                          running.config.auth.trainer_token)
    urls = [running.url("generation", i) for i in range(replicas)]
    try:
        trainer.wait_batch(0)  # the replicas are up and have sampled once
        samples = []
        for version in range(1, syncs + 1):
            with torch.no_grad():  # "the trainer has new weights"; making them is not timed
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=1e-3)
            reloads_before = [metric_value(scrape(u), f"{SYNC_METRIC}_sum") for u in urls]
            start = time.perf_counter()
            path = publish_policy(model, base, run_dir / "weights", version)
            published = time.perf_counter()
            trainer.report(version - 1, version, str(path.resolve()))
            served = _wait_versions(urls, version)
            reloads = [metric_value(scrape(u), f"{SYNC_METRIC}_sum") - b for u, b in zip(urls, reloads_before)]
            samples.append({"total_s": served - start, "publish_s": published - start, "reload_s": max(reloads),
                            "bytes": _dir_bytes(path)})
            trainer.wait_batch(version)  # the step sampled with the new weights is complete
    finally:
        trainer.close()
        running.stack.stop()
    nbytes = samples[0]["bytes"]
    disk = disk_round_trip(run_dir, nbytes, repeats=syncs)
    total = statistics.median(s["total_s"] for s in samples)
    return {
        "size": name, "parameters": count_parameters(model), "bytes": nbytes, "replicas": replicas, "syncs": syncs,
        "sync_s": {key: statistics.median(s[key] for s in samples) for key in ("total_s", "publish_s", "reload_s")},
        "disk_s": disk, "ratio_to_disk": total / disk["total_s"] if disk["total_s"] else None,
        "samples": samples,
    }


def measure_weight_sync(work_dir: Path, sizes: list[str], syncs: int, replicas: int) -> list[dict]:
    work_dir.mkdir(parents=True, exist_ok=True)
    return [measure_size(name, SIZES[name], work_dir, syncs, replicas) for name in sizes]
