"""The scheduler under load: hundreds of simulated replicas and a stand-in trainer against a real scheduler on Redis.

    python -m services.bench.scheduler_load [--quick] [--out bench/results]

A scheduler process (python -m services.scheduler, Redis store) is driven
over loopback gRPC by `replicas` simulated generation replicas, each an
asyncio task in this process with its own channel and TCP connection
(grpc.use_local_subchannel_pool; otherwise grpcio would share one), and by
a stand-in trainer thread (services.bench.harness.NullTrainer). A replica
does what services.generation.worker does, minus vLLM: lease up to
`max_tasks` tasks, "sample" for a random time drawn from
`generate_s` (renewing its leases every third of lease_s meanwhile, and not
submitting a lease the scheduler says it lost), submit each group, repeat;
with no task ready it sleeps the retry_after_s the scheduler suggests.
Replicas join at random times over the first `start_s` seconds (a
cluster's pods do not start in the same millisecond); after that the run
keeps them in step: all of them wait for each step's plan. Leases do not
long-poll (wait_s=0), so a lease's latency is the scheduler's response
time, queueing included, and never a wait the replica asked for. Some
replicas misbehave on purpose: `abandoners` drop their first lease (it must
expire and be redone), and every `resubmit_every`-th accepted group is
submitted a second time (it must be refused as a duplicate). The run has
`steps` steps of `batch` tasks; it ends when the trainer has reported the
last one and every replica was told the run is finished.

Measured, never assumed: per call, p50/p99 latency as the client saw it;
for StreamBatch, the call made once the step is complete (a replica got
the reply that completed it), so the figure is the transfer, not a wait.
Exactly-once is counted from the scheduler's plan (GET /v1/allocations/<s>:
question ids and rollout counts of s<s>-0 ...), the batches the trainer
received and the store's counters and statistics:
- lost: planned tasks of a trained step that its batch did not hold;
- duplicated: groups seen twice in batches, plus honest submissions (not
  the deliberate second copies) answered DUPLICATE, plus tasks accepted more
  than once;
and the store's rollout statistics must equal the rollouts trained. The
CPU each process used and the lag of this process's event loop are kept
beside the latencies, so that a slow figure can be told apart from a busy
client. Results: bench/results/scheduler_load.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
import httpx
import psutil
import redis
import yaml

from e3.contracts import e3_pb2 as pb
from e3.contracts import e3_pb2_grpc as pb_grpc
from e3.store import RedisStore
from services.bench.common import REPO, git_commit, shown_path, write_json, write_text
from services.bench.harness import NullTrainer
from services.bench.scheduler_speed import local_redis
from services.common.runtime import free_port

RPC_TIMEOUT_S = 30.0
LEASE_GOAL_P99_MS = 50.0  # issue 12: leases at 256 replicas
VOCAB_SIZE = 53
TRAIN_SIZE = 960  # arithmetic questions: about the most its train split holds with every level equally


@dataclass(frozen=True)
class LoadSettings:
    """One load configuration."""

    replicas: int = 256
    steps: int = 8
    batch: int = 512  # tasks planned per step
    max_tasks: int = 2  # per lease
    generate_s: tuple[float, float] = (1.0, 3.0)  # a lease's simulated sampling time, uniform in this range
    lease_s: float = 4.0
    start_s: float = 2.0  # replicas join at random times over the first start_s seconds, as started pods do
    abandoners: int = 4
    resubmit_every: int = 25  # of the groups accepted, over all replicas
    deadline_s: float = 300.0  # the run must finish within this

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.steps < 1 or self.batch < 1 or self.max_tasks < 1:
            raise ValueError(f"replicas, steps, batch and max_tasks must be >= 1: {self}")
        if self.start_s < 0 or self.lease_s <= 0:
            raise ValueError(f"start_s must be >= 0 and lease_s > 0, got {self.start_s} and {self.lease_s}")
        if not 0 <= self.generate_s[0] <= self.generate_s[1]:
            raise ValueError(f"generate_s must be (low, high) with 0 <= low <= high, got {self.generate_s}")
        if self.batch > TRAIN_SIZE:
            raise ValueError(f"batch must be at most the {TRAIN_SIZE} training questions, got {self.batch}")
        if self.abandoners > self.replicas:
            raise ValueError(f"abandoners ({self.abandoners}) must not exceed replicas ({self.replicas})")


class Tally:
    """What the clients saw. Replicas run on one event loop; the trainer thread only appends."""

    def __init__(self, steps: int) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter = Counter()  # "<call> <status code>" -> count
        self.accepted: Counter = Counter()  # task id -> accepted answers
        self.accepted_total = 0
        self.honest_duplicates = 0  # first submissions answered DUPLICATE: the task was done twice
        self.resubmits = Counter()  # deliberate second copies: "sent", "refused"
        self.abandoned = 0
        self.lost_leases = 0  # leases a renewal said were lost (their groups are not submitted)
        self.stale = 0  # submissions of a task the scheduler no longer knows
        self.expired_before_submit = 0  # submissions refused because the lease was no longer held
        self.batches: dict[int, list] = {}  # step -> groups the trainer received
        self.complete = [threading.Event() for _ in range(steps)]  # set by the reply that completed the step
        self.loop_lag: list[float] = []

    async def timed(self, name: str, call):
        begin = time.perf_counter()
        try:
            reply = await call
        finally:
            seconds = time.perf_counter() - begin
            self.latency[name].append(seconds)
        if name == "LeaseTasks":  # granted and empty leases apart: they cost the scheduler differently
            self.latency["LeaseTasks granted" if reply.tasks else "LeaseTasks empty"].append(seconds)
        return reply


# ---- the trainer's side ------------------------------------------------------
# Every trainer call goes through services.bench.harness.NullTrainer (it registers
# and sends the trainer epoch), from train_step alone.

def train_step(trainer: NullTrainer, step: int, weights_dir: Path) -> tuple[list, float, float]:
    """Pull the step's batch and report it trained into policy v<step + 1>: its groups, and the seconds of each call."""
    begin = time.perf_counter()
    groups, _ = trainer.wait_batch(step, timeout_s=RPC_TIMEOUT_S)
    pulled = time.perf_counter()
    trainer.report(step, step + 1, str(weights_dir / f"v{step + 1}"))
    return groups, pulled - begin, time.perf_counter() - pulled


