"""The lease heartbeat: a replica renews the leases it is still working on.

A lease lasts `scheduler.lease_s`; a long rollout (thousands of tokens on a
real model) takes longer. LeaseKeeper renews every lease the replica holds
with one RenewLeases call whenever a third of the earliest lease's remaining
time has passed, so a lease whose replica is alive never expires, while a
dead replica's leases still run out after at most `lease_s` and its tasks go
to another replica. Leases the scheduler reports lost (they expired, were
released, or their task was finished elsewhere) are remembered so that their
groups are not submitted: they would be refused or counted as duplicates.
A renewal that fails (the scheduler is down) is retried on the same
schedule, ever more often as the expiry comes closer: the opposite of a
back-off (e3.retry), on purpose, since the last chance is the one before
the expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Iterable

import grpc

from e3.contracts import e3_pb2 as pb

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.25  # the shortest wait between two renewals (near an expiry, or while the scheduler is down)


class LeaseKeeper:
    """Renews held leases in the background; `run` is the loop, started once per replica."""

    def __init__(self, stub, replica_id: str, metadata, rpc_timeout_s: float = 30.0) -> None:
        self.stub, self.replica_id, self.metadata, self.rpc_timeout_s = stub, replica_id, metadata, rpc_timeout_s
        self._held: dict[str, tuple[str, float]] = {}  # task id -> (lease id, expiry in unix seconds)
        self._tasks: dict[str, pb.RolloutTask] = {}  # the held tasks themselves, to hand back
        self._lost: set[str] = set()
        self._changed = asyncio.Event()
        self.renewals = 0  # RenewLeases calls answered
        self.enabled = True  # False once the scheduler answers that it has no RenewLeases

    def hold(self, tasks: Iterable[pb.RolloutTask]) -> None:
        """Start renewing these leased tasks."""
        for task in tasks:
            self._held[task.task_id] = (task.lease_id, task.lease_expires_at)
            self._tasks[task.task_id] = task
            self._lost.discard(task.task_id)
        self._changed.set()

    def release(self, task_ids: Iterable[str]) -> None:
        """Stop renewing these tasks (submitted, reported failed, or given up)."""
        for task_id in task_ids:
            self._held.pop(task_id, None)
            self._tasks.pop(task_id, None)
            self._lost.discard(task_id)

    def held(self) -> list[pb.RolloutTask]:
        """The tasks held and not lost, as leased (a lease this replica must hand back if it cannot finish it)."""
        return [self._tasks[t] for t in self._held if t not in self._lost]

    def lost(self, task_id: str) -> bool:
        """True if the scheduler said this replica no longer holds the task's lease."""
        return task_id in self._lost

    def expiry(self, task_ids: Iterable[str]) -> float | None:
        """The earliest current expiry of these tasks' leases; None if none is held."""
        expiries = [self._held[t][1] for t in task_ids if t in self._held and t not in self._lost]
        return min(expiries) if expiries else None

    async def run(self) -> None:
        """Renew until cancelled."""
        due = None  # when the next renewal is due; kept across new leases, so they never postpone it
        while self.enabled:
            live = [expiry for task_id, (_, expiry) in self._held.items() if task_id not in self._lost]
            if not live:
                due = None
                self._changed.clear()
                await self._changed.wait()
                continue
            now = time.time()
            candidate = now + max((min(live) - now) / 3, MIN_INTERVAL_S)
            due = candidate if due is None else min(due, candidate)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=max(due - now, 0.0))
                continue  # leases were held or released: look again, with the same due time
            except asyncio.TimeoutError:
                pass
            await self.renew_now()
            due = None

    async def renew_now(self) -> None:
        """One RenewLeases call for every lease held and not lost."""
        held = {t: lease for t, (lease, _) in self._held.items() if t not in self._lost}
        if not held:
            return
        request = pb.RenewRequest(replica_id=self.replica_id,
                                  leases=[pb.LeaseRef(task_id=t, lease_id=lease) for t, lease in held.items()])
        try:
            reply = await self.stub.RenewLeases(request, metadata=self.metadata, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # An older scheduler: leases last lease_s, as before the heartbeat.
                log.error("the scheduler has no RenewLeases; leases will not be renewed")
                self.enabled = False
                return
            log.warning("RenewLeases for %d leases: %s (%s); retrying", len(held), exc.code().name, exc.details())
            return
        self.renewals += 1
        for task_id in reply.renewed_task_ids:
            # Only a lease still held under the id that was renewed takes the new expiry.
            if task_id in self._held and self._held[task_id][0] == held.get(task_id):
                self._held[task_id] = (held[task_id], reply.lease_expires_at)
        lost = [t for t in reply.lost_task_ids if t in self._held and self._held[t][0] == held.get(t)]
        if lost:
            log.warning("leases of tasks %s are lost (expired or finished elsewhere); their groups will not be submitted",
                        lost)
            self._lost.update(lost)
