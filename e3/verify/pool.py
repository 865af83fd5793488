"""A pool of long-lived worker processes that run answer checks under a hard time limit.

Why processes, and why kill: math-verify's own timeout is SIGALRM, which
cannot interrupt sympy's C-level arithmetic (9^{9^{9^9}} or (10^{10})! spin
for minutes), and a thread cannot be stopped at all. So every check runs in a
worker process; when one overruns, the caller kills that worker and forks a
fresh one. Workers come from a "forkserver" that has already imported sympy
and math-verify, so a replacement is ready in milliseconds, and forking never
happens from the multi-threaded service process itself.

A user's reward function ("python:package.module:function", see
e3.verify.python_reward) runs the same way: imported and called inside a
worker, under the same time limit and memory cap, from the directories of
`python_path` only.

Each worker serves one check at a time; `verify` is safe to call from many
threads, which queue for an idle worker. Time spent queueing does not count
against the limit. Requests and verdicts cross the pipe as JSON bytes, not
pickles (Connection.send/recv would unpickle whatever a worker wrote).
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from e3.tasks.question import check_verifier
from e3.verify.python_reward import PythonRewards, add_to_path
from e3.verify.verdict import ERROR_PREFIX, TIMEOUT_PREFIX, Verdict

# Verifier name -> module with `check(response, ground_truth) -> (reward, reason)`.
CHECKERS = {"arithmetic": "e3.verify.arithmetic", "math": "e3.verify.math"}

# Reasoning traces run to tens of thousands of characters; megabytes are junk
# that would only cost encoding and scanning time.
DEFAULT_MAX_RESPONSE_CHARS = 200_000
# A worker that tries to materialise a huge integer gets MemoryError (a clean
# "error" verdict) instead of pushing the host into swap before the timeout.
DEFAULT_MEMORY_LIMIT_BYTES = 2 << 30
_READY = "ready"
_START_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


def _limit_memory(limit_bytes: int | None) -> None:
    if not limit_bytes:
        return
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    except (ImportError, ValueError, OSError) as exc:  # not fatal: the timeout still holds
        log.warning("could not cap worker memory at %d bytes: %s", limit_bytes, exc)


def _send(conn: Connection, message) -> None:
    # ensure_ascii escapes lone surrogates, which UTF-8 could not encode.
    conn.send_bytes(json.dumps(message).encode("ascii"))


def _recv(conn: Connection):
    return json.loads(conn.recv_bytes())


def _worker_main(conn: Connection, memory_limit_bytes: int | None, python_path: list[str]) -> None:
    """Serve (verifier, response, ground_truth) requests until the pipe closes."""
    _limit_memory(memory_limit_bytes)
    add_to_path(python_path)
    python_rewards = PythonRewards(python_path)
    # math-verify logs every unparseable answer and warns that we disabled its
    # timeouts; the verdict's reason already carries what matters.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    _send(conn, _READY)
    while True:
        try:
            verifier, response, ground_truth = _recv(conn)
        except EOFError:
            return
        if verifier not in CHECKERS:  # a python: name; PythonRewards turns every failure into a verdict
            _send(conn, list(python_rewards.score(verifier, response, ground_truth)))
            continue
        try:
            check = importlib.import_module(CHECKERS[verifier]).check
            reward, reason = check(response, ground_truth)
        except MemoryError:
            reward, reason = 0.0, f"{ERROR_PREFIX}: out of memory"
        except RecursionError:
            reward, reason = 0.0, f"{ERROR_PREFIX}: expression nested too deeply"
        except Exception as exc:  # reported in the verdict, never raised to the caller
            reward, reason = 0.0, f"{ERROR_PREFIX}: {type(exc).__name__}: {exc}"[:300]
        _send(conn, [float(reward), reason])


@dataclass(eq=False)  # identity hashing: workers live in a set
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection


class VerifierPool:
    """`workers` long-lived checker processes; `verify` blocks for at most ~`timeout_s`
    once a worker is free, and always returns a Verdict for a well-formed verifier name
    (python: functions are imported from `python_path` only)."""

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 2.0,
        max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS,
        memory_limit_bytes: int | None = DEFAULT_MEMORY_LIMIT_BYTES,
        python_path: tuple[str, ...] | list[str] = (),
    ) -> None:
        if workers < 1:
            raise ValueError(f"VerifierPool: workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"VerifierPool: timeout_s must be > 0, got {timeout_s}")
        if max_response_chars < 1:
            raise ValueError(f"VerifierPool: max_response_chars must be >= 1, got {max_response_chars}")
        self.workers = workers
        self.timeout_s = timeout_s
        self.max_response_chars = max_response_chars
        self._memory_limit = memory_limit_bytes
        # Absolute, so that a worker's import path does not depend on its working directory.
        self.python_path = [str(Path(p).resolve()) for p in python_path]
        self._ctx = mp.get_context("forkserver")
        # Preloading is what makes replacements cheap; an import that fails here
        # (say, a task module not yet installed) fails again, reported, per check.
        self._ctx.set_forkserver_preload(["e3.verify.pool", *CHECKERS.values()])
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(workers):
            self._idle.put(self._spawn())

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main, args=(child, self._memory_limit, self.python_path), name="e3-verify-worker", daemon=True
        )
        process.start()
        child.close()  # so the parent sees EOF if the worker dies
        if not parent.poll(_START_TIMEOUT_S) or _recv(parent) != _READY:
            process.kill()
            raise RuntimeError(f"verifier worker pid {process.pid} did not start within {_START_TIMEOUT_S}s")
        worker = _Worker(process, parent)
        with self._lock:
            self._all.add(worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        with self._lock:
            self._all.discard(worker)
        worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()

    def verify(self, verifier: str, response: str, ground_truth: str, timeout_s: float | None = None) -> Verdict:
        """Score one response; a malformed verifier name -> ValueError, anything else -> a Verdict."""
        check_verifier(verifier)
        if not isinstance(response, str) or not isinstance(ground_truth, str):
            raise TypeError(
                f"response and ground_truth must be str, got {type(response).__name__} "
                f"and {type(ground_truth).__name__}"
            )
        limit = self.timeout_s if timeout_s is None else timeout_s
        if limit <= 0:
            raise ValueError(f"timeout_s must be > 0, got {limit}")
        if len(response) > self.max_response_chars:
            return Verdict(0.0, f"response too long ({len(response)} chars > {self.max_response_chars})", 0.0)
        worker = self._take()
        start = time.perf_counter()
        try:
            _send(worker.conn, [verifier, response, ground_truth])
            if worker.conn.poll(limit):
                reward, reason = _recv(worker.conn)
                self._idle.put(worker)
                return Verdict(reward, reason, time.perf_counter() - start)
            reason = f"{TIMEOUT_PREFIX} after {limit:g}s" + ("" if verifier in CHECKERS else f": {verifier}")
        except (EOFError, OSError) as exc:  # the worker died mid-check (killed by the OS, say)
            reason = (f"{ERROR_PREFIX}: verifier worker died in {verifier} "
                      f"({type(exc).__name__}, exit code {worker.process.exitcode})")
        except BaseException:
            self._replace(worker)  # interrupted mid-check: its state is unknown
            raise
        elapsed = time.perf_counter() - start
        self._replace(worker)
        return Verdict(0.0, reason, elapsed)

    def _take(self) -> _Worker:
        # Wake up now and then so that a caller queued behind a closed pool
        # gets an error instead of waiting forever (and blocking interpreter exit).
        while not self._closed:
            try:
                return self._idle.get(timeout=0.5)
            except queue.Empty:
                continue
        raise RuntimeError("VerifierPool is closed")

    def _replace(self, worker: _Worker) -> None:
        # The worker may still be computing, so it is killed and a fresh one
        # takes its place before anyone else can be handed it.
        self._retire(worker)
        if self._closed:
            return
        fresh = self._spawn()
        if self._closed:  # closed while we were spawning: do not leak it
            self._retire(fresh)
        else:
            self._idle.put(fresh)

    @property
    def alive(self) -> int:
        """How many workers are running (equals `workers` unless a respawn failed)."""
        with self._lock:
            return sum(1 for w in self._all if w.process.is_alive())

    def close(self) -> None:
        """Kill every worker; further `verify` calls raise RuntimeError."""
        self._closed = True
        with self._lock:
            workers = list(self._all)
        for worker in workers:
            self._retire(worker)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