def run_trainer(address: str, settings: LoadSettings, weights_dir: Path, tally: Tally, deadline: float) -> None:
    trainer = NullTrainer(address)
    try:
        trainer.epoch()  # register before anything is timed
        for step in range(settings.steps):
            # Wait until a replica saw the step complete, so that the batch call is timed on its own.
            if not tally.complete[step].wait(timeout=max(deadline - time.monotonic(), 0.0)):
                raise TimeoutError(f"no replica saw step {step} complete before the deadline")
            tally.batches[step], batch_s, report_s = train_step(trainer, step, weights_dir)
            tally.latency["StreamBatch"].append(batch_s)
            tally.latency["ReportStep"].append(report_s)
    finally:
        trainer.close()


# ---- the replicas ------------------------------------------------------------

def group_for(task: pb.RolloutTask, replica_id: str, rng: random.Random) -> pb.GroupResult:
    samples = [pb.Sample(prompt_token_ids=[1, 5, 6, 14], response_token_ids=[7, 2], response_logprobs=[-0.3, -0.1],
                         text="12", reward=float(rng.random() < 0.5)) for _ in range(task.num_samples)]
    return pb.GroupResult(task_id=task.task_id, lease_id=task.lease_id, replica_id=replica_id,
                          policy_version=task.policy_version, temperature=task.temperature, samples=samples)


async def call(tally: Tally, name: str, make, stop: asyncio.Event):
    """One RPC, timed; UNAVAILABLE and DEADLINE_EXCEEDED (a busy or restarting scheduler) are counted and retried."""
    delay = 0.05
    while True:
        try:
            return await tally.timed(name, make())
        except grpc.aio.AioRpcError as exc:
            tally.errors[f"{name} {exc.code().name}"] += 1
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or stop.is_set():
                raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)


async def generate(stub, replica_id: str, tasks: list, seconds: float, lease_s: float, tally: Tally,
                   stop: asyncio.Event) -> list:
    """Sleep `seconds` as if sampling, renewing the leases every lease_s / 3; the tasks still held."""
    end = time.monotonic() + seconds
    held = {t.task_id: t for t in tasks}
    while held and (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(left, lease_s / 3))
        if end - time.monotonic() <= 0:
            break
        request = pb.RenewRequest(replica_id=replica_id,
                                  leases=[pb.LeaseRef(task_id=t.task_id, lease_id=t.lease_id) for t in held.values()])
        reply = await call(tally, "RenewLeases", lambda: stub.RenewLeases(request, timeout=RPC_TIMEOUT_S), stop)
        for task_id in reply.lost_task_ids:
            tally.lost_leases += 1
            held.pop(task_id, None)
    return list(held.values())


