"""The scheduler's hold on its run: take the leader lease at start, keep it, stop when it is lost.

A second scheduler on the same run (a Deployment rollout, a stuck pod and
its replacement) waits in `take_run` until the first one's lease is
released or runs out; it then takes the run with a new fencing token, and
every write of the first one is refused from then on (e3.store: fencing).
`LeaderKeeper` renews the lease every third of its length, and each time
asks the engine to compare its run state with the store's
(services.scheduler.reconcile); a renewal refused because a successor took
over halts the engine, which stops the process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from e3.store import LeaderClaim, Store, StoreFenced, StoreUnavailable

log = logging.getLogger("scheduler")
WAIT_LOG_EVERY_S = 5.0


def holder_name() -> str:
    """A name no other scheduler process has: host, pid and a random part."""
    return f"{socket.gethostname()}/pid-{os.getpid()}/{uuid.uuid4().hex[:8]}"


def take_run(store: Store, holder: str, lease_s: float, stop: threading.Event) -> LeaderClaim | None:
    """Wait until this process holds the run's leader lease; None if `stop` is set first."""
    logged = 0.0
    while not stop.is_set():
        try:
            claim = store.acquire_leadership(holder, lease_s)
        except StoreUnavailable as exc:
            log.warning("cannot take the run's leader lease yet: %s", exc)
            stop.wait(1.0)
            continue
        if claim.acquired:
            log.info("holding the run as %s (fencing token %d, lease %.3g s)", holder, claim.token, lease_s)
            return claim
        if time.monotonic() - logged >= WAIT_LOG_EVERY_S:
            log.warning("waiting for the run: scheduler %s holds its leader lease for %.1f s more (it renews it "
                        "while alive; stop it, or wait)", claim.holder, claim.expires_in_s)
            logged = time.monotonic()
        stop.wait(min(max(claim.expires_in_s, 0.05), 1.0))
    return None


class LeaderKeeper(threading.Thread):
    """Renews the lease and reconciles with the store until stopped, or until the run is lost."""

    def __init__(self, store: Store, engine, lease_s: float, stop: threading.Event) -> None:
        super().__init__(name="leader-keeper", daemon=True)
        self.store, self.engine, self.lease_s, self.stop = store, engine, lease_s, stop

    def run(self) -> None:
        while not self.stop.wait(self.lease_s / 3):
            try:
                self.store.renew_leadership(self.lease_s)
                self.engine.check_store()
            except StoreFenced as exc:
                self.engine.halt(str(exc))
                return
            except StoreUnavailable as exc:
                # Not fatal: if the lease runs out meanwhile and a successor takes the run,
                # every write of this scheduler is refused anyway (the token is checked with it).
                log.warning("renewing the leader lease failed (will retry): %s", exc)
            except Exception:  # noqa: BLE001 - the keeper must outlive one bad check
                log.exception("checking the run state against the store failed")
            if self.engine.halted:
                return
