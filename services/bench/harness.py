"""A stand-in trainer for the system benchmarks, and small readers of the services' HTTP faces.

The generation and weight-sync benchmarks run the real reward service,
scheduler and generation replicas (launcher.start_stack with trainer=False)
and drive them from the benchmark process over the trainer's own gRPC calls:
StreamBatch to learn when a step's last group is in, ReportStep to plan the
next step (and, for weight sync, to announce a new policy version). Nothing
is trained, so what is timed is the services' work alone.
"""

from __future__ import annotations

import re
import time

import grpc
import httpx

from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from services.common.auth import call_metadata


class NullTrainer:
    """Pulls batches and reports steps like the trainer, without training."""

    def __init__(self, scheduler_address: str, token: str | None = None) -> None:
        self.channel = grpc.insecure_channel(
            scheduler_address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        self.stub = pb_grpc.SchedulerStub(self.channel)
        self.metadata = call_metadata(token)
        self._epoch = 0  # the trainer epoch, taken at the first call (RegisterTrainer)

    def epoch(self) -> int:
        """This harness's trainer epoch, registering (and superseding any other trainer) on first use."""
        while not self._epoch:
            try:
                self._epoch = self.stub.RegisterTrainer(pb.TrainerRegistration(trainer_id="bench"),
                                                        metadata=self.metadata, timeout=60).epoch
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.05)  # the scheduler is still starting
        return self._epoch

    def wait_batch(self, step: int, timeout_s: float = 600.0) -> tuple[list, float]:
        """The step's groups, and the perf_counter time its first chunk arrived (the step was then complete)."""
        deadline = time.monotonic() + timeout_s
        while True:
            request = pb.BatchRequest(trainer_id="bench", trainer_epoch=self.epoch(), step=step, wait_s=5.0,
                                      max_groups_per_chunk=256)
            try:
                groups, first = [], None
                for chunk in self.stub.StreamBatch(request, metadata=self.metadata, timeout=60):
                    first = first or time.perf_counter()
                    groups.extend(chunk.groups)
                return groups, first
            except grpc.RpcError as exc:
                # UNAVAILABLE: the step is not complete yet (or the scheduler is starting); ask again.
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def report(self, step: int, version: int, weights_path: str = "") -> pb.StepAck:
        # Entropy is required to be positive; with temperature control off it moves nothing.
        return self.stub.ReportStep(pb.StepReport(trainer_id="bench", trainer_epoch=self.epoch(), step=step, entropy=1.0, loss=0.0,
                                                  new_policy_version=version, weights_path=weights_path),
                                    metadata=self.metadata, timeout=60)

    def close(self) -> None:
        self.channel.close()


def response_tokens(groups) -> int:
    return sum(len(s.response_token_ids) for g in groups for s in g.samples)


def metric_value(text: str, name: str) -> float:
    """Sum of all samples of one Prometheus series name in an exposition text (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match:
            total += float(match.group(2))
    return total


def scrape(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()
    return response.text


def replica_version(url: str) -> int | None:
    """The policy version a replica serves, from its /readyz body (answered whether ready or not)."""
    try:
        return httpx.get(f"{url}/readyz", timeout=2).json().get("policy_version")
    except (httpx.HTTPError, ValueError):
        return None
