"""Where the trainer's ranks run and how they agree: device, process groups, small collectives.

The trainer is always a torch.distributed job, of one rank or of N. Under
`torchrun` the ranks find each other through its environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); started as a plain process it is
a job of one rank with an in-memory store. One code path (FSDP2, sharded
checkpoints) serves both, so what the 1-rank tests prove holds for N.

Two process groups:
- the default group, on NCCL for CUDA and gloo on the CPU, carries FSDP's
  all-gathers and reduce-scatters;
- a gloo control group carries the orders rank 0 hands out (the next step's
  batch) and the few numbers the ranks sum. Rank 0 may wait minutes for
  generation to finish a step while the others wait for its order; on gloo
  that wait is bounded by `control_timeout_s`, not by NCCL's watchdog.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """trainer.device names a device this machine does not have."""


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: object = None  # the gloo process group for orders and sums

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for cuda (auto: when CUDA is there), else the CPU."""
    if setting not in DEVICES:
        raise DeviceError(f"trainer.device must be one of {DEVICES}, got {setting!r}")
    cuda = torch.cuda.is_available()
    if setting == "cuda" and not cuda:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
        raise DeviceError(f"trainer.device is cuda but this machine has no usable GPU "
                          f"(torch {torch.__version__}, built with {build}); set trainer.device to cpu or auto")
    if setting == "cpu" or not cuda:
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise DeviceError(f"rank with LOCAL_RANK {local_rank} needs GPU {local_rank}, but only "
                          f"{torch.cuda.device_count()} are visible; start torchrun with --nproc-per-node=gpu")
    return torch.device("cuda", local_rank)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DeviceError(f"environment variable {name} must be an integer, got {value!r}") from None


def start_ranks(device_setting: str, control_timeout_s: float = 6 * 3600) -> Topology:
    """Join (or, alone, create) the job's process groups; idempotent within one process."""
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:  # torchrun's rendezvous
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=control_timeout_s))
        else:
            # A plain process: a job of one rank, no network rendezvous.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=control_timeout_s))
    elif dist.get_backend() != backend:
        raise DeviceError(f"this process already runs torch.distributed on {dist.get_backend()}, "
                          f"but trainer.device {device_setting!r} needs {backend}")
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=control_timeout_s)) if backend != "gloo" else None
    return Topology(dist.get_rank(), dist.get_world_size(), local_rank, device, control)


def broadcast_from_main(value, topology: Topology):
    """Rank 0's `value` (plain JSON data) on every rank, over the control group.

    JSON, not broadcast_object_list: what arrives from another machine is
    never unpickled.
    """
    if topology.world_size == 1:
        return value
    payload = json.dumps(value).encode() if topology.is_main else b""
    size = torch.tensor([len(payload)], dtype=torch.int64)
    dist.broadcast(size, src=0, group=topology.control)
    buffer = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if topology.is_main
              else torch.empty(int(size), dtype=torch.uint8))
    dist.broadcast(buffer, src=0, group=topology.control)
    return value if topology.is_main else json.loads(buffer.numpy().tobytes())


def sum_over_ranks(values: list[float], topology: Topology | None) -> list[float]:
    """Element-wise sum of every rank's `values` (float64, over the control group)."""
    if topology is None or topology.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, group=topology.control)
    return tensor.tolist()


def max_over_ranks(values: list[float], topology: Topology | None) -> list[float]:
    if topology is None or topology.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=topology.control)
    return tensor.tolist()


def sum_tensor_over_ranks(tensor: torch.Tensor, topology: Topology | None) -> torch.Tensor:
    """`tensor` (on the CPU) summed over the ranks, in place; each rank filled its own rows, zeros elsewhere."""
    if topology is not None and topology.world_size > 1:
        dist.all_reduce(tensor, group=topology.control)
    return tensor


def barrier(topology: Topology) -> None:
    if topology.world_size > 1:
        dist.barrier(group=topology.control)


def stop_ranks(topology: Topology) -> None:
    """Leave the job together: a last barrier, then the process groups torn down on every rank.

    A rank that exits while another still talks to it (or to the store rank 0
    hosts) can die in gloo's threads at interpreter exit ("terminate called
    without an active exception", SIGABRT) although its work was done.
    """
    if dist.is_initialized():
        barrier(topology)
        dist.destroy_process_group()


def split_by_tokens(lengths: torch.Tensor, index: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """The samples at `index`, dealt to `world_size` ranks so each gets about the same number of tokens.

    Longest first, each to the rank with the fewest tokens so far (ties: the
    lowest rank), so every rank computes the same split from the same batch.
    A rank may get no sample when there are fewer samples than ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    order = torch.sort(lengths[index], descending=True, stable=True).indices
    for position in order.tolist():
        sample = int(index[position])
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(sample)
        loads[rank] += int(lengths[sample])
    return [torch.tensor(sorted(share), dtype=torch.long) for share in shares]