async def submit(stub, task: pb.RolloutTask, group: pb.GroupResult, tally: Tally, stop: asyncio.Event,
                 deliberate_copy: bool) -> bool:
    """Submit one group; True if accepted."""
    try:
        answer = await call(tally, "SubmitGroup", lambda: stub.SubmitGroup(group, timeout=RPC_TIMEOUT_S), stop)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            tally.stale += 1  # the step was trained and dropped: this task was done elsewhere
        elif exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            tally.expired_before_submit += 1  # the lease ran out between its last renewal and the submission
        else:
            raise
        return False
    if deliberate_copy:
        tally.resubmits["refused" if answer.duplicate else "accepted"] += 1
    elif answer.duplicate:
        tally.honest_duplicates += 1
    if answer.accepted:
        tally.accepted[task.task_id] += 1
        tally.accepted_total += 1
        if answer.step_groups_done == answer.step_groups_total and task.step < len(tally.complete):
            tally.complete[task.step].set()
    return answer.accepted


async def replica(address: str, index: int, settings: LoadSettings, tally: Tally, stop: asyncio.Event) -> None:
    rng = random.Random(index)
    name, abandon = f"load-{index}", index < settings.abandoners
    await asyncio.sleep(rng.uniform(0, settings.start_s))
    async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        while not stop.is_set():
            request = pb.LeaseRequest(replica_id=name, max_tasks=settings.max_tasks)
            reply = await call(tally, "LeaseTasks", lambda: stub.LeaseTasks(request, timeout=RPC_TIMEOUT_S), stop)
            if reply.finished:
                return
            if not reply.tasks:
                await asyncio.sleep(reply.retry_after_s or 0.2)
                continue
            if abandon:  # a replica that dies holding its lease
                abandon = False
                tally.abandoned += len(reply.tasks)
                continue
            held = await generate(stub, name, list(reply.tasks), rng.uniform(*settings.generate_s), settings.lease_s,
                                  tally, stop)
            for task in held:
                group = group_for(task, name, rng)
                if await submit(stub, task, group, tally, stop, deliberate_copy=False):
                    if tally.accepted_total % settings.resubmit_every == 0:
                        tally.resubmits["sent"] += 1
                        await submit(stub, task, group, tally, stop, deliberate_copy=True)


async def watch_loop_lag(tally: Tally, stop: asyncio.Event, period_s: float = 0.01) -> None:
    """How late this process's event loop wakes up: client-side delay inside every latency measured here."""
    while not stop.is_set():
        begin = time.perf_counter()
        await asyncio.sleep(period_s)
        tally.loop_lag.append(time.perf_counter() - begin - period_s)


