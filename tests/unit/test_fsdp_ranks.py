"""FSDP2 over 2 CPU ranks (gloo) gives the 1-rank update, and a 2-rank checkpoint resumes on 1 rank.

The two ranks are real processes under torchrun running tests/unit/fsdp_ranks.py;
the resumed single rank runs the same code in this process.
The reference is the same two steps on the bare model in this process,
without FSDP or any process group: a 2-rank result equal to it cannot come
from the code under test agreeing with itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_ranks  # noqa: E402


SCRIPT = Path(__file__).parent / "fsdp_ranks.py"
REPO = Path(__file__).resolve().parents[2]
# scripts/gpu_smoke.sh runs this file with E3_FSDP_DEVICE=cuda (NCCL, float32 on the GPU's kernels).
DEVICE = os.environ.get("E3_FSDP_DEVICE", "cpu")
RANKS = 2 if DEVICE == "cpu" or torch.cuda.device_count() >= 2 else 1
TOLERANCE = 2e-5 if DEVICE == "cpu" else 1e-4


def torchrun(ranks: int, out: Path, *extra: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                           str(SCRIPT), str(out), "--device", DEVICE, *extra], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    two = torchrun(RANKS, root / "two")
    # One rank, in this process (a job of one): resumes what the two ranks wrote.
    resumed = fsdp_ranks.run(root / "resumed", root / "two" / "checkpoint", DEVICE)
    return root, two, resumed


def bare_reference():
    """The two steps on the bare model: no FSDP, no process group, one process."""
    model = fsdp_ranks.tiny_qwen2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    reference = fsdp_ranks.tiny_qwen2().requires_grad_(False).eval()
    snapshots, results = [], []
    for mini_batches, seed, kl_coef in ((2, 1, 0.0), (1, 2, 0.0), (1, 3, 0.1)):
        results.append(fsdp_ranks.step(model, optimizer, mini_batches, seed, topology=None, kl_coef=kl_coef,
                                       ref_model=reference if kl_coef else None))
        snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return snapshots, results


def assert_weights_equal(saved: dict, expected: dict, atol: float = TOLERANCE) -> None:
    assert set(saved) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(saved[name], tensor, atol=atol, rtol=0), (name, float((saved[name] - tensor).abs().max()))


def test_two_ranks_give_the_one_process_update(runs):
    root, two, _ = runs
    (after_1, after_2, after_3), (result_1, result_2, result_3) = bare_reference()
    start = dict(fsdp_ranks.tiny_qwen2().named_parameters())
    assert max(float((after_1[k] - start[k].detach()).abs().max()) for k in start) > 1e-3  # the steps move the weights
    assert "model.layers.0.self_attn.q_proj.bias" in after_1 and "lm_head.weight" not in after_1  # tied: once
    assert_weights_equal(load_file(root / "two" / "after-1.safetensors"), after_1)
    assert_weights_equal(load_file(root / "two" / "after-2.safetensors"), after_2)
    assert_weights_equal(load_file(root / "two" / "after-3.safetensors"), after_3)  # with the KL reference
    for name, expected in (("step-1", result_1), ("step-2", result_2), ("step-3", result_3)):
        got = two[name]
        assert got["optimizer_steps"] == expected.optimizer_steps and got["skipped"] is False
        for field in ("loss", "entropy", "grad_norm", "approx_kl", "sampler_diff_mean", "sampler_diff_max"):
            assert got[field] == pytest.approx(getattr(expected, field), abs=TOLERANCE / 2), (name, field)


def test_a_checkpoint_written_by_two_ranks_resumes_on_one(runs):
    root, two, resumed = runs
    assert resumed["world_size"] == 1 and two["world_size"] == RANKS
    shards = sorted(p.name for p in (root / "two" / "checkpoint").iterdir())
    assert len([s for s in shards if s.endswith(".safetensors")]) == RANKS, shards  # one file per rank, no pickle
    assert not [s for s in shards if s.endswith((".pt", ".bin", ".pkl", ".metadata", ".distcp"))], shards
    # Resumed on one rank, step 2 lands where the two ranks' step 2 did: weights and AdamW moments came back.
    assert_weights_equal(load_file(root / "resumed" / "after-2.safetensors"),
                         load_file(root / "two" / "after-2.safetensors"))
    assert resumed["step-2"]["loss"] == pytest.approx(two["step-2"]["loss"], abs=1e-6)


def test_a_resumed_step_without_the_moments_would_differ(runs):
    # The resume test can fail: a fresh optimizer (no exp_avg/exp_avg_sq) from the same weights steps elsewhere.
    root, _, _ = runs
    model = fsdp_ranks.tiny_qwen2()
    model.load_state_dict(load_file(root / "two" / "after-1.safetensors"), strict=False)
    model.lm_head.weight = model.model.embed_tokens.weight
    fresh = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    fsdp_ranks.step(model, fresh, mini_batches=1, seed=2, topology=None)
    saved = load_file(root / "two" / "after-2.safetensors")
    assert max(float((saved[k] - v).abs().max()) for k, v in model.named_parameters()) > 1e-4
