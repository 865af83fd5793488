"""Answer verification: turn (verifier, response, ground truth) into a reward in [0, 1].

The built-in verifiers ("arithmetic", "math") give 0 or 1; a user's
"python:package.module:function" (e3.verify.python_reward) may give partial
credit, and runs only from the directories a pool is given as `python_path`.

`verify` is the one-call entry point; it uses a process-wide `VerifierPool`
started on first use. A service that wants its own worker count, size caps
or lifetime creates a `VerifierPool` and calls `pool.verify` instead.
"""

from __future__ import annotations

import atexit
import os
import threading

from e3.tasks.question import check_verifier
from e3.verify.pool import CHECKERS, VerifierPool
from e3.verify.verdict import Verdict

VERIFIERS = tuple(CHECKERS)

__all__ = ["VERIFIERS", "Verdict", "VerifierPool", "verify"]

_default_pool: VerifierPool | None = None
_default_lock = threading.Lock()


def _pool() -> VerifierPool:
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            # Two workers keep one slow check from stalling everything without
            # oversubscribing small machines.
            _default_pool = VerifierPool(workers=min(2, os.cpu_count() or 1))
            atexit.register(_default_pool.close)
        return _default_pool


def verify(verifier: str, response: str, ground_truth: str, timeout_s: float = 2.0) -> Verdict:
    """Score `response` against `ground_truth` with the named verifier, killing the
    check after `timeout_s`. A malformed name -> ValueError; every other failure is
    a Verdict with reward 0 and a reason. The default pool has no python_path, so
    a python: name scores 0 with a reason saying so."""
    check_verifier(verifier)
    return _pool().verify(verifier, response, ground_truth, timeout_s=timeout_s)
