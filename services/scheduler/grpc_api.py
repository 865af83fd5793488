"""The scheduler's gRPC face: checks each message, converts it, calls the engine.

Status codes: a missing or unknown token is UNAUTHENTICATED and another role's
token PERMISSION_DENIED (services.common.auth), bytes
that are not the request message INVALID_ARGUMENT (services.common.grpc_guard),
a message over the size limit RESOURCE_EXHAUSTED (grpcio; for a batch group
too big for one message the scheduler says so first, naming its task), a bad field
INVALID_ARGUMENT, an unknown task NOT_FOUND, a stale policy version or an
out-of-order step FAILED_PRECONDITION, and a store that cannot be reached
UNAVAILABLE (clients retry that one). Every refusal says what was wrong.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent import futures

import grpc

from e3.config import TLSConfig
from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.store import StoreFenced, StoreUnavailable
from e3.tasks.prompts import chat_messages
from services.common.auth import RoleInterceptor, RoleTokens, is_loopback, weights_path_problem
from services.common.grpc_guard import MalformedRequestGuard
from services.common.tls import grpc_server_credentials
from services.common import limits
from services.common.limits import LimitExceeded
from services.scheduler.chunks import DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_GROUPS_PER_CHUNK, TooLarge, batch_chunks
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
BATCH_WAIT_SLICE_S = 0.5  # a waiting StreamBatch looks at cancellation and shutdown this often


def _within(context: grpc.ServicerContext, *checks) -> None:
    """Run limit checks (services.common.limits); the first one exceeded is INVALID_ARGUMENT."""
    try:
        for check, *args in checks:
            check(*args)
    except LimitExceeded as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _require(condition: bool, message: str, context: grpc.ServicerContext) -> None:
    if not condition:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


class SchedulerServicer(pb_grpc.SchedulerServicer):
    def __init__(self, engine: SchedulerEngine, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 stopping: threading.Event | None = None) -> None:
        self.engine = engine
        self.max_message_bytes = max_message_bytes  # the server's send and receive limit
        self.prompt_template = engine.config.data.template()
        # Long StreamBatch waits hold a gRPC thread each: at most MAX_BATCH_WAITERS wait at
        # once, so leases and reports always find a thread; the others are answered at once.
        self._batch_waiters = threading.BoundedSemaphore(limits.MAX_BATCH_WAITERS)
        self.stopping = stopping or threading.Event()  # set: waiting calls return now

    def _call(self, context, fn, *args):
        try:
            return fn(*args)
        except StoreFenced as exc:
            self.engine.halt(str(exc))
            _abort(context, exc)
        except (SchedulerError, StoreUnavailable) as exc:
            _abort(context, exc)

    def RegisterTrainer(self, request: pb.TrainerRegistration, context) -> pb.TrainerEpoch:
        _within(context, (limits.check_bytes, "trainer_id", request.trainer_id, limits.MAX_ID_BYTES))
        _require(bool(request.trainer_id), "trainer_id must be non-empty", context)
        return pb.TrainerEpoch(epoch=self._call(context, self.engine.register_trainer, request.trainer_id,
                                                request.epoch))

    def LeaseTasks(self, request: pb.LeaseRequest, context) -> pb.LeaseReply:
        _within(context, (limits.check_id, "replica_id", request.replica_id))
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
        _within(context, *_group_limits(request))
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
        _require(request.max_chunk_bytes <= self.max_message_bytes,
                 f"max_chunk_bytes must be at most the scheduler's gRPC message limit of {self.max_message_bytes} "
                 f"bytes, got {request.max_chunk_bytes}", context)
        _within(context, (limits.check_bytes, "trainer_id", request.trainer_id, limits.MAX_ID_BYTES))
        batch = self._wait_for_batch(request.step, request.wait_s, request.trainer_epoch, context)
        try:
            chunks = batch_chunks(batch, request.max_chunk_bytes or DEFAULT_MAX_CHUNK_BYTES,
                                  request.max_groups_per_chunk or DEFAULT_MAX_GROUPS_PER_CHUNK, self.max_message_bytes)
        except TooLarge as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"step {request.step}: {exc}")
        yield from chunks

    def _wait_for_batch(self, step: int, wait_s: float, epoch: int, context) -> dict:
        """The engine's batch of `step`, waited for in slices so that a cancelled call or a
        stopping server frees its thread within BATCH_WAIT_SLICE_S. Without a free waiter
        slot the call does not wait: it gets the batch if complete, else UNAVAILABLE at once."""
        if wait_s <= 0 or not self._batch_waiters.acquire(blocking=False):
            return self._call(context, self.engine.wait_for_batch, step, 0.0, epoch)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                remaining = deadline - time.monotonic()
                try:
                    return self.engine.wait_for_batch(step, max(min(remaining, BATCH_WAIT_SLICE_S), 0.0), epoch)
                except SchedulerError as exc:
                    if exc.code != "unavailable" or remaining <= BATCH_WAIT_SLICE_S or self.engine.halted:
                        _abort(context, exc)
                except StoreFenced as exc:
                    self.engine.halt(str(exc))
                    _abort(context, exc)
                except StoreUnavailable as exc:
                    _abort(context, exc)
                if self.stopping.is_set():
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the scheduler is stopping; ask again")
                if not context.is_active():
                    context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
        finally:
            self._batch_waiters.release()

    def RenewLeases(self, request: pb.RenewRequest, context) -> pb.RenewReply:
        _within(context, (limits.check_id, "replica_id", request.replica_id))
        _require(len(request.leases) <= MAX_RENEW, f"leases must name at most {MAX_RENEW}, got {len(request.leases)}", context)
        for i, ref in enumerate(request.leases):
            _require(bool(ref.task_id) and bool(ref.lease_id), f"leases[{i}] needs a task_id and a lease_id", context)
            _within(context, (limits.check_id, f"leases[{i}].task_id", ref.task_id),
                    (limits.check_id, f"leases[{i}].lease_id", ref.lease_id))
        leases = [(ref.task_id, ref.lease_id) for ref in request.leases]
        result = self._call(context, self.engine.renew, request.replica_id, leases)
        return pb.RenewReply(renewed_task_ids=result.renewed, lost_task_ids=result.lost,
                             lease_expires_at=result.expires_at)

    def ReportTaskFailure(self, request: pb.TaskFailure, context) -> pb.TaskFailureAck:
        _within(context, (limits.check_bytes, "reason", request.reason, limits.MAX_REASON_BYTES),
                (limits.check_bytes, "detail", request.detail, limits.MAX_DETAIL_BYTES))
        failure = TaskFailureReport(task_id=request.task_id, lease_id=request.lease_id, replica_id=request.replica_id,
                                    reason=request.reason, detail=request.detail)
        result = self._call(context, self.engine.report_failure, failure)
        return pb.TaskFailureAck(outcome=result.outcome.value, failures=result.failures)

    def ReportStep(self, request: pb.StepReport, context) -> pb.StepAck:
        _require(math.isfinite(request.entropy), "entropy must be finite", context)
        _require(math.isfinite(request.loss) or request.skipped, "loss must be finite unless the step was skipped", context)
        _within(context, (limits.check_bytes, "trainer_id", request.trainer_id, limits.MAX_ID_BYTES),
                (limits.check_bytes, "weights_path", request.weights_path, limits.MAX_PATH_BYTES),
                (limits.check_count, "metrics", len(request.metrics), limits.MAX_METRICS),
                *((limits.check_bytes, "metrics key", key, limits.MAX_ID_BYTES) for key in request.metrics))
        for key, value in request.metrics.items():
            _require(math.isfinite(value), f"metrics[{key!r}] must be finite", context)
        if request.weights_path:  # replicas load what this names: only the run's own weights directory
            problem = weights_path_problem(request.weights_path, self.engine.config.run_dir)
            if problem is not None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
        report = StepReport(
            step=request.step, entropy=request.entropy, new_policy_version=request.new_policy_version,
            weights_path=request.weights_path, loss=request.loss, skipped=request.skipped,
            metrics=dict(request.metrics), trainer_epoch=request.trainer_epoch,
        )
        ack = self._call(context, self.engine.report, report)
        return pb.StepAck(**ack)


def _abort(context: grpc.ServicerContext, exc: SchedulerError | StoreUnavailable | StoreFenced) -> None:
    if isinstance(exc, SchedulerError):
        context.abort(STATUS[exc.code], str(exc))
    if isinstance(exc, StoreFenced):  # the client retries, and reaches the scheduler that holds the run
        context.abort(grpc.StatusCode.UNAVAILABLE, f"this scheduler lost the run to another one: {exc}")
    context.abort(grpc.StatusCode.UNAVAILABLE, f"the scheduler's store is unavailable, retry: {exc}")


def _group_limits(request: pb.GroupResult):
    """The limit checks of a submitted group: its ids, its sample count, each sample's lists and text."""
    yield limits.check_id, "task_id", request.task_id
    yield limits.check_id, "replica_id", request.replica_id
    yield limits.check_bytes, "lease_id", request.lease_id, limits.MAX_ID_BYTES
    yield limits.check_count, "samples", len(request.samples), limits.MAX_SAMPLES_PER_GROUP
    for i, s in enumerate(request.samples):
        for name in ("prompt_token_ids", "response_token_ids", "response_logprobs"):
            yield limits.check_count, f"samples[{i}].{name}", len(getattr(s, name)), limits.MAX_TOKENS_PER_LIST
        yield limits.check_bytes, f"samples[{i}].text", s.text, limits.MAX_TEXT_BYTES
        yield limits.check_bytes, f"samples[{i}].reward_reason", s.reward_reason, limits.MAX_REASON_BYTES
        yield limits.check_bytes, f"samples[{i}].finish_reason", s.finish_reason, limits.MAX_REASON_BYTES