async def drive(address: str, settings: LoadSettings, weights_dir: Path, tally: Tally) -> float:
    stop = asyncio.Event()
    deadline = time.monotonic() + settings.deadline_s
    replicas = [asyncio.create_task(replica(address, i, settings, tally, stop)) for i in range(settings.replicas)]
    lag = asyncio.create_task(watch_loop_lag(tally, stop))
    begin = time.perf_counter()
    trainer = asyncio.create_task(asyncio.to_thread(run_trainer, address, settings, weights_dir, tally, deadline))
    try:
        done, _ = await asyncio.wait([trainer, *replicas], timeout=settings.deadline_s,
                                     return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # a failed replica or trainer fails the run, with its own error
        if not trainer.done():
            raise TimeoutError(f"the load run did not finish in {settings.deadline_s:g}s: "
                               f"{len(tally.batches)} of {settings.steps} steps trained")
        await asyncio.wait_for(asyncio.gather(*replicas), timeout=30)  # told "finished" at their next lease
        return time.perf_counter() - begin
    finally:
        stop.set()
        for task in replicas:
            task.cancel()
        await asyncio.gather(*replicas, lag, return_exceptions=True)


# ---- the scheduler process and the count -------------------------------------

class SchedulerProcess:
    """python -m services.scheduler on loopback ports, on the Redis at `redis_url`, logging to workdir."""

    def __init__(self, settings: LoadSettings, redis_url: str, workdir: Path, run_id: str) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self.run_dir = workdir / "run"
        config = {
            "data": {"train_size": TRAIN_SIZE},
            "training": {"batch_questions": settings.batch, "steps": settings.steps},
            "allocation": {"n": 4, "n_low": 2, "n_high": 6, "rerank": "step"},
            "run_dir": str(self.run_dir),
            "validation_questions": 0,  # training tasks only: every accepted group is counted into the statistics
            "scheduler": {"http_port": self.http_port, "grpc_port": self.grpc_port, "lease_s": settings.lease_s,
                          "store_url": redis_url, "run_id": run_id},
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "scheduler.log"
        env = os.environ | {"PYTHONUNBUFFERED": "1", "E3_AUTH__INSECURE_LOOPBACK": "true"}  # auth is not under load here
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.scheduler", "--config", str(workdir / "config.yaml"),
                 "--vocab-size", str(VOCAB_SIZE)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.api = f"http://127.0.0.1:{self.http_port}"
        self.address = f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the scheduler exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.api}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the scheduler was not ready in {timeout_s:g}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM and wait; a scheduler that does not exit 0 fails the run with its log."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                raise RuntimeError(f"the scheduler did not stop in 30 s after SIGTERM:\n{self.log_tail()}")
        if self.process.returncode != 0:
            raise RuntimeError(f"the scheduler exited with {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def exactly_once(plans: dict[int, dict], tally: Tally, store: RedisStore) -> dict:
    """Lost and duplicated groups, counted from the plans, the trained batches and the store."""
    lost = wrong = delivered = samples = 0
    duplicated = tally.honest_duplicates + sum(n - 1 for n in tally.accepted.values() if n > 1)
    for step, plan in plans.items():
        planned = {f"s{step}-{i}": (q, c) for i, (q, c) in enumerate(zip(plan["question_ids"], plan["counts"]))}
        got = [g.task_id for g in tally.batches.get(step, [])]
        delivered += len(got)
        duplicated += len(got) - len(set(got))
        lost += len(set(planned) - set(got))
        for g in tally.batches.get(step, []):  # a group must answer its planned task: question and rollout count
            samples += len(g.samples)
            wrong += planned.get(g.task_id) != (g.question_id, len(g.samples))
    counters = store.counters()
    return {
        "steps_planned": len(plans), "steps_trained": len(tally.batches),
        "tasks_planned": sum(len(p["question_ids"]) for p in plans.values()), "groups_delivered": delivered,
        "lost_groups": lost, "duplicated_groups": duplicated, "groups_not_as_planned": wrong,
        "rollouts_trained": samples, "rollouts_in_store_statistics": sum(s.attempts for s in store.all_stats().values()),
        "honest_submissions_answered_duplicate": tally.honest_duplicates,
        "deliberate_copies_sent": tally.resubmits["sent"], "deliberate_copies_refused": tally.resubmits["refused"],
        "store_duplicates": counters.duplicates, "store_lease_expiries": counters.lease_expiries,
        "abandoned_tasks": tally.abandoned, "leases_lost_on_renewal": tally.lost_leases, "stale_submissions": tally.stale,
        "submissions_after_lease_expiry": tally.expired_before_submit,
    }


def percentiles_ms(values: list[float]) -> dict:
    if not values:
        return {"calls": 0}
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"calls": len(values), "p50": round(1000 * statistics.median(values), 2), "p99": round(1000 * cuts[98], 2),
            "max": round(1000 * max(values), 2)}


def cpu_seconds(process: psutil.Process, redis_client: redis.Redis) -> dict[str, float]:
    info = redis_client.info("cpu")
    times = process.cpu_times()
    return {"scheduler": times.user + times.system, "redis": info["used_cpu_user"] + info["used_cpu_sys"],
            "client": time.process_time()}


def run_load(settings: LoadSettings, redis_url: str, workdir: Path, run_id: str = "load") -> dict:
    """One load run against a fresh scheduler process; the measured result (see the module docstring)."""
    scheduler = SchedulerProcess(settings, redis_url, workdir, run_id)
    tally = Tally(settings.steps)
    redis_client = redis.Redis.from_url(redis_url)
    try:
        scheduler.wait_ready()
        process = psutil.Process(scheduler.process.pid)
        cpu_before, load_before = cpu_seconds(process, redis_client), os.getloadavg()[0]
        wall = asyncio.run(drive(scheduler.address, settings, scheduler.run_dir / "weights", tally))
        load = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # the machine's, before and after the run
        cpu = {name: round((used - cpu_before[name]) / wall, 3)
               for name, used in cpu_seconds(process, redis_client).items()}
        plans = {s: httpx.get(f"{scheduler.api}/v1/allocations/{s}", timeout=10).raise_for_status().json()
                 for s in range(settings.steps)}
    finally:
        redis_client.close()
        scheduler.stop()
    store = RedisStore(redis_url, namespace=run_id)
    try:
        counted = exactly_once(plans, tally, store)
    finally:
        store.close()
    calls = sum(len(v) for name, v in tally.latency.items() if " " not in name)  # RPCs, not the lease split
    return {
        "settings": dataclasses.asdict(settings),
        "seconds": round(wall, 2), "calls_per_s": round(calls / wall, 1),
        "groups_accepted_per_s": round(tally.accepted_total / wall, 1),
        "latency_ms": {name: percentiles_ms(v) for name, v in sorted(tally.latency.items())},
        "errors": dict(tally.errors),
        "exactly_once": counted,
        "cpu_cores_used": cpu, "load_average_before_after": load,
        "client_loop_lag_ms": percentiles_ms(tally.loop_lag),
    }


# ---- the benchmark: configurations, result files -------------------------------

FULL = {
    "256 replicas": LoadSettings(),
    "256 replicas, fast sampling": LoadSettings(generate_s=(0.25, 0.75)),
    "512 replicas": LoadSettings(replicas=512, batch=960),
}
QUICK = {"64 replicas": LoadSettings(replicas=64, steps=3, batch=128, generate_s=(0.5, 1.5))}


def markdown(result: dict) -> str:
    p = result["provenance"]
    m = p["machine"]
    lines = [
        "# Scheduler under load",
        "",
        f"Generated by `{p['command']}` on {p['created_utc']} (git {p['git_commit']}, {m['cpus']} CPUs, "
        f"{m['platform']}, load average {m['load_average_at_start']:.1f} at the start). Do not edit: rerun the command.",
        "",
        "One scheduler process on a private redis-server, simulated replicas (asyncio, one gRPC connection each) and a "
        "stand-in trainer in the benchmark process, all on this machine's cores; see services/bench/scheduler_load.py "
        f"for what a replica does. Goal (issue 12): lease p99 under {LEASE_GOAL_P99_MS:g} ms at 256 replicas, no group "
        "lost or duplicated.",
        "",
        "| configuration | replicas | tasks/lease | sampling s | steps x tasks | calls/s | lease p50 / p99 ms "
        "| submit p50 / p99 ms | renew p50 / p99 ms | batch p50 / p99 ms | report p50 / p99 ms | lost | duplicated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pair(run: dict, name: str) -> str:
        v = run["latency_ms"].get(name, {})
        return f"{v['p50']:.1f} / {v['p99']:.1f}" if "p50" in v else "-"

    for label, run in result["runs"].items():
        s, e = run["settings"], run["exactly_once"]
        lines.append(
            f"| {label} | {s['replicas']} | {s['max_tasks']} | {s['generate_s'][0]:g}-{s['generate_s'][1]:g} "
            f"| {s['steps']} x {s['batch']} | {run['calls_per_s']:.0f} | {pair(run, 'LeaseTasks')} "
            f"| {pair(run, 'SubmitGroup')} | {pair(run, 'RenewLeases')} | {pair(run, 'StreamBatch')} "
            f"| {pair(run, 'ReportStep')} | {e['lost_groups']} | {e['duplicated_groups']} |")
    verdicts = [f"{label}: lease p99 {run['latency_ms']['LeaseTasks']['p99']:.0f} ms, "
                f"{'meets' if run['latency_ms']['LeaseTasks']['p99'] < LEASE_GOAL_P99_MS else 'misses'} the goal"
                for label, run in result["runs"].items() if run["settings"]["replicas"] == 256]
    if verdicts:
        lines += ["", "Against the goal: " + "; ".join(verdicts) + "."]
    lines += ["", "Leases that handed out tasks and leases that found none (a replica then polls again after the "
              "retry_after_s the scheduler suggests); CPU cores used over each run (of the machine's); how late the "
              "client's event loop woke (client-side delay inside every figure above):", "",
              "| configuration | granted leases | granted p50 / p99 ms | empty leases | empty p50 / p99 ms "
              "| scheduler cores | redis cores | client cores | machine load before / after | client loop lag p50 / p99 ms "
              "| errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, run in result["runs"].items():
        c, lag, lat = run["cpu_cores_used"], run["client_loop_lag_ms"], run["latency_ms"]
        errors = ", ".join(f"{k}: {v}" for k, v in run["errors"].items()) or "none"
        lines.append(f"| {label} | {lat.get('LeaseTasks granted', {}).get('calls', 0)} | {pair(run, 'LeaseTasks granted')} "
                     f"| {lat.get('LeaseTasks empty', {}).get('calls', 0)} | {pair(run, 'LeaseTasks empty')} "
                     f"| {c['scheduler']:.2f} | {c['redis']:.2f} | {c['client']:.2f} "
                     f"| {run['load_average_before_after'][0]:.1f} / {run['load_average_before_after'][1]:.1f} "
                     f"| {lag.get('p50', 0):.1f} / {lag.get('p99', 0):.1f} | {errors} |")
    lines += ["", "Exactly-once, counted per run (see exactly_once in the module): planned tasks, groups the trainer "
              "received, rollouts in the store's statistics against rollouts trained, and the deliberate faults.", "",
              "| configuration | tasks planned | groups delivered | lost | duplicated | rollouts trained / in stats "
              "| copies refused / sent | abandoned, expiries | leases lost on renewal |", "|---|---|---|---|---|---|---|---|---|"]
    for label, run in result["runs"].items():
        e = run["exactly_once"]
        lines.append(f"| {label} | {e['tasks_planned']} | {e['groups_delivered']} | {e['lost_groups']} "
                     f"| {e['duplicated_groups']} | {e['rollouts_trained']} / {e['rollouts_in_store_statistics']} "
                     f"| {e['deliberate_copies_refused']} / {e['deliberate_copies_sent']} "
                     f"| {e['abandoned_tasks']}, {e['store_lease_expiries']} | {e['leases_lost_on_renewal']} |")
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def provenance() -> dict:
    """Where and how the result was produced (services.bench.common.provenance without torch and vLLM, unused here)."""
    return {
        "command": " ".join(["python -m services.bench.scheduler_load", *map(shlex.quote, sys.argv[1:])]),
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True), "python": platform.python_version(),
                    "grpcio": grpc.__version__, "load_average_at_start": os.getloadavg()[0]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench.scheduler_load", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small configuration (a smoke run)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results, or runs/bench-quick with --quick)")
    parser.add_argument("--work", type=Path, help="scratch folder (default runs/bench-scheduler-load)")
    parser.add_argument("--note", help="a sentence printed under the results (e.g. what else used the machine)")
    args = parser.parse_args(argv)
    out = args.out or Path("runs/bench-quick" if args.quick else "bench/results")
    work = (args.work or Path("runs/bench-scheduler-load")).resolve()
    result = {"provenance": provenance(), "lease_goal_p99_ms": LEASE_GOAL_P99_MS, "runs": {}, "note": args.note}
    with local_redis() as url:
        if url is None:
            print("no redis-server on this machine: nothing measured", file=sys.stderr)
            return 2
        for i, (label, settings) in enumerate((QUICK if args.quick else FULL).items()):
            run = run_load(settings, url, work / f"run-{i}", run_id=f"load{i}")
            result["runs"][label] = run
            lease, e = run["latency_ms"]["LeaseTasks"], run["exactly_once"]
            print(f"{label}: lease p50 {lease['p50']} ms p99 {lease['p99']} ms; "
                  + "; ".join(f"{n} p50 {v['p50']} p99 {v['p99']}" for n, v in run["latency_ms"].items() if n != "LeaseTasks")
                  + f"; lost {e['lost_groups']}, duplicated {e['duplicated_groups']}; cpu {run['cpu_cores_used']}",
                  flush=True)
    write_json(out / "scheduler_load.json", result)
    write_text(out / "scheduler_load.md", markdown(result))
    print(f"wrote {shown_path(out / 'scheduler_load.json')} and {shown_path(out / 'scheduler_load.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
