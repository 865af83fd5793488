"""A full disk during publish and checkpoint fails cleanly: one clear error, no temporary files, the last one intact.

The disk is real: a tmpfs of a few hundred KB, mounted for the test (as
root), filled until only so many bytes are free. Each sweep makes room for
one more page at a time, so the write stops at every point in turn (the
config, each weights file, the index, the tokenizer, each of the
checkpoint's files, the `latest` pointer) until it fits. The free-space
check before writing is bypassed in the sweeps, as when something else
fills the disk after it. Where mounting is not allowed, the kernel limits
the size of any one file instead (RLIMIT_FSIZE: EFBIG), and the tests that
need a real free-space count skip. Two ranks, each limited in turn, show a
failure on one rank stops both, promptly.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script, one rank of the two-rank test
    sys.path.insert(0, str(REPO))

from e3.train.parallel import start_ranks, stop_ranks  # noqa: E402
from e3.train.sharding import full_state_dict, shard_policy  # noqa: E402
from services.common.runtime import free_port  # noqa: E402
from services.trainer import checkpoints, disk, publish  # noqa: E402
from services.trainer.checkpoints import (CheckpointFailed, latest_checkpoint, load_checkpoint,  # noqa: E402
                                          save_checkpoint)
from services.trainer.publish import PublishFailed, publish_state  # noqa: E402

PAGE = 4096
DISK_SIZE = 768 * 1024  # the previous and the next checkpoint (~340 KB each) of the tiny model, or policy (~250 KB)


class Tmpfs:
    """A tmpfs mounted at `path`; `room(n)` fills it until only n bytes are free."""

    errno = errno.ENOSPC
    counts_free_space = True

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def room(self, free: int):
        filler = self.path / "filler"
        with open(filler, "wb") as f:
            f.write(bytes(max(0, shutil.disk_usage(self.path).free - free)))
        try:
            yield
        finally:
            filler.unlink()


class FileSizeLimit:
    """A plain directory where, inside `room(n)`, the kernel refuses any file past n bytes."""

    errno = errno.EFBIG
    counts_free_space = False

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def room(self, free: int):
        with file_size_limit(free):
            yield


@contextmanager
def file_size_limit(limit: int):
    """No file of this process may grow past `limit` bytes: a write past it fails with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount_point)],
        capture_output=True).returncode == 0
    if not mounted:
        yield FileSizeLimit(mount_point)
        return
    try:
        yield Tmpfs(mount_point)
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def removed_trees(monkeypatch):
    """The names of the files each failed write left in its temporary directory, seen just before it was removed.

    A `latest.tmp` beside it (a checkpoint's pointer being written) counts as one of them.
    """
    seen: list[set[str]] = []
    real = disk.remove_tree

    def spy(path: Path, error=None):
        names = {p.name for p in path.rglob("*") if p.is_file()} if path.exists() else set()
        seen.append(names | ({"latest.tmp"} if (path.parent / "latest.tmp").exists() else set()))
        real(path, error)

    monkeypatch.setattr(publish, "remove_tree", spy)
    monkeypatch.setattr(checkpoints, "remove_tree", spy)
    return seen


def tiny_qwen2(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def tokenizer_source(root: Path) -> Path:
    source = root / "tokenizer"
    source.mkdir()
    (source / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(6000)}}}))
    (source / "tokenizer_config.json").write_text("{}")
    return source


def publish_tiny(model, source: Path, weights: Path, version: int) -> Path:
    return publish_state(dict(model.named_parameters()), model.config, source, weights, version, dtype=torch.float32,
                         epoch=2, max_shard_size="40KB")  # four weights files and an index


def assert_policy_intact(path: Path, model) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for name, tensor in loaded.named_parameters():
        assert torch.equal(tensor, dict(model.named_parameters())[name]), name


