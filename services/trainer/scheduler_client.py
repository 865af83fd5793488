"""Rank 0's calls to the scheduler: register, pull a step's batch, report a step.

Retries what a restarting scheduler causes (UNAVAILABLE, DEADLINE_EXCEEDED)
and turns the scheduler's refusals into the trainer's terms: "run is
finished" ends the loop, "already trained" means the checkpoint lost steps,
"superseded" means a newer trainer registered and this one must stop
(TrainerSuperseded). Every batch and report carries the trainer epoch the
scheduler gave at registration.
"""

from __future__ import annotations

import logging
import time

import grpc

from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.config import AuthConfig, TLSConfig
from e3.retry import call_with_retry
from services.common.auth import call_metadata
from services.common.tls import grpc_channel
from services.trainer.empty_step import failed_task_dict

log = logging.getLogger("trainer")

FINISHED = "finished"  # pull_batch's answer when the scheduler says the run is over
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 4 * 1024 * 1024  # what one streamed chunk may hold; a group larger than this comes alone


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


class TrainerSuperseded(TrainingStopped):
    """A newer trainer registered with the scheduler: this one must not write or report anything more."""


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                                             grpc.StatusCode.DEADLINE_EXCEEDED)


def _superseded(exc: grpc.RpcError) -> bool:
    return exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "superseded" in (exc.details() or "")


def _incomplete(exc: grpc.RpcError) -> bool:
    details = exc.details() or ""
    return exc.code() == grpc.StatusCode.FAILED_PRECONDITION and ("is not complete" in details or "were planned" in details)


class SchedulerClient:
    def __init__(self, address: str, auth: AuthConfig, trainer_id: str, tls: TLSConfig | None = None) -> None:
        """Calls `address` with auth.trainer_token, over TLS when tls.ca_file is set (services.common.tls)."""
        self.trainer_id = trainer_id
        self.channel = grpc_channel(address, tls or TLSConfig(), options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.stub = pb_grpc.SchedulerStub(self.channel)
        self.metadata = call_metadata(auth.trainer_token)
        self.epoch = 0  # given by register()

    def register(self) -> int:
        """Take the run's next trainer epoch, superseding every older trainer; retried while the scheduler starts."""
        request = pb.TrainerRegistration(trainer_id=self.trainer_id)
        reply = call_with_retry(lambda: self.stub.RegisterTrainer(request, metadata=self.metadata, timeout=30),
                                _retryable, attempts=120, first_delay_s=0.1, max_delay_s=2.0)
        self.epoch = reply.epoch
        log.info("registered with the scheduler as trainer epoch %d", self.epoch)
        return self.epoch

    def still_current(self) -> bool:
        """Whether no newer trainer has registered; asked before each write to the run directory."""
        request = pb.TrainerRegistration(trainer_id=self.trainer_id, epoch=self.epoch)
        try:
            call_with_retry(lambda: self.stub.RegisterTrainer(request, metadata=self.metadata, timeout=30),
                            _retryable, attempts=60, first_delay_s=0.1, max_delay_s=2.0)
        except grpc.RpcError as exc:
            if _superseded(exc):
                log.error("%s", exc.details())
                return False
            raise
        return True

    def pull_batch(self, step: int, stop):
        """The step's groups as plain data (JSON-able), FINISHED, or None when `stop` is set first."""
        while not stop.is_set():
            request = pb.BatchRequest(trainer_id=self.trainer_id, trainer_epoch=self.epoch, step=step, wait_s=5.0,
                                      max_groups_per_chunk=64)
            if "max_chunk_bytes" in pb.BatchRequest.DESCRIPTOR.fields_by_name:
                request.max_chunk_bytes = CHUNK_BYTES
            try:
                groups, header, first_chunk_at, validation = [], None, None, {}
                for chunk in self.stub.StreamBatch(request, metadata=self.metadata, timeout=60):
                    # The scheduler streams only once the step is complete, so
                    # from the first chunk on the wait is pure transfer.
                    if first_chunk_at is None:
                        first_chunk_at = time.perf_counter()
                        validation = dict(chunk.validation)  # sent with the first chunk only
                    header = chunk
                    groups.extend(_group(g) for g in chunk.groups)
                if header is None or len(groups) != header.total_groups:
                    raise RuntimeError(f"step {step}: stream ended with {len(groups)} groups of {header and header.total_groups}")
                return {"step": header.step, "temperature": header.temperature, "policy_version": header.policy_version,
                        "groups": groups, "validation": validation, "transfer_s": time.perf_counter() - first_chunk_at,
                        # Sent with the last chunk: the step's tasks marked failed, with no group.
                        "failed_tasks": [failed_task_dict(f) for f in header.failed_tasks]}
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    stop.wait(0.05)
                    continue
                if _superseded(exc):
                    raise TrainerSuperseded(exc.details()) from exc
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "run is finished" in (exc.details() or ""):
                    log.info("step %d: %s", step, exc.details())
                    return FINISHED
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "already trained" in (exc.details() or ""):
                    raise TrainingStopped(
                        f"the checkpoint resumes at step {step}, but the scheduler says: {exc.details()}. The updates "
                        f"of the steps in between were reported but never checkpointed and are lost; keep "
                        f"training.checkpoint_every = 1 (the default) for restarts without loss"
                    ) from exc
                raise
        return None

    def send_report(self, report: dict) -> pb.StepAck:
        """Report a step; retried while the scheduler is unavailable, and while it says the step is incomplete.

        With validation_beside_training the batch came once the step's training
        tasks were in; its validation tasks may still be out, and the scheduler
        holds the report until they are in (retried here if that takes longer
        than its wait). Otherwise a
        step the trainer took whole can be incomplete again only if the
        scheduler's store lost acknowledged groups after the batch was sent
        (Redis restored from an older copy: docs/reliability.md). The lost
        tasks are sampled again and the report is adopted once they are in.
        """
        request = pb.StepReport(trainer_id=self.trainer_id, trainer_epoch=self.epoch, **report)
        warned = 0.0
        while True:
            try:
                return call_with_retry(lambda: self.stub.ReportStep(request, metadata=self.metadata, timeout=30),
                                       lambda exc: isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE,
                                       attempts=60, first_delay_s=0.1, max_delay_s=2.0)
            except grpc.RpcError as exc:
                if _superseded(exc):
                    raise TrainerSuperseded(exc.details()) from exc
                if not _incomplete(exc):
                    raise
                if "its validation still out" in (exc.details() or ""):
                    log.info("step %d: %s; asking again", report["step"], exc.details())  # slow validation, no loss
                    time.sleep(0.1)  # the scheduler itself waited for it; ask again
                    continue
                if time.monotonic() - warned > 30:
                    log.warning("step %d: the scheduler says %r after this trainer took the whole batch: its store "
                                "lost groups; waiting for them to be sampled again", report["step"], exc.details())
                    warned = time.monotonic()
                time.sleep(1.0)


def _group(g) -> dict:
    return {
        "question_id": g.question_id, "temperature": g.temperature, "level": g.level,
        "policy_version": g.policy_version, "replica_id": g.replica_id,
        "samples": [
            {"prompt_token_ids": list(s.prompt_token_ids), "response_token_ids": list(s.response_token_ids),
             "reward": s.reward, "finish_reason": s.finish_reason, "response_logprobs": list(s.response_logprobs)}
            for s in g.samples
        ],
    }
