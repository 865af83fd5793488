"""The scheduler's gRPC face: checks each message, converts it, calls the engine.

Status codes: a refused token is UNAUTHENTICATED (services.common.auth), bytes
that are not the request message INVALID_ARGUMENT (services.common.grpc_guard),
a message over the size limit RESOURCE_EXHAUSTED (grpcio), a bad field
INVALID_ARGUMENT, an unknown task NOT_FOUND, a stale policy version or an
out-of-order step FAILED_PRECONDITION, and a store that cannot be reached
UNAVAILABLE (clients retry that one). Every refusal says what was wrong.
"""

from __future__ import annotations

import math
from concurrent import futures

import grpc

from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.store import StoreUnavailable
from e3.tasks.prompts import chat_messages
from services.common.auth import BearerTokenInterceptor
from services.common.grpc_guard import MalformedRequestGuard
from services.scheduler.engine import SchedulerEngine, SchedulerError, StepReport, SubmittedSample, Submission
from services.scheduler.failures import TaskFailureReport

STATUS = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_LEASE = 4096
MAX_WAIT_S = 600.0
MAX_RENEW = 16 * MAX_LEASE  # leases one RenewLeases call may name: every lease in flight on a replica


def _require(condition: bool, message: str, context: grpc.ServicerContext) -> None:
    if not condition:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