def start_grpc_server(
    engine: SchedulerEngine, host: str, port: int, tokens: RoleTokens, workers: int = 16,
    max_message_bytes: int = MAX_MESSAGE_BYTES, stopping: threading.Event | None = None, tls: TLSConfig | None = None,
) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the port it bound (port 0 picks a free one).

    Setting `stopping` (before server.stop) makes waiting StreamBatch calls return at once."""
    # Access: a role without a token in `tokens` is open, so only on loopback; `tls` with a
    # certificate serves TLS (services.common.tls).
    if not isinstance(tokens, RoleTokens):
        raise TypeError(f"tokens must be a RoleTokens, got {type(tokens).__name__}")
    open_roles = [r for r in ("generation", "trainer") if getattr(tokens, r) is None]
    if open_roles and not is_loopback(host):
        raise ValueError(f"gRPC on {host}: no token for {', '.join(open_roles)}; open roles are for loopback only")
    # The role check runs first, so a caller without its role's token learns nothing about its message.
    interceptors = [RoleInterceptor(tokens), MalformedRequestGuard()]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    pb_grpc.add_SchedulerServicer_to_server(SchedulerServicer(engine, max_message_bytes, stopping), server)
    credentials = grpc_server_credentials(tls) if tls is not None else None
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"scheduler could not bind gRPC on {host}:{port}")
    server.start()
    return server, bound
