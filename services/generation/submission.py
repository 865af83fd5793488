"""A sampled and scored group: built into the GroupResult the scheduler checks, and submitted.

A submission is retried while the scheduler is unreachable (retry_policy),
until the next wait would pass the lease's deadline, which the caller reads
again before every wait (the current, renewed expiry less a margin). A
lease the heartbeat found lost is not submitted: it would be refused or
counted as a duplicate. Refusals are logged and the group dropped; its task
goes back to the queue when its lease expires.
"""

from __future__ import annotations

import logging
from typing import Callable

import grpc

from e3.contracts import e3_pb2 as pb
from e3.retry import retry_async
from services.generation.engine import Completion
from services.generation.heartbeat import LeaseKeeper
from services.generation.retry_policy import FIRST_DELAY_S, MAX_DELAY_S, retryable_rpc

log = logging.getLogger(__name__)


def build_group(task: pb.RolloutTask, replica_id: str, completions: list[Completion], verdicts: list[dict],
                version: int, generate_s: float, score_s: float) -> pb.GroupResult:
    return pb.GroupResult(
        task_id=task.task_id,
        lease_id=task.lease_id,
        replica_id=replica_id,
        policy_version=version,  # the version that sampled it, equal to the task's
        temperature=task.temperature,  # echoed exactly; the scheduler compares it
        samples=[
            pb.Sample(
                prompt_token_ids=c.prompt_token_ids,
                response_token_ids=c.response_token_ids,
                response_logprobs=c.response_logprobs,
                text=c.text,
                reward=float(v["reward"]),
                reward_reason=v.get("reason") or "",
                finish_reason=c.finish_reason,
            )
            for c, v in zip(completions, verdicts)
        ],
        generate_s=generate_s,
        score_s=score_s,
    )


async def submit_group(stub, metadata, leases: LeaseKeeper, group: pb.GroupResult, deadline: Callable[[], float],
                       timeout_s: float) -> None:
    """Submit one group; every outcome but a retry is logged here, none is raised."""

    async def attempt() -> pb.SubmitReply | None:
        if leases.lost(group.task_id):
            return None  # checked before every try: a renewal may have found it lost meanwhile
        return await stub.SubmitGroup(group, metadata=metadata, timeout=timeout_s)

    def retrying(exc: BaseException, delay: float) -> None:
        log.warning("SubmitGroup %s: %s; retrying in %.2fs", group.task_id, exc.code().name, delay)

    try:
        reply = await retry_async(attempt, retryable_rpc, first_delay_s=FIRST_DELAY_S, max_delay_s=MAX_DELAY_S,
                                  deadline=deadline, on_retry=retrying)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            # The policy moved on; the next lease reply names the new weights and we load them.
            log.warning("group %s refused as stale, dropped: %s", group.task_id, exc.details())
        elif code == grpc.StatusCode.NOT_FOUND:
            log.warning("group %s dropped: %s", group.task_id, exc.details())
        else:
            log.error("SubmitGroup %s failed, group dropped: %s %s", group.task_id, code.name, exc.details())
        return
    if reply is None:
        log.warning("group %s not submitted: its lease was lost", group.task_id)
    elif reply.duplicate:
        log.info("group %s was already submitted (duplicate)", group.task_id)