class SchedulerServicer(pb_grpc.SchedulerServicer):
    def __init__(self, engine: SchedulerEngine) -> None:
        self.engine = engine
        self.prompt_template = engine.config.data.template()

    def _call(self, context, fn, *args):
        try:
            return fn(*args)
        except SchedulerError as exc:
            context.abort(STATUS[exc.code], str(exc))
        except StoreUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the scheduler's store is unavailable, retry: {exc}")

    def LeaseTasks(self, request: pb.LeaseRequest, context) -> pb.LeaseReply:
        _require(bool(request.replica_id), "replica_id must be non-empty", context)
        _require(1 <= request.max_tasks <= MAX_LEASE, f"max_tasks must be in [1, {MAX_LEASE}], got {request.max_tasks}", context)
        _require(math.isfinite(request.wait_s) and 0 <= request.wait_s <= MAX_WAIT_S,
                 f"wait_s must be in [0, {MAX_WAIT_S:g}] seconds, got {request.wait_s}", context)
        result = self._call(context, self.engine.lease, request.replica_id, request.max_tasks, request.wait_s)
        reply = pb.LeaseReply(
            policy_version=result.policy_version,
            weights_path=result.weights_path,
            retry_after_s=result.retry_after_s,
            finished=result.finished,
        )
        for leased in result.tasks:
            r, q = leased.record, leased.question
            reply.tasks.append(
                pb.RolloutTask(
                    task_id=r.task_id, lease_id=r.lease_id, step=r.step, question_id=r.question_id,
                    prompt=q.prompt, verifier=q.verifier, ground_truth=q.answer, num_samples=r.num_samples,
                    temperature=r.temperature, policy_version=r.policy_version,
                    lease_expires_at=r.lease_expires_at, max_tokens=leased.max_tokens,
                    messages=[pb.ChatMessage(**m) for m in chat_messages(q, self.prompt_template)],
                )
            )
        return reply

    def SubmitGroup(self, request: pb.GroupResult, context) -> pb.SubmitReply:
        _require(bool(request.task_id), "task_id must be non-empty", context)
        _require(bool(request.replica_id), "replica_id must be non-empty", context)
        _require(len(request.samples) > 0, "samples must not be empty", context)
        _require(math.isfinite(request.temperature) and request.temperature > 0,
                 f"temperature must be a positive number, got {request.temperature}", context)
        submission = Submission(
            task_id=request.task_id,
            lease_id=request.lease_id,
            replica_id=request.replica_id,
            policy_version=request.policy_version,
            temperature=request.temperature,
            samples=[
                SubmittedSample(
                    prompt_token_ids=list(s.prompt_token_ids), response_token_ids=list(s.response_token_ids),
                    response_logprobs=list(s.response_logprobs), text=s.text, reward=s.reward,
                    reward_reason=s.reward_reason, finish_reason=s.finish_reason,
                )
                for s in request.samples
            ],
            generate_s=request.generate_s,
            score_s=request.score_s,
        )
        outcome, done, total = self._call(context, self.engine.submit, submission)
        return pb.SubmitReply(
            accepted=outcome.value == "accepted", duplicate=outcome.value == "duplicate",
            step_groups_done=done, step_groups_total=total,
        )

    def StreamBatch(self, request: pb.BatchRequest, context):
        _require(0 <= request.wait_s <= MAX_WAIT_S, f"wait_s must be in [0, {MAX_WAIT_S}], got {request.wait_s}", context)
        per_chunk = request.max_groups_per_chunk or 64
        batch = self._call(context, self.engine.wait_for_batch, request.step, request.wait_s)
        groups = batch["groups"]
        for start in range(0, max(len(groups), 1), per_chunk):
            chunk = pb.BatchChunk(
                step=batch["step"], policy_version=batch["policy_version"], temperature=batch["temperature"],
                total_groups=len(groups), last=start + per_chunk >= len(groups),
                validation=batch.get("validation", {}) if start == 0 else {},
            )
            for g in groups[start:start + per_chunk]:
                chunk.groups.append(
                    pb.Group(
                        task_id=g["task_id"], question_id=g["question_id"], temperature=g["temperature"],
                        policy_version=g["policy_version"], level=g.get("level", 0),
                        replica_id=g.get("replica_id", ""),
                        samples=[pb.Sample(**s) for s in g["samples"]],
                    )
                )
            if chunk.last:
                chunk.failed_tasks.extend(pb.FailedTask(**f) for f in batch.get("failed_tasks", []))
            yield chunk

    def RenewLeases(self, request: pb.RenewRequest, context) -> pb.RenewReply:
        _require(bool(request.replica_id), "replica_id must be non-empty", context)
        _require(len(request.leases) <= MAX_RENEW, f"leases must name at most {MAX_RENEW}, got {len(request.leases)}", context)
        for i, ref in enumerate(request.leases):
            _require(bool(ref.task_id) and bool(ref.lease_id), f"leases[{i}] needs a task_id and a lease_id", context)
        leases = [(ref.task_id, ref.lease_id) for ref in request.leases]
        result = self._call(context, self.engine.renew, request.replica_id, leases)
        return pb.RenewReply(renewed_task_ids=result.renewed, lost_task_ids=result.lost,
                             lease_expires_at=result.expires_at)

    def ReportTaskFailure(self, request: pb.TaskFailure, context) -> pb.TaskFailureAck:
        failure = TaskFailureReport(task_id=request.task_id, lease_id=request.lease_id, replica_id=request.replica_id,
                                    reason=request.reason, detail=request.detail)
        result = self._call(context, self.engine.report_failure, failure)
        return pb.TaskFailureAck(outcome=result.outcome.value, failures=result.failures)

    def ReportStep(self, request: pb.StepReport, context) -> pb.StepAck:
        _require(math.isfinite(request.entropy), "entropy must be finite", context)
        _require(math.isfinite(request.loss) or request.skipped, "loss must be finite unless the step was skipped", context)
        for key, value in request.metrics.items():
            _require(math.isfinite(value), f"metrics[{key!r}] must be finite", context)
        report = StepReport(
            step=request.step, entropy=request.entropy, new_policy_version=request.new_policy_version,
            weights_path=request.weights_path, loss=request.loss, skipped=request.skipped,
            metrics=dict(request.metrics),
        )
        ack = self._call(context, self.engine.report, report)
        return pb.StepAck(**ack)


def start_grpc_server(
    engine: SchedulerEngine, host: str, port: int, token: str | None, workers: int = 16,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the port it bound (port 0 picks a free one)."""
    # The token check runs first, so an unauthenticated caller learns nothing about its message.
    interceptors = ([BearerTokenInterceptor(token)] if token else []) + [MalformedRequestGuard()]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    pb_grpc.add_SchedulerServicer_to_server(SchedulerServicer(engine), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"scheduler could not bind gRPC on {host}:{port}")
    server.start()
    return server, bound