def assert_no_temporary_files(directory: Path) -> None:
    assert [p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")] == []


def test_a_policy_that_cannot_fit_is_refused_before_any_write(small_disk, tmp_path):
    if not small_disk.counts_free_space:
        pytest.skip("needs a tmpfs (root): a file size limit has no free space to count")
    source, weights = tokenizer_source(tmp_path), small_disk.path / "weights"
    first = tiny_qwen2(seed=1)
    published = publish_tiny(first, source, weights, 1)
    with small_disk.room(100 * 1024), pytest.raises(PublishFailed) as caught:  # half a policy
        publish_tiny(tiny_qwen2(seed=2), source, weights, 2)
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert str(caught.value).startswith(f"publishing policy v000002.t0002 failed: no space left on device under "
                                        f"{weights} (needs at least ")
    assert sorted(p.name for p in weights.iterdir()) == [published.name]
    assert_policy_intact(published, first)


def test_a_disk_that_fills_during_a_publish_leaves_the_published_policy_and_nothing_else(
        small_disk, tmp_path, monkeypatch, removed_trees):
    monkeypatch.setattr(disk, "free_bytes", lambda directory: 2**60)  # filled after the check
    source, weights = tokenizer_source(tmp_path), small_disk.path / "weights"
    first = tiny_qwen2(seed=1)
    published = publish_tiny(first, source, weights, 1)
    second = tiny_qwen2(seed=2)
    for room in range(0, DISK_SIZE, PAGE):
        with small_disk.room(room):
            try:
                path = publish_tiny(second, source, weights, 2)
                break
            except PublishFailed as failure:
                assert failure.errno == small_disk.errno, failure
                reason = os.strerror(small_disk.errno).lower()
                assert str(failure) == f"publishing policy v000002.t0002 failed: {reason} under {weights}"
                assert sorted(p.name for p in weights.iterdir()) == [published.name]
        assert_policy_intact(published, first)
    else:
        pytest.fail(f"policy v2 never fit in {DISK_SIZE} bytes")
    assert_policy_intact(path, second)
    # Where the writes stopped: (weights files written, index there, tokenizer there); safetensors removes a
    # weights file it could not finish. A full disk stops them in the config or any weights file, at the index
    # and at the tokenizer; a file size limit only in the two files larger than a weights file.
    weights_files = {f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)}
    stages = {(len(seen & weights_files), "model.safetensors.index.json" in seen, "tokenizer.json" in seen)
              for seen in removed_trees}
    every_stage = {(0, False, False), (1, False, False), (2, False, False), (3, False, False), (4, True, False),
                   (4, True, True)}
    assert stages == (every_stage if small_disk.counts_free_space else {(0, False, False), (4, True, True)})


def sharded_llama(seed: int):
    start_ranks("cpu")
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=16))
    scorer = shard_policy(lm)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-2)
    optimizer.zero_grad()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    logprobs, _ = scorer(ids, torch.ones_like(ids), torch.tensor([0.9]))
    (-logprobs.sum()).backward()
    optimizer.step()  # AdamW's moments exist: a checkpoint of its full size
    return scorer, optimizer


def assert_checkpoint_intact(checkpoints_dir: Path, name: str, expected: dict[str, torch.Tensor]) -> None:
    path = latest_checkpoint(checkpoints_dir)
    assert path.name == name
    scorer, optimizer = sharded_llama(seed=9)
    assert load_checkpoint(path, scorer, optimizer, torch.Generator())["next_step"] == int(name.split("-")[1])
    restored = full_state_dict(scorer)
    assert restored.keys() == expected.keys()
    for key in expected:
        assert torch.equal(restored[key], expected[key]), key


def test_a_checkpoint_that_cannot_fit_is_refused_before_any_write(small_disk):
    if not small_disk.counts_free_space:
        pytest.skip("needs a tmpfs (root): a file size limit has no free space to count")
    topology = start_ranks("cpu")
    scorer, optimizer = sharded_llama(seed=1)
    directory = small_disk.path / "checkpoints"
    save_checkpoint(directory, scorer, optimizer, {"next_step": 1}, torch.Generator(), topology)
    expected = full_state_dict(scorer)
    with small_disk.room(100 * 1024), pytest.raises(CheckpointFailed) as caught:
        save_checkpoint(directory, scorer, optimizer, {"next_step": 2}, torch.Generator(), topology)
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value).startswith(f"checkpoint step-000002 failed: no space left on device under {directory} "
                                        f"(needs at least ")
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-000001"]
    assert_checkpoint_intact(directory, "step-000001", expected)


