"""The replica loop: lease tasks, sample them, score them, submit them, repeat.

Leases are pipelined: up to `leases_in_flight` leases are worked on at once,
so vLLM samples the next lease while the previous one is scored and
submitted, and its batch never drains between leases. Leasing is a long poll
(`lease_wait_s`): with no task ready the scheduler holds the call and answers
as soon as a step is planned, so a replica never sleeps through one. Each
lease's tasks are sampled concurrently (vLLM batches them), its completions
scored in one call to the reward service, and each group submitted on its own.
Weights change only between leases, with no lease being sampled, so every
group is sampled with one policy version.

While a lease is worked on, its heartbeat (services.generation.heartbeat)
renews it, so sampling, scoring and submitting take the time they need; the
retries of scoring and submitting stop at the lease's current expiry, which
only stops moving when renewals fail (the scheduler is unreachable), and a
lease the scheduler reports lost is not submitted. A task whose sampling
raised is reported (ReportTaskFailure: prompt_too_long when the prompt leaves
no room in the engine's context, else engine_error), so the scheduler
re-queues it at once or, after scheduler.max_task_failures reports, marks
it failed.

Nothing is lost when something fails: a group that is not submitted keeps
its lease until the lease expires (a dead replica renews nothing), and the
scheduler then hands the task out again. So the loop never retries past a
lease's expiry; it gives up, logs the reason, and moves on. Every retry
here is e3.retry's back-off.

A vLLM engine that dies (its engine core process gone) cannot be healed in
this process. A watch notices within ENGINE_CHECK_S (so does a sampling call
that fails); the replica then leases nothing more, cancels the work in
flight, reports every lease it holds (ReportTaskFailure, engine_error: the
tasks go back to the queue at once) and raises EngineDead, so that the
process exits non-zero and its orchestrator restarts it. /healthz fails
from the same moment (services.generation.http_api).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import httpx

from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.retry import backoff_delays, retry_async
from services.common.auth import call_metadata
from services.generation.engine import Completion, EngineDead, GenerationEngine
from services.generation.heartbeat import LeaseKeeper
from services.generation.metrics import GenerationMetrics, ReplicaState
from services.generation.retry_policy import FIRST_DELAY_S, MAX_DELAY_S, retryable_rpc
from services.generation.scoring import RewardClient, RewardError
from services.generation.submission import build_group, submit_group
from services.generation.task_failures import report_failure

log = logging.getLogger(__name__)

MAX_SYNC_DELAY_S = 60.0  # between leases while weights cannot be loaded
ENGINE_CHECK_S = 0.5  # how often the watch asks whether the engine is still alive
HAND_BACK_TIMEOUT_S = 5.0  # per failure report of a dead engine's leases: the exit must not wait long


@dataclass(frozen=True)
class WorkerSettings:
    replica_id: str
    max_tasks: int
    reward_url: str  # base URL; /v1/score is appended
    token: str | None = None
    rpc_timeout_s: float = 30.0
    # Give up retrying this long before the earliest lease of a batch expires,
    # so a late submission does not race the scheduler re-queueing the task.
    lease_margin_s: float = 1.0
    leases_in_flight: int = 2
    lease_wait_s: float = 2.0
    # One scoring call may take this long: a batch of long responses needs
    # time, and the heartbeat keeps its leases alive meanwhile.
    score_timeout_s: float = 600.0
    sampling_delay_s: float = 0.0  # fault.sampling_delay_s: each lease's sampling held back this long
    # training.max_async_level >= 1: a task planned under an older policy than the loaded one is
    # sampled with the loaded one (the scheduler takes it); 0: only tasks of the loaded version.
    samples_ahead: bool = False

    def can_sample(self, task_version: int, loaded_version: int | None) -> bool:
        if loaded_version is None:
            return False
        return task_version <= loaded_version if self.samples_ahead else task_version == loaded_version

    def __post_init__(self) -> None:
        if self.max_tasks < 1 or self.leases_in_flight < 1:
            raise ValueError(f"max_tasks ({self.max_tasks}) and leases_in_flight ({self.leases_in_flight}) must be >= 1")
        if not 0 <= self.lease_wait_s < self.rpc_timeout_s:
            raise ValueError(f"lease_wait_s must be in [0, rpc_timeout_s={self.rpc_timeout_s}), got {self.lease_wait_s}")


def task_messages(task: pb.RolloutTask) -> list[dict[str, str]]:
    """The chat messages a task asks to sample a reply to (the bare prompt from a scheduler that sends none)."""
    if task.messages:
        return [{"role": m.role, "content": m.content} for m in task.messages]
    return [{"role": "user", "content": task.prompt}]


class WeightsNotLoaded(Exception):
    """One attempt to load the scheduler's policy failed (sync_weights logged why)."""


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake at once when `stop` is set."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0.0))
    except asyncio.TimeoutError:
        pass


