"""The Redis store: the scheduler's durable state in one Redis database.

Every key starts with `{namespace}:` (P below), so several runs can share a
database:

    P state               string  the state document, JSON
    P stats:attempts      hash    question id -> rollouts scored (HINCRBY)
    P stats:rewards       hash    question id -> reward sum (HINCRBYFLOAT)
    P ranks               hash    question id -> rank, repr(float)
    P steps               set     the planned steps
    P step:<n>:tasks      list    step n's task ids in plan order
    P step:<n>:groups     hash    task id -> finished group, the caller's bytes (binary)
    P step:<n>:failed     hash    task id -> failure record of a failed task, JSON
    P task:<id>           hash    one field per TaskRecord attribute, as text
    P queue               list    task ids waiting for a replica, front first
    P leases              zset    leased task ids scored by lease expiry
    P counters            hash    lease_expiries, duplicates
    P state:revision      string  the state document's "revision", set with it
    P fence               string  the fencing token, INCR'd by each new leader
    P leader              string  "<token> <holder>", expiring unless renewed

Fencing: a scheduler takes the leader key (acquire_leadership) and with it a
new fencing token; every state-changing script, and the state and ranks
writes, first check that the token is still the store's, in the same atomic
step, and refuse with StoreFenced otherwise.

Connections: redis:// or rediss:// (TLS) URLs, with the password in the URL
or passed as an option (the scheduler's `store_password` setting); redis-py
retries a dropped connection a few times, and what still fails is raised as
RedisUnavailable so that the scheduler answers "unavailable" and clients retry.
A command Redis refused without running it (out of memory, READONLY on a
replica after a failover, BUSY, LOADING) is sent again a few times with
back-off (e3.retry), then raised as RedisUnavailable too.
Groups are binary, so they are read on a second connection pool that hands
back bytes; everything else is text.

Operations that touch several keys and must not interleave (plan_step,
lease, renew, expire_leases, complete, fail, drop_step) are Lua scripts,
which Redis runs atomically. The scripts build task keys from the prefix, because which tasks
they touch is only known inside them; that is fine on one Redis server but
not on Redis Cluster. Floats cross into Redis as repr() text and are never
re-encoded inside Lua, whose number formatting would round them. The scripts
are in e3.store.redis_scripts.
"""

from __future__ import annotations

import functools
import json
import typing
import uuid
from typing import Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis

from e3.core.difficulty import QuestionStats
from e3.retry import call_with_retry
from e3.store import redis_scripts as lua
from e3.store.base import (
    FailOutcome,
    FailResult,
    LeaderClaim,
    RenewResult,
    StateConflict,
    StepAlreadyPlanned,
    StoreFenced,
    Store,
    StoreUnavailable,
    StoreCounters,
    SubmitOutcome,
    SubmitResult,
    TaskRecord,
    TaskStatus,
    check_history,
    check_plan,
    encode_completion,
    revision_of,
)

_TASK_TYPES = typing.get_type_hints(TaskRecord)
_TASK_FIELDS = list(_TASK_TYPES)  # task_id first: the plan script relies on it


class RedisUnavailable(StoreUnavailable):
    """The Redis server named by the URL could not be reached or refused us."""


# Failures that say "the server is not there right now" (down, restarting,
# still loading its AOF: BusyLoadingError is a ConnectionError, too slow),
# as opposed to a bug in a command. redis-py already retried these.
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
# Refusals of a command that did not run, which go away by themselves: out of
# memory (maxmemory), a read-only replica (during a failover), a script
# running too long (BUSY), a replica still loading or without its master.
# A Lua script is refused at its first write, before it changed anything, so
# every one of these is safe to send again: a few times, briefly, because
# the caller's own client retries the UNAVAILABLE that follows.
_REFUSED = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError, redis.exceptions.MasterDownError,
            redis.exceptions.TryAgainError)