def test_a_disk_that_fills_during_a_checkpoint_leaves_latest_on_the_previous_one_and_nothing_else(
        small_disk, monkeypatch, removed_trees):
    monkeypatch.setattr(disk, "free_bytes", lambda directory: 2**60)
    topology = start_ranks("cpu")
    scorer, optimizer = sharded_llama(seed=1)
    directory = small_disk.path / "checkpoints"
    save_checkpoint(directory, scorer, optimizer, {"next_step": 1}, torch.Generator(), topology)
    expected = full_state_dict(scorer)
    progress = {"next_step": 2, "pending_record": {"padding": "x" * 3 * PAGE}}  # the last file, several pages
    for room in range(0, DISK_SIZE, PAGE):
        with small_disk.room(room):
            try:
                save_checkpoint(directory, scorer, optimizer, progress, torch.Generator(), topology)
                break
            except CheckpointFailed as failure:
                reason = os.strerror(small_disk.errno).lower()
                assert failure.errno == small_disk.errno and str(failure) == \
                    f"checkpoint step-000002 failed: {reason} under {directory}", failure
                assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-000001"]
        assert_checkpoint_intact(directory, "step-000001", expected)
    else:
        pytest.fail(f"checkpoint step 2 never fit in {DISK_SIZE} bytes")
    assert latest_checkpoint(directory).name == "step-000002"
    # Where the writes stopped: (rank 0's files there, pointer there); the shard file is there from the start, and
    # safetensors removes the rng file it could not finish. A full disk stops them in the shard, in optimizer.json
    # or rng.safetensors, in progress.json and at the pointer; a file size limit only in the shard, the largest.
    main_files = {"optimizer.json", "rng.safetensors", "progress.json"}
    assert all(any(name.startswith("shard-") for name in seen) for seen in removed_trees)
    stages = {(len(seen & main_files), "latest.tmp" in seen) for seen in removed_trees}
    assert stages == ({(0, False), (1, False), (3, False), (3, True)} if small_disk.counts_free_space else
                      {(0, False)})


# ---- two ranks -----------------------------------------------------------------------------------------------

def run_rank(directory: Path) -> None:
    """One rank of two: checkpoint, fail on rank 1 (in its shards), fail on rank 0 (in progress.json), checkpoint."""
    topology = start_ranks("cpu", control_timeout_s=60)
    scorer, optimizer = sharded_llama(seed=1)
    save_checkpoint(directory, scorer, optimizer, {"next_step": 1}, torch.Generator(), topology)
    outcomes = []
    big = {"pending_record": {"padding": "x" * 2_000_000}}  # larger than any shard: it alone breaks the limit
    # Rank 1 may write no file past 4 KB (its shard is ~150 KB); rank 0 none past 1 MB (progress.json is 2 MB).
    for step, limited_rank, limit, extra in ((2, 1, PAGE, {}), (3, 0, 1_000_000, big)):
        try:
            with file_size_limit(limit if topology.rank == limited_rank else resource.RLIM_INFINITY):
                save_checkpoint(directory, scorer, optimizer, {"next_step": step, **extra}, torch.Generator(),
                                topology)
            outcomes.append("saved")
        except CheckpointFailed as failure:
            outcomes.append(str(failure))
        outcomes.append(latest_checkpoint(directory).name)
    save_checkpoint(directory, scorer, optimizer, {"next_step": 4}, torch.Generator(), topology)
    outcomes.append(latest_checkpoint(directory).name)
    print(json.dumps({"rank": topology.rank, "outcomes": outcomes}), flush=True)
    stop_ranks(topology)


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank_with_the_clear_error_and_none_waits(tmp_path):
    directory = tmp_path / "checkpoints"
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, __file__, str(directory)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    results = {}
    try:
        for rank, process in enumerate(ranks):
            out, err = process.communicate(timeout=240)
            assert process.returncode == 0, f"rank {rank} exited {process.returncode}:\n{err[-3000:]}"
            results[rank] = json.loads(out.strip().splitlines()[-1])["outcomes"]
    finally:
        for process in ranks:
            process.kill()
    too_large = os.strerror(errno.EFBIG).lower()
    shards, progress = (f"checkpoint step-00000{step} failed: {too_large} under {directory}" for step in (2, 3))
    # Rank 1's shard failed: DCP tells rank 0 why. Rank 0's progress.json failed: rank 1 is told which rank.
    assert results[0] == [shards, "step-000001", progress, "step-000001", "step-000004"]
    assert results[1] == [shards, "step-000001", f"{progress} (on rank 0)", "step-000001", "step-000004"]
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-000001", "step-000004"]


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