class SharedClock:
    """Splits wall time evenly among the activities running at each moment.

    Two leases sampling side by side for one second get half a second each,
    so the shares of a replica's leases add up to the wall time during which
    it was sampling at all (what the step-anatomy report divides up), never
    to more.
    """

    def __init__(self) -> None:
        self._shares: dict[int, float] = {}
        self._last = time.perf_counter()

    def _advance(self) -> None:
        now = time.perf_counter()
        if self._shares:
            each = (now - self._last) / len(self._shares)
            for key in self._shares:
                self._shares[key] += each
        self._last = now

    def start(self, key: int) -> None:
        self._advance()
        self._shares[key] = 0.0

    def stop(self, key: int) -> float:
        self._advance()
        return self._shares.pop(key)


class Replica:
    def __init__(
        self,
        engine: GenerationEngine,
        stub: pb_grpc.SchedulerStub,
        http: httpx.AsyncClient,
        settings: WorkerSettings,
        metrics: GenerationMetrics,
        state: ReplicaState,
    ) -> None:
        self.engine, self.stub, self.http = engine, stub, http
        self.settings, self.metrics, self.state = settings, metrics, state
        self.metadata = call_metadata(settings.token)
        self.rewards = RewardClient(http, settings.reward_url, settings.token, settings.score_timeout_s, metrics)
        self.sampling_clock, self.scoring_clock = SharedClock(), SharedClock()
        self._in_flight: set[asyncio.Task] = set()
        self.leases = LeaseKeeper(stub, settings.replica_id, self.metadata, settings.rpc_timeout_s)
        self.handed_back = 0  # leases reported back to the scheduler after the engine died

    async def run(self, stop: asyncio.Event) -> str:
        """Work until `stop` is set; returns "finished" if the run ended first, else "stopped".

        Raises EngineDead, after handing back every lease held, once the engine has died.
        """
        heartbeat = asyncio.create_task(self.leases.run(), name="lease-heartbeat")
        working = asyncio.create_task(self._work_until(stop), name="lease-loop")
        watch = asyncio.create_task(self._watch_engine(), name="engine-watch")
        try:
            await asyncio.wait({working, watch}, return_when=asyncio.FIRST_COMPLETED)
            failure = self.engine.failure()
            if failure is None:
                return working.result()  # "stopped" or "finished", or what went wrong
            await self._give_up_on_engine(working)
            raise EngineDead(failure)
        finally:
            for task in (working, watch, heartbeat):
                task.cancel()

    async def _work_until(self, stop: asyncio.Event) -> str:
        try:
            return await self._lease_loop(stop)
        finally:
            # Not interrupted by `stop`: a SIGTERM lets the leased groups finish and be submitted.
            await self._drain()

    async def _watch_engine(self) -> None:
        """Return once the engine has died (a lease that is only waiting would not notice)."""
        while self.engine.failure() is None:
            await asyncio.sleep(ENGINE_CHECK_S)

    async def _give_up_on_engine(self, working: asyncio.Task) -> None:
        """Stop all work and report every lease held: nothing more can be sampled here."""
        # Cancelled work keeps its leases held (_renewed_work) so that they are reported here.
        for task in [working, *self._in_flight]:
            task.cancel()
        for result in await asyncio.gather(working, *self._in_flight, return_exceptions=True):
            if isinstance(result, Exception) and not isinstance(result, EngineDead):
                log.warning("with the engine dead, work in hand also failed: %s: %s", type(result).__name__, result)
        self._in_flight.clear()
        held = self.leases.held()
        self.leases.release(t.task_id for t in held)
        failure = EngineDead(self.engine.failure())
        outcomes = await asyncio.gather(*(
            report_failure(self.stub, self.metadata, self.settings.replica_id, t, failure, HAND_BACK_TIMEOUT_S)
            for t in held))
        self.handed_back = sum(1 for o in outcomes if o != "unreported")

    async def _lease(self) -> pb.LeaseReply:
        return await self.stub.LeaseTasks(
            pb.LeaseRequest(
                replica_id=self.settings.replica_id,
                max_tasks=self.settings.max_tasks,
                policy_version=self.engine.loaded_version or 0,
                wait_s=self.settings.lease_wait_s,
            ),
            metadata=self.metadata,
            timeout=self.settings.rpc_timeout_s,
        )

    async def _lease_loop(self, stop: asyncio.Event) -> str:
        sync_delays = backoff_delays(FIRST_DELAY_S, MAX_SYNC_DELAY_S)

        def retrying(exc: BaseException, delay: float) -> None:
            log.warning("LeaseTasks: %s (%s); retrying in %.2fs", exc.code().name, exc.details(), delay)

        while not stop.is_set():
            self._reap()
            if self.engine.failure() is not None:
                raise EngineDead(self.engine.failure())  # lease nothing more; run() hands back what is held
            if len(self._in_flight) >= self.settings.leases_in_flight:
                await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                # Any code but these (a wrong token, a bad request) is raised: retrying cannot help.
                reply = await retry_async(self._lease, retryable_rpc, first_delay_s=FIRST_DELAY_S,
                                          max_delay_s=MAX_DELAY_S, stop=stop, on_retry=retrying)
            except grpc.aio.AioRpcError:
                if stop.is_set():
                    break  # stopped while the scheduler could not be reached
                raise
            if self.engine.failure() is not None:
                # Leased while the engine died: held, so that run() hands them back too.
                self.leases.hold(reply.tasks)
                raise EngineDead(self.engine.failure())
            self.state.scheduler_version = reply.policy_version
            self._publish_versions()
            if reply.policy_version != self.engine.loaded_version or reply.finished:
                # New weights load with nothing being sampled: finish the leases in hand first.
                await self._drain()
            if reply.finished:
                # Serve the final policy and stay up (a server under an
                # orchestrator must not exit by itself); SIGTERM ends it.
                if reply.policy_version != self.engine.loaded_version and reply.weights_path:
                    await self.sync_weights(reply)
                    self._publish_versions()
                log.info("the scheduler says the run is finished; idle on policy v%s until stopped", self.engine.loaded_version)
                await stop.wait()
                return "finished"
            if reply.policy_version != self.engine.loaded_version and not await self.sync_until_deadline(reply, stop):
                # The leased tasks, if any, expire and go back to the queue. Back
                # off, so that a replica that cannot load weights does not keep
                # leasing (and sitting on) tasks every second.
                await sleep_unless(stop, next(sync_delays))
                continue
            sync_delays = backoff_delays(FIRST_DELAY_S, MAX_SYNC_DELAY_S)
            if not reply.tasks:
                await sleep_unless(stop, reply.retry_after_s)
                continue
            task = asyncio.create_task(self._renewed_work(list(reply.tasks)), name=f"lease-{reply.tasks[0].lease_id}")
            self._in_flight.add(task)
        log.info("stopping on request; finishing %d leases in flight", len(self._in_flight))
        return "stopped"

    def _reap(self) -> None:
        """Forget finished leases; a lease that failed unexpectedly fails the replica."""
        for task in [t for t in self._in_flight if t.done()]:
            self._in_flight.discard(task)
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()

    async def _drain(self) -> None:
        while self._in_flight:
            await asyncio.wait(self._in_flight)
            self._reap()

    def _publish_versions(self) -> None:
        self.state.loaded_version = self.engine.loaded_version
        self.metrics.versions(self.engine.loaded_version, self.state.scheduler_version)

    async def sync_until_deadline(self, reply: pb.LeaseReply, stop: asyncio.Event) -> bool:
        """Load the reply's policy, retrying while the leased tasks can still be submitted."""
        deadline = min((t.lease_expires_at for t in reply.tasks), default=0.0) - self.settings.lease_margin_s

        async def attempt() -> None:
            if not await self.sync_weights(reply):
                raise WeightsNotLoaded()  # e.g. the weights directory is not visible on this machine yet

        try:
            await retry_async(attempt, lambda exc: isinstance(exc, WeightsNotLoaded), first_delay_s=FIRST_DELAY_S,
                              max_delay_s=MAX_DELAY_S, deadline=lambda: deadline, stop=stop)
        except WeightsNotLoaded:
            return False
        return True

    async def sync_weights(self, reply: pb.LeaseReply) -> bool:
        """Load the scheduler's policy version in place; False when that failed (EngineDead if the engine died)."""
        version, path = reply.policy_version, reply.weights_path
        if not path:
            log.error("the scheduler serves policy version %d but names no weights_path; cannot load it", version)
            return False
        try:
            seconds = await self.engine.update_weights(path, version)
        except Exception as exc:  # noqa: BLE001 - a bad directory must not kill the replica; the next lease retries
            if self.engine.failure() is not None:
                raise EngineDead(self.engine.failure()) from exc  # a dead engine, though, kills it
            log.exception("loading policy version %d from %s failed", version, path)
            return False
        finally:
            self._publish_versions()
        self.metrics.weight_sync(seconds)
        log.info("policy version %d from %s: generation paused %.3fs", version, path, seconds)
        return True

    async def _renewed_work(self, tasks: list[pb.RolloutTask]) -> None:
        """`work` on a lease, its tasks renewed by the heartbeat meanwhile (those it will
        sample: a task for another policy version is left to expire)."""
        held = [t.task_id for t in tasks if self.settings.can_sample(t.policy_version, self.engine.loaded_version)]
        self.leases.hold(t for t in tasks if t.task_id in held)
        try:
            await self.work(tasks)
        except BaseException:
            if self.engine.failure() is None:
                self.leases.release(held)
            # else: still held, for run() to hand back
            raise
        self.leases.release(held)

    async def _report_failure(self, task: pb.RolloutTask, exc: BaseException) -> None:
        # Reported, the task is no longer this replica's: stop renewing it first.
        self.leases.release([task.task_id])
        await report_failure(self.stub, self.metadata, self.settings.replica_id, task, exc, self.settings.rpc_timeout_s)

    def _deadline(self, task_ids: list[str], fallback: float) -> float:
        """When retries for these tasks must stop: their current (renewed) expiry less the margin."""
        expiry = self.leases.expiry(task_ids)
        return fallback if expiry is None else max(fallback, expiry - self.settings.lease_margin_s)

    async def work(self, tasks: list[pb.RolloutTask]) -> None:
        version = self.engine.loaded_version
        wrong = [t.task_id for t in tasks if not self.settings.can_sample(t.policy_version, version)]
        if wrong:
            # Sampling them would only earn a stale-version refusal.
            log.warning("tasks %s want a policy version other than %s; leaving them to expire", wrong, version)
        tasks = [t for t in tasks if self.settings.can_sample(t.policy_version, version)]
        key = id(tasks)
        self.sampling_clock.start(key)
        try:
            if self.settings.sampling_delay_s:  # fault injection: rollouts that outlast their lease
                await asyncio.sleep(self.settings.sampling_delay_s)
            results = await asyncio.gather(
                *(self.engine.sample(task_messages(t), t.num_samples, t.temperature, t.max_tokens) for t in tasks),
                return_exceptions=True,
            )
        finally:
            generate_s = self.sampling_clock.stop(key)
        if self.engine.failure() is not None and any(isinstance(r, BaseException) for r in results):
            # Not the tasks' fault: run() reports them all, once, as the dead engine's.
            raise EngineDead(self.engine.failure())
        sampled: list[tuple[pb.RolloutTask, list[Completion]]] = []
        for task, result in zip(tasks, results):
            if isinstance(result, BaseException):
                await self._report_failure(task, result)
            else:
                sampled.append((task, result))
        self.metrics.generated(sum(len(c.response_token_ids) for _, cs in sampled for c in cs), generate_s)
        if not sampled:
            return
        deadline = min(t.lease_expires_at for t, _ in sampled) - self.settings.lease_margin_s
        self.scoring_clock.start(key)
        try:
            verdicts = await self.score(sampled, deadline)
        except RewardError as exc:
            log.error("%s; not submitting %d groups, their leases will expire", exc, len(sampled))
            return
        finally:
            score_s = self.scoring_clock.stop(key)
        offset = 0
        submissions = []
        for task, completions in sampled:
            group_verdicts = verdicts[offset : offset + len(completions)]
            offset += len(completions)
            group = build_group(task, self.settings.replica_id, completions, group_verdicts, version, generate_s, score_s)
            submissions.append(submit_group(self.stub, self.metadata, self.leases, group,
                                            lambda t=group.task_id: self._deadline([t], deadline),
                                            self.settings.rpc_timeout_s))
        await asyncio.gather(*submissions)
        samples = sum(len(cs) for _, cs in sampled)
        log.info(
            "lease of %d tasks (policy version %s): %d samples in %.2fs, scored in %.2fs",
            len(sampled), version, samples, generate_s, score_s,
        )

    async def score(self, sampled: list[tuple[pb.RolloutTask, list[Completion]]], deadline: float) -> list[dict]:
        """Verdicts for every completion, in order; retried until `deadline` or, while the
        heartbeat renews their leases, their later expiry (services.generation.scoring)."""
        items = [
            {"verifier": task.verifier, "response": c.text, "ground_truth": task.ground_truth}
            for task, completions in sampled
            for c in completions
        ]
        task_ids = [task.task_id for task, _ in sampled]
        return await self.rewards.score(items, lambda: self._deadline(task_ids, deadline))
