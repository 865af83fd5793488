"""The in-process store: plain dicts behind one lock, with an optional JSON snapshot.

One `threading.Lock` guards every structure, so each method is atomic with
respect to the others; that is all the scheduler's races need in one process.
With a snapshot path the store loads the file at start (if it exists) and
rewrites it atomically on `save_state` and `close`, so a restarted scheduler
resumes where the last save left it. Groups are the caller's bytes, kept
as they came (base64 in the snapshot). Work completed after the last save is
lost on a crash; this backend is for tests and single-machine runs.

Leadership: a store in memory has exactly one process by construction, so
acquire_leadership always succeeds (token 1). A snapshot file could be
opened by a second scheduler process, though, so the store holds an
exclusive lock (fcntl.flock on `<snapshot>.lock`) from opening to close,
and a second process fails to open it with a message naming the holder.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
import threading
import typing
import uuid
from collections import deque
from pathlib import Path
from typing import Mapping, Sequence

from e3.core.difficulty import QuestionStats
from e3.store.base import (
    EXPIRED_REASON,
    FailOutcome,
    FailResult,
    LeaderClaim,
    RenewResult,
    StateConflict,
    StepAlreadyPlanned,
    Store,
    StoreCounters,
    SubmitOutcome,
    SubmitResult,
    TaskRecord,
    TaskStatus,
    check_history,
    check_plan,
    encode_completion,
    failure_record,
    revision_of,
)

SNAPSHOT_FORMAT = "e3-memory-store"
SNAPSHOT_VERSION = 2  # 2: groups are base64 bytes; 1 (groups as JSON objects) still loads
_TASK_TYPES = typing.get_type_hints(TaskRecord)


class SnapshotError(ValueError):
    """The snapshot file exists but is not a valid store snapshot."""


class MemoryStore(Store):
    def __init__(self, snapshot_path: Path | str | None = None) -> None:
        self._lock = threading.Lock()
        self._path = Path(snapshot_path) if snapshot_path is not None else None
        # The state is kept as JSON text: it proves the document is JSON-able
        # and keeps the caller's later mutations out of the store, as in Redis.
        self._state_json: str | None = None
        self._stats: dict[str, QuestionStats] = {}
        self._ranks: dict[str, float] = {}
        self._tasks: dict[str, TaskRecord] = {}
        self._steps: dict[int, list[str]] = {}  # task ids in plan order
        self._groups: dict[int, dict[str, bytes]] = {}  # step -> task id -> group, the caller's bytes
        self._failed: dict[int, dict[str, str]] = {}  # step -> task id -> failure record JSON
        self._queue: deque[str] = deque()
        self._history: dict[str, tuple[int, list[tuple[int, int]]]] = {}  # question -> (last step, groups)
        self._leases: dict[str, float] = {}  # task id -> lease expiry
        self._expiries = 0
        self._duplicates = 0
        self._lock_file = None
        if self._path is not None:
            self._lock_file = _lock_snapshot(self._path)
            if self._path.exists():
                try:
                    self._load(self._path)
                except BaseException:
                    self._lock_file.close()
                    raise

    # --- leadership: one process holds the store, so it always leads ---
    def acquire_leadership(self, holder: str, ttl_s: float) -> LeaderClaim:
        return LeaderClaim(True, 1, holder, float(ttl_s))

    def renew_leadership(self, ttl_s: float) -> None:
        return None

    def release_leadership(self) -> None:
        return None

    # --- state, statistics, ranks ---
    def load_state(self) -> dict | None:
        with self._lock:
            return None if self._state_json is None else json.loads(self._state_json)

    def save_state(self, state: dict, expected_revision: int | None = None) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        revision_of(state)
        text = json.dumps(state)
        with self._lock:
            if expected_revision is not None:
                found = 0 if self._state_json is None else revision_of(json.loads(self._state_json))
                if found != expected_revision:
                    raise StateConflict(expected_revision, found)
            self._state_json = text
            self._write_snapshot()

    def state_revision(self) -> int:
        with self._lock:
            return 0 if self._state_json is None else revision_of(json.loads(self._state_json))

    def stats(self, question_ids: Sequence[str]) -> dict[str, QuestionStats]:
        with self._lock:
            return {q: self._stats[q] for q in question_ids if q in self._stats}

    def all_stats(self) -> dict[str, QuestionStats]:
        with self._lock:
            return dict(self._stats)

    def save_ranks(self, ranks: dict[str, float]) -> None:
        fresh = {str(q): float(r) for q, r in ranks.items()}
        with self._lock:
            self._ranks = fresh

    def ranks(self) -> dict[str, float]:
        with self._lock:
            return dict(self._ranks)

    # --- tasks and leases ---
    def plan_step(self, step: int, tasks: Sequence[TaskRecord]) -> None:
        check_plan(step, tasks)
        with self._lock:
            if step in self._steps:
                raise StepAlreadyPlanned(f"step {step} is already planned")
            for task in tasks:
                if task.task_id in self._tasks:
                    raise ValueError(f"task id {task.task_id!r} already exists (step {self._tasks[task.task_id].step})")
            self._steps[step] = []
            self._groups[step] = {}
            self._failed[step] = {}
            self._queue_tasks(step, tasks)

    def extend_step(self, step: int, tasks: Sequence[TaskRecord]) -> None:
        check_plan(step, tasks)
        with self._lock:
            if step not in self._steps:
                raise ValueError(f"step {step} is not planned: only a planned step takes a further round")
            for task in tasks:
                if task.task_id in self._tasks:
                    raise StepAlreadyPlanned(f"task {task.task_id!r} of step {step}'s further round exists already")
            self._queue_tasks(step, tasks)

    def _queue_tasks(self, step: int, tasks: Sequence[TaskRecord]) -> None:
        """Store checked tasks pending, in the step's plan order and at the queue's back; caller holds the lock."""
        for task in tasks:
            self._steps[step].append(task.task_id)
            # A copy, so the caller's records never alias the store's.
            self._tasks[task.task_id] = dataclasses.replace(task, status=TaskStatus.PENDING)
            self._queue.append(task.task_id)

    def record_groups(self, step: int, groups: Mapping[str, tuple[int, int]], keep: int) -> None:
        check_history(groups, keep)
        with self._lock:
            for question_id, group in groups.items():
                last, recent = self._history.get(question_id, (-1, []))
                if step > last:
                    self._history[question_id] = (step, (recent + [tuple(group)])[-keep:])

    def recent_groups(self, question_ids: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
        with self._lock:
            return {q: list(self._history[q][1]) for q in question_ids if q in self._history}

    def lease(self, replica_id: str, max_tasks: int, now: float, lease_s: float) -> list[TaskRecord]:
        expires = float(now) + float(lease_s)
        # One random base per call plus a counter: unique without a uuid per task.
        base = uuid.uuid4().hex
        out: list[TaskRecord] = []
        with self._lock:
            while len(out) < max_tasks and self._queue:
                task = self._tasks[self._queue.popleft()]
                task.status = TaskStatus.LEASED
                task.lease_id = f"{base}.{len(out) + 1}"
                task.leased_by = replica_id
                task.lease_expires_at = expires
                task.times_leased += 1
                self._leases[task.task_id] = expires
                out.append(dataclasses.replace(task))
        return out

    def expire_leases(self, now: float, max_expiries: int = 0) -> list[str]:
        with self._lock:
            # Expiry order, ties by id: the order Redis's sorted set gives.
            expired = sorted((t for t, e in self._leases.items() if e <= now), key=lambda t: (self._leases[t], t))
            again = []
            for task_id in expired:
                task = self._tasks[task_id]
                task.expiries += 1
                if max_expiries > 0 and task.expiries >= max_expiries:
                    del self._leases[task_id]
                    task.status = TaskStatus.FAILED
                    detail = f"its lease expired {task.expiries} times; last held by {task.leased_by}"
                    self._failed[task.step][task_id] = json.dumps(
                        failure_record(task, EXPIRED_REASON, detail, task.leased_by))
                else:
                    again.append(task_id)
            self._requeue(again)
            self._expiries += len(expired)
            return expired

    def _requeue(self, task_ids: list[str]) -> list[str]:
        """Put leased tasks back at the queue's front in expiry order (ties by id); caller holds the lock."""
        ids = sorted(task_ids, key=lambda t: (self._leases[t], t))
        for task_id in reversed(ids):  # appendleft in reverse keeps expiry order at the front
            del self._leases[task_id]
            task = self._tasks[task_id]
            task.status, task.lease_id, task.leased_by, task.lease_expires_at = TaskStatus.PENDING, "", "", 0.0
            self._queue.appendleft(task_id)
        return ids

    def release(self, replica_id: str) -> list[str]:
        with self._lock:
            return self._requeue([t for t in self._leases if self._tasks[t].leased_by == replica_id])

    def renew(self, replica_id: str, leases: Sequence[tuple[str, str]], now: float, lease_s: float) -> RenewResult:
        expires = float(now) + float(lease_s)
        renewed, lost = [], []
        with self._lock:
            for task_id, lease_id in leases:
                task = self._tasks.get(task_id)
                held = (task is not None and task.status == TaskStatus.LEASED and task.lease_id == lease_id
                        and task.leased_by == replica_id)
                if held:
                    task.lease_expires_at = self._leases[task_id] = expires
                (renewed if held else lost).append(task_id)
        return RenewResult(renewed, lost, expires)

    def fail(self, task_id: str, lease_id: str, replica_id: str, reason: str, detail: str, max_failures: int) -> FailResult:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return FailResult(FailOutcome.UNKNOWN)
            if task.status in (TaskStatus.DONE, TaskStatus.FAILED):
                return FailResult(FailOutcome.FINISHED, task.failures, *self._progress(task.step))
            if task.status != TaskStatus.LEASED or task.lease_id != lease_id or task.leased_by != replica_id:
                return FailResult(FailOutcome.STALE, task.failures, *self._progress(task.step))
            task.failures += 1
            if task.failures < max_failures:
                self._requeue([task_id])
                return FailResult(FailOutcome.REQUEUED, task.failures, *self._progress(task.step))
            del self._leases[task_id]
            task.status = TaskStatus.FAILED
            self._failed[task.step][task_id] = json.dumps(failure_record(task, reason, detail, replica_id))
            return FailResult(FailOutcome.FAILED, task.failures, *self._progress(task.step))

    def _progress(self, step: int) -> tuple[int, int]:
        """(finished, planned) of a step; caller holds the lock."""
        return len(self._groups.get(step, {})) + len(self._failed.get(step, {})), len(self._steps.get(step, []))

    def leases(self) -> list[TaskRecord]:
        with self._lock:
            return [dataclasses.replace(self._tasks[t]) for _, t in sorted((e, t) for t, e in self._leases.items())]

    def complete(self, task_id: str, group: bytes, rewards: Sequence[float], lease: tuple[str, str] | None = None
                 ) -> SubmitResult:
        group_bytes, count, total = encode_completion(group, rewards)
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return SubmitResult(SubmitOutcome.UNKNOWN)
            groups = self._groups[task.step]
            if task.status in (TaskStatus.DONE, TaskStatus.FAILED):
                self._duplicates += 1
                return SubmitResult(SubmitOutcome.DUPLICATE, *self._progress(task.step))
            if lease is not None and (task.status != TaskStatus.LEASED or (task.leased_by, task.lease_id) != lease):
                return SubmitResult(SubmitOutcome.STALE, *self._progress(task.step))
            # A task whose lease ran out sits in the queue again; take it out.
            if task.status == TaskStatus.PENDING:
                self._queue.remove(task_id)
            self._leases.pop(task_id, None)
            task.status = TaskStatus.DONE
            groups[task_id] = group_bytes
            if count:
                self._stats[task.question_id] = self._add(task.question_id, count, total)
            return SubmitResult(SubmitOutcome.ACCEPTED, *self._progress(task.step))

    def _add(self, question_id: str, count: int, total: float) -> QuestionStats:
        old = self._stats.get(question_id, QuestionStats())
        # Add the batch's sum in one step, as Redis's HINCRBYFLOAT does.
        return QuestionStats(old.attempts + count, old.reward_sum + total)

    def task(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            task = self._tasks.get(task_id)
            return None if task is None else dataclasses.replace(task)

    def step_progress(self, step: int) -> tuple[int, int]:
        with self._lock:
            return self._progress(step)

    def finished_among(self, step: int, task_ids: Sequence[str]) -> int:
        with self._lock:
            groups, failed = self._groups.get(step, {}), self._failed.get(step, {})
            return sum(1 for t in set(task_ids) if t in groups or t in failed)

    def step_groups(self, step: int) -> list[bytes]:
        with self._lock:
            groups = self._groups.get(step, {})
            return [groups[t] for t in self._steps.get(step, []) if t in groups]

    def step_failures(self, step: int) -> list[dict]:
        with self._lock:
            failed = self._failed.get(step, {})
            return [json.loads(failed[t]) for t in self._steps.get(step, []) if t in failed]

    def drop_step(self, step: int) -> None:
        with self._lock:
            ids = set(self._steps.pop(step, []))
            self._groups.pop(step, None)
            self._failed.pop(step, None)
            for task_id in ids:
                del self._tasks[task_id]
                self._leases.pop(task_id, None)
            if ids:
                self._queue = deque(t for t in self._queue if t not in ids)

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def leased_count(self) -> int:
        with self._lock:
            return len(self._leases)

    def counters(self) -> StoreCounters:
        with self._lock:
            return StoreCounters(lease_expiries=self._expiries, duplicates=self._duplicates)

    def close(self) -> None:
        with self._lock:
            self._write_snapshot()
            if self._lock_file is not None:
                self._lock_file.close()  # closing the descriptor drops the flock
                self._lock_file = None

    # --- the snapshot ---
    def _write_snapshot(self) -> None:
        """Write everything to the snapshot path, atomically; caller holds the lock."""
        if self._path is None:
            return
        data = {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "state": None if self._state_json is None else json.loads(self._state_json),
            "stats": {q: [s.attempts, s.reward_sum] for q, s in self._stats.items()},
            "ranks": self._ranks,
            "tasks": [_task_to_json(t) for t in self._tasks.values()],
            "steps": {str(s): ids for s, ids in self._steps.items()},
            "groups": {str(s): {t: base64.b64encode(g).decode("ascii") for t, g in gs.items()}
                       for s, gs in self._groups.items()},
            "failed": {str(s): {t: json.loads(f) for t, f in fs.items()} for s, fs in self._failed.items()},
            "queue": list(self._queue),
            "history": {q: [last, [list(g) for g in groups]] for q, (last, groups) in self._history.items()},
            "counters": {"lease_expiries": self._expiries, "duplicates": self._duplicates},
        }
        text = json.dumps(data)  # json writes floats with repr: they round-trip exactly
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # A temp file in the same directory, then os.replace: a reader (or a
        # crash) sees the old snapshot or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=self._path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self._restore(data)
        except (OSError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise SnapshotError(f"store snapshot {path} is unreadable or corrupt: {exc!r}") from exc

    def _restore(self, data: dict) -> None:
        """Fill the store from a parsed snapshot, checking that every part fits."""
        if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"not an {SNAPSHOT_FORMAT} snapshot")
        if data.get("version") not in (1, SNAPSHOT_VERSION):
            raise ValueError(f"snapshot version {data.get('version')!r}, this code reads 1 and {SNAPSHOT_VERSION}")
        state = data["state"]
        if state is not None and not isinstance(state, dict):
            raise ValueError("'state' must be an object or null")
        self._state_json = None if state is None else json.dumps(state)
        self._stats = {str(q): QuestionStats(_int(a, f"stats[{q!r}]"), float(r)) for q, (a, r) in data["stats"].items()}
        self._ranks = {str(q): float(r) for q, r in data["ranks"].items()}
        self._tasks = {}
        for raw in data["tasks"]:
            task = _task_from_json(raw)
            if task.task_id in self._tasks:
                raise ValueError(f"task {task.task_id!r} appears twice")
            self._tasks[task.task_id] = task
        self._steps = {int(s): [str(t) for t in ids] for s, ids in data["steps"].items()}
        read = _group_v1 if data["version"] == 1 else _group_v2
        self._groups = {int(s): {str(t): read(g, t) for t, g in gs.items()} for s, gs in data["groups"].items()}
        # Snapshots written before tasks could fail have no "failed" part.
        failed = data.get("failed", {})
        self._failed = {s: {} for s in self._steps} | {
            int(s): {str(t): json.dumps(f) for t, f in fs.items()} for s, fs in failed.items()}
        self._queue = deque(str(t) for t in data["queue"])
        # Snapshots written before the recent-groups history have no "history" part.
        self._history = {str(q): (_int(last, f"history[{q!r}]"), [(_int(r, "history"), _int(c, "history")) for r, c in groups])
                         for q, (last, groups) in data.get("history", {}).items()}
        self._leases = {t.task_id: t.lease_expires_at for t in self._tasks.values() if t.status == TaskStatus.LEASED}
        self._expiries = _int(data["counters"]["lease_expiries"], "counters.lease_expiries")
        self._duplicates = _int(data["counters"]["duplicates"], "counters.duplicates")
        self._check_consistent()

    def _check_consistent(self) -> None:
        """The cross-references a hand-edited or truncated snapshot could break."""
        planned = {t: s for s, ids in self._steps.items() for t in ids}
        if set(planned) != set(self._tasks) or sum(map(len, self._steps.values())) != len(planned):
            raise ValueError("'steps' do not list each task exactly once")
        for task_id, task in self._tasks.items():
            if planned[task_id] != task.step:
                raise ValueError(f"task {task_id!r} is listed under step {planned[task_id]}, not its step {task.step}")
        if set(self._groups) != set(self._steps) or set(self._failed) != set(self._steps):
            raise ValueError("'groups', 'failed' and 'steps' cover different steps")
        done = {t for t, task in self._tasks.items() if task.status == TaskStatus.DONE}
        with_group = {t for gs in self._groups.values() for t in gs}
        if done != with_group:
            raise ValueError(f"done tasks and stored groups differ: {sorted(done ^ with_group)[:5]}")
        failed = {t for t, task in self._tasks.items() if task.status == TaskStatus.FAILED}
        with_failure = {t for fs in self._failed.values() for t in fs}
        if failed != with_failure:
            raise ValueError(f"failed tasks and stored failures differ: {sorted(failed ^ with_failure)[:5]}")
        pending = {t for t, task in self._tasks.items() if task.status == TaskStatus.PENDING}
        if len(self._queue) != len(set(self._queue)) or set(self._queue) != pending:
            raise ValueError("'queue' must hold each pending task exactly once")


def _lock_snapshot(path: Path):
    """Hold `<path>.lock` exclusively for this process, or fail naming the process that holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_name(path.name + ".lock"), "a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise SnapshotError(f"store snapshot {path} is in use by {holder}: one scheduler per snapshot "
                            f"(stop the other, or use a Redis store)") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"scheduler pid {os.getpid()}")
    lock.flush()
    return lock


def _group_v1(group: object, task_id: str) -> bytes:
    """A version-1 snapshot's group (a JSON object) as the JSON bytes an older scheduler stored."""
    if not isinstance(group, dict):
        raise ValueError(f"group of task {task_id!r} must be an object in a version-1 snapshot")
    return json.dumps(group).encode()


def _group_v2(group: object, task_id: str) -> bytes:
    if not isinstance(group, str):
        raise ValueError(f"group of task {task_id!r} must be base64 text, got {type(group).__name__}")
    return base64.b64decode(group, validate=True)


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    return value


def _task_to_json(task: TaskRecord) -> dict:
    raw = dataclasses.asdict(task)
    raw["status"] = TaskStatus(task.status).value
    return raw


def _task_from_json(raw: dict) -> TaskRecord:
    if isinstance(raw, dict) and "failures" not in raw:
        raw = raw | {"failures": 0}  # written before tasks could fail
    if isinstance(raw, dict) and "expiries" not in raw:
        raw = raw | {"expiries": 0}  # written before expiries were counted
    if not isinstance(raw, dict) or set(raw) != set(_TASK_TYPES):
        raise ValueError(f"task record must have exactly the fields {sorted(_TASK_TYPES)}, got {raw!r}")
    values = {}
    for name, kind in _TASK_TYPES.items():
        value = raw[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # JSON written by hand may drop the ".0"
        elif kind is TaskStatus:
            value = TaskStatus(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"task {raw.get('task_id')!r}: field {name!r} must be {kind.__name__}, got {value!r}")
        values[name] = value
    return TaskRecord(**values)
