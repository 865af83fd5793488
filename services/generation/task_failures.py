"""Reporting a task the replica could not sample (ReportTaskFailure), instead of letting its lease expire.

An expired lease re-queues the task; for a task that fails every time (a
prompt longer than the model's context) that is a loop with no error
anywhere. A report tells the scheduler why, and the scheduler marks the task
failed after `scheduler.max_task_failures` of them. A report that cannot be
delivered is logged and the lease left to expire, the behaviour before reports.
"""

from __future__ import annotations

import logging

import grpc

from e3.contracts import e3_pb2 as pb
from services.generation.engine import PromptTooLong

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 2000  # the scheduler's bound (services.scheduler.failures)


def failure_of(exc: BaseException) -> tuple[str, str]:
    """(reason code, detail) of an exception raised while sampling a task."""
    if isinstance(exc, PromptTooLong):
        return "prompt_too_long", str(exc)[:MAX_DETAIL_CHARS]
    return "engine_error", f"{type(exc).__name__}: {exc}"[:MAX_DETAIL_CHARS]


async def report_failure(stub, metadata, replica_id: str, task: pb.RolloutTask, exc: BaseException,
                         timeout_s: float) -> str:
    """Report one task's sampling failure; the scheduler's outcome, or "unreported"."""
    reason, detail = failure_of(exc)
    request = pb.TaskFailure(task_id=task.task_id, lease_id=task.lease_id, replica_id=replica_id,
                             reason=reason, detail=detail)
    try:
        ack = await stub.ReportTaskFailure(request, metadata=metadata, timeout=timeout_s)
    except grpc.aio.AioRpcError as rpc_error:
        log.error("task %s (question %s): sampling failed (%s: %s); reporting it failed too (%s %s), its lease "
                  "will expire", task.task_id, task.question_id, reason, detail, rpc_error.code().name,
                  rpc_error.details())
        return "unreported"
    log.error("task %s (question %s): sampling failed (%s: %s); reported, the scheduler %s it (failure %d)",
              task.task_id, task.question_id, reason, detail, ack.outcome, ack.failures)
    return ack.outcome