_REFUSED_PREFIXES = ("BUSY ", "LOADING ", "MASTERDOWN ", "NOREPLICAS ", "TRYAGAIN ")
REFUSED_ATTEMPTS = 4  # waits of 0.05, 0.1, 0.2 s between them
_FENCED = "E3FENCED"  # the error reply of redis_scripts.FENCE_GUARD


def _refused(exc: BaseException) -> bool:
    return isinstance(exc, _REFUSED) or (isinstance(exc, redis.ResponseError) and str(exc).startswith(_REFUSED_PREFIXES))


def _translate_errors(method):
    """Retry a refused command (_REFUSED) with back-off; re-raise a transient failure, or a
    refusal that outlasts the retries, as RedisUnavailable naming the operation."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return call_with_retry(lambda: method(self, *args, **kwargs), _refused, REFUSED_ATTEMPTS,
                                   first_delay_s=0.05, max_delay_s=0.2)
        except _TRANSIENT as exc:
            raise RedisUnavailable(f"Redis at {self.url} failed during {method.__name__}: {exc}") from exc
        except redis.ResponseError as exc:
            if str(exc).startswith(_FENCED):
                raise StoreFenced(self._token, str(exc)[len(_FENCED):].strip()) from None
            if not _refused(exc):
                raise
            raise RedisUnavailable(f"Redis at {self.url} refused {method.__name__} {REFUSED_ATTEMPTS} times: "
                                   f"{type(exc).__name__}: {exc}") from exc

    return wrapper


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, fit for logs and errors."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "<unparseable redis URL>"


class RedisStore(Store):
    """See the module docstring for the key layout. Transient server failures
    surface as RedisUnavailable (a StoreUnavailable) from every method."""

    def __init__(self, url: str, namespace: str = "e3", **options: typing.Any) -> None:
        """Connect to `url` (redis:// or rediss://); `options` go to redis.from_url
        (TLS files, timeouts...). Raises RedisUnavailable if the server does not answer."""
        if not namespace or ":" in namespace:
            raise ValueError(f"namespace must be a non-empty name without ':', got {namespace!r}")
        self.url = mask_url(url)
        self._p = f"{namespace}:"
        options.setdefault("socket_connect_timeout", 5.0)
        # Without a read timeout a hung server (stopped, swapping) would hang every
        # scheduler call with it; with one, the call fails as unavailable and is retried.
        options.setdefault("socket_timeout", 10.0)
        try:
            self._r = redis.Redis.from_url(url, decode_responses=True, **options)
            self._r.ping()
            self._raw = redis.Redis.from_url(url, decode_responses=False, **options)  # groups are binary
        except (redis.RedisError, ValueError, OSError) as exc:
            raise RedisUnavailable(f"cannot use Redis at {self.url}: {exc}") from exc
        self._token = 0  # this handle's fencing token; 0: never acquired, writes unfenced
        self._holder = ""
        fenced = self._fenced_script
        self._plan = fenced(lua.PLAN_STEP)
        self._extend = fenced(lua.EXTEND_STEP)
        self._record_groups = fenced(lua.RECORD_GROUPS)
        self._lease = fenced(lua.LEASE)
        self._expire = fenced(lua.EXPIRE)
        self._complete = fenced(lua.COMPLETE)
        self._drop = fenced(lua.DROP_STEP)
        self._release = fenced(lua.RELEASE)
        self._renew = fenced(lua.RENEW)
        self._fail = fenced(lua.FAIL)
        self._save_state = fenced(lua.SAVE_STATE)
        self._acquire_leader = self._r.register_script(lua.ACQUIRE_LEADER)
        self._renew_leader = self._r.register_script(lua.RENEW_LEADER)
        self._release_leader = self._r.register_script(lua.RELEASE_LEADER)

    def _fenced_script(self, body: str):
        """A script behind the fence guard, called as script(args=[prefix, ...]) like the unguarded ones."""
        script = self._r.register_script(lua.FENCE_GUARD + body)

        def call(args: list):
            return script(args=[args[0], str(self._token) if self._token else "", *args[1:]])
        return call

    # --- leadership ---
    def acquire_leadership(self, holder: str, ttl_s: float) -> LeaderClaim:
        if not holder:
            raise ValueError("holder must be a non-empty name")
        reply = self._acquire_leader(args=[self._p, holder, _ms(ttl_s)])
        if reply[0] != "acquired":
            return LeaderClaim(False, 0, str(reply[1]), max(int(reply[2]), 0) / 1000.0)
        self._token, self._holder = int(reply[1]), holder
        return LeaderClaim(True, self._token, holder, float(ttl_s))

    def renew_leadership(self, ttl_s: float) -> None:
        if not self._token:
            raise ValueError("renew_leadership before acquire_leadership")
        reply = self._renew_leader(args=[self._p, str(self._token), self._holder, _ms(ttl_s)])
        if reply[0] != "ok":
            raise StoreFenced(self._token, str(reply[1]))

    def release_leadership(self) -> None:
        if self._token:
            self._release_leader(args=[self._p, str(self._token)])

    # --- state, statistics, ranks ---
    def load_state(self) -> dict | None:
        text = self._r.get(self._p + "state")
        return None if text is None else json.loads(text)

    def save_state(self, state: dict, expected_revision: int | None = None) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        revision = revision_of(state)
        expected = "" if expected_revision is None else str(int(expected_revision))
        reply = self._save_state(args=[self._p, expected, str(revision), json.dumps(state)])
        if reply[0] == "conflict":
            raise StateConflict(int(expected_revision), int(reply[1]))

    def state_revision(self) -> int:
        return int(self._r.get(self._p + "state:revision") or 0)

    def stats(self, question_ids: Sequence[str]) -> dict[str, QuestionStats]:
        ids = list(question_ids)
        if not ids:
            return {}
        # One MULTI so the two hashes are read at the same instant.
        pipe = self._r.pipeline(transaction=True)
        pipe.hmget(self._p + "stats:attempts", ids)
        pipe.hmget(self._p + "stats:rewards", ids)
        attempts, rewards = pipe.execute()
        return {q: QuestionStats(int(a), float(r)) for q, a, r in zip(ids, attempts, rewards) if a is not None}

    def all_stats(self) -> dict[str, QuestionStats]:
        pipe = self._r.pipeline(transaction=True)
        pipe.hgetall(self._p + "stats:attempts")
        pipe.hgetall(self._p + "stats:rewards")
        attempts, rewards = pipe.execute()
        return {q: QuestionStats(int(a), float(rewards[q])) for q, a in attempts.items()}

    def save_ranks(self, ranks: dict[str, float]) -> None:
        mapping = {str(q): repr(float(r)) for q, r in ranks.items()}
        fence = self._p + "fence"
        with self._r.pipeline(transaction=True) as pipe:
            # WATCH the fence, check it, then MULTI: a successor's INCR in between aborts the
            # write (WatchError), and the check below then reports the takeover.
            for _ in range(3):
                try:
                    pipe.watch(fence)
                    current = pipe.get(fence)
                    if self._token and current != str(self._token):
                        raise StoreFenced(self._token, str(current))
                    pipe.multi()  # readers never see half old, half new
                    pipe.delete(self._p + "ranks")
                    if mapping:
                        pipe.hset(self._p + "ranks", mapping=mapping)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue
            raise StoreFenced(self._token, str(self._r.get(fence)))

    def ranks(self) -> dict[str, float]:
        return {q: float(r) for q, r in self._r.hgetall(self._p + "ranks").items()}

    # --- tasks and leases ---
    def _tasks_args(self, step: int, tasks: Sequence[TaskRecord]) -> list[str]:
        """PLAN_STEP's and EXTEND_STEP's arguments: prefix, step, the field names once, then each task's values."""
        args: list[str] = [self._p, str(int(step)), str(len(_TASK_FIELDS)), *_TASK_FIELDS]
        for task in tasks:
            args.extend(_task_to_text(task))
        return args

    def plan_step(self, step: int, tasks: Sequence[TaskRecord]) -> None:
        check_plan(step, tasks)
        reply = self._plan(args=self._tasks_args(step, tasks))
        if reply[0] == "planned":
            raise StepAlreadyPlanned(f"step {step} is already planned")
        if reply[0] == "exists":
            raise ValueError(f"task id {reply[1]!r} already exists in this store")

    def extend_step(self, step: int, tasks: Sequence[TaskRecord]) -> None:
        check_plan(step, tasks)
        if not tasks:
            return
        reply = self._extend(args=self._tasks_args(step, tasks))
        if reply[0] == "unplanned":
            raise ValueError(f"step {step} is not planned: only a planned step takes a further round")
        if reply[0] == "exists":
            raise StepAlreadyPlanned(f"task {reply[1]!r} of step {step}'s further round exists already")

    def record_groups(self, step: int, groups: Mapping[str, tuple[int, int]], keep: int) -> None:
        check_history(groups, keep)
        if not groups:
            return
        args = [self._p, str(int(step)), str(int(keep))]
        for question_id, (rollouts, successes) in groups.items():
            args += [question_id, f"{rollouts}:{successes}"]
        self._record_groups(args=args)

    def recent_groups(self, question_ids: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
        if not question_ids:
            return {}
        out: dict[str, list[tuple[int, int]]] = {}
        for question_id, raw in zip(question_ids, self._r.hmget(self._p + "history", list(question_ids))):
            if raw:
                items = raw.partition("|")[2]
                out[question_id] = [(int(r), int(s)) for r, _, s in (i.partition(":") for i in items.split(",") if i)]
        return out

    def lease(self, replica_id: str, max_tasks: int, now: float, lease_s: float) -> list[TaskRecord]:
        if max_tasks <= 0:
            return []
        expires = repr(float(now) + float(lease_s))
        reply = self._lease(args=[self._p, replica_id, expires, max_tasks, uuid.uuid4().hex])
        return [_task_from_text(dict(zip(flat[::2], flat[1::2]))) for flat in reply]

    def expire_leases(self, now: float, max_expiries: int = 0) -> list[str]:
        return list(self._expire(args=[self._p, repr(float(now)), int(max_expiries)]))

    def release(self, replica_id: str) -> list[str]:
        return list(self._release(args=[self._p, replica_id]))

    def renew(self, replica_id: str, leases: Sequence[tuple[str, str]], now: float, lease_s: float) -> RenewResult:
        expires = float(now) + float(lease_s)
        pairs = [(str(task_id), str(lease_id)) for task_id, lease_id in leases]
        if not pairs:
            return RenewResult([], [], expires)
        held = set(self._renew(args=[self._p, replica_id, repr(expires), *(x for pair in pairs for x in pair)]))
        return RenewResult([t for t, _ in pairs if t in held], [t for t, _ in pairs if t not in held], expires)

    def fail(self, task_id: str, lease_id: str, replica_id: str, reason: str, detail: str, max_failures: int) -> FailResult:
        outcome, failures, done, planned = self._fail(
            args=[self._p, task_id, lease_id, replica_id, reason, detail, int(max_failures)])
        return FailResult(FailOutcome(outcome), int(failures), int(done), int(planned))

    def leases(self) -> list[TaskRecord]:
        ids = self._r.zrange(self._p + "leases", 0, -1)
        pipe = self._r.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self._p + "task:" + task_id)
        # A task completed between the two reads has left the leases: skip it.
        return [t for t in map(_task_or_none, pipe.execute()) if t is not None and t.status == TaskStatus.LEASED]

    def complete(self, task_id: str, group: bytes, rewards: Sequence[float], lease: tuple[str, str] | None = None
                 ) -> SubmitResult:
        group_bytes, count, total = encode_completion(group, rewards)
        replica, lease_id = lease if lease is not None else ("", "")
        if lease is not None and not replica:
            raise ValueError("a lease to check names its replica")
        outcome, done, planned = self._complete(args=[self._p, task_id, group_bytes, count, repr(total), replica,
                                                      lease_id])
        return SubmitResult(SubmitOutcome(outcome), int(done), int(planned))

    def task(self, task_id: str) -> TaskRecord | None:
        fields = self._r.hgetall(self._p + "task:" + task_id)
        return _task_from_text(fields) if fields else None

    def step_progress(self, step: int) -> tuple[int, int]:
        pipe = self._r.pipeline(transaction=True)
        pipe.hlen(f"{self._p}step:{int(step)}:groups")
        pipe.hlen(f"{self._p}step:{int(step)}:failed")
        pipe.llen(f"{self._p}step:{int(step)}:tasks")
        done, failed, planned = pipe.execute()
        return int(done) + int(failed), int(planned)

    def finished_among(self, step: int, task_ids: Sequence[str]) -> int:
        # HEXISTS, not HMGET: the answer is a count, and the groups themselves are kilobytes each.
        ids = sorted(set(task_ids))
        pipe = self._r.pipeline(transaction=True)
        for task_id in ids:
            pipe.hexists(f"{self._p}step:{int(step)}:groups", task_id)
            pipe.hexists(f"{self._p}step:{int(step)}:failed", task_id)
        found = pipe.execute()
        return sum(1 for i in range(len(ids)) if found[2 * i] or found[2 * i + 1])

    def step_groups(self, step: int) -> list[bytes]:
        pipe = self._raw.pipeline(transaction=True)
        pipe.lrange(f"{self._p}step:{int(step)}:tasks", 0, -1)
        pipe.hgetall(f"{self._p}step:{int(step)}:groups")
        order, groups = pipe.execute()  # bytes keys and values
        return [groups[t] for t in order if t in groups]

    def step_failures(self, step: int) -> list[dict]:
        pipe = self._r.pipeline(transaction=True)
        pipe.lrange(f"{self._p}step:{int(step)}:tasks", 0, -1)
        pipe.hgetall(f"{self._p}step:{int(step)}:failed")
        order, failed = pipe.execute()
        return [json.loads(failed[t]) for t in order if t in failed]

    def drop_step(self, step: int) -> None:
        self._drop(args=[self._p, str(int(step))])

    def queue_depth(self) -> int:
        return int(self._r.llen(self._p + "queue"))

    def leased_count(self) -> int:
        return int(self._r.zcard(self._p + "leases"))

    def counters(self) -> StoreCounters:
        raw = self._r.hgetall(self._p + "counters")
        return StoreCounters(lease_expiries=int(raw.get("lease_expiries", 0)), duplicates=int(raw.get("duplicates", 0)))

    def close(self) -> None:
        self._r.close()
        self._raw.close()


for _name in Store.__abstractmethods__:
    setattr(RedisStore, _name, _translate_errors(getattr(RedisStore, _name)))


def _ms(seconds: float) -> str:
    """A lease length as whole milliseconds for Redis's PX, at least 1."""
    return str(max(int(round(float(seconds) * 1000)), 1))


def _task_to_text(task: TaskRecord) -> list[str]:
    """The record's attributes as Redis strings, in _TASK_FIELDS order."""
    out = []
    for name, kind in _TASK_TYPES.items():
        value = getattr(task, name)
        if kind is float:
            out.append(repr(float(value)))  # repr round-trips a float exactly
        elif kind is TaskStatus:
            out.append(TaskStatus(value).value)
        else:
            out.append(str(kind(value)))
    return out


def _task_or_none(fields: dict[str, str]) -> TaskRecord | None:
    return _task_from_text(fields) if fields else None


def _task_from_text(fields: dict[str, str]) -> TaskRecord:
    if fields and "failures" not in fields:
        fields = fields | {"failures": "0"}  # written before tasks could fail
    if fields and "expiries" not in fields:
        fields = fields | {"expiries": "0"}  # written before expiries were counted
    try:
        return TaskRecord(**{name: kind(fields[name]) for name, kind in _TASK_TYPES.items()})
    except (KeyError, ValueError) as exc:
        raise ValueError(f"malformed task hash {fields.get('task_id')!r} in Redis: {exc!r}") from exc
