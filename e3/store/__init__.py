"""The scheduler's store: pick a backend by URL with `open_store`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e3.store.base import (
    FailOutcome,
    FailResult,
    LeaderClaim,
    RenewResult,
    StateConflict,
    StepAlreadyPlanned,
    Store,
    StoreCounters,
    StoreFenced,
    StoreUnavailable,
    SubmitOutcome,
    SubmitResult,
    TaskRecord,
    TaskStatus,
)
from e3.store.memory import MemoryStore, SnapshotError
from e3.store.redis_store import RedisStore, RedisUnavailable, mask_url

__all__ = [
    "FailOutcome",
    "FailResult",
    "LeaderClaim",
    "MemoryStore",
    "RedisStore",
    "RedisUnavailable",
    "RenewResult",
    "SnapshotError",
    "StateConflict",
    "StepAlreadyPlanned",
    "Store",
    "StoreCounters",
    "StoreFenced",
    "StoreUnavailable",
    "SubmitOutcome",
    "SubmitResult",
    "TaskRecord",
    "TaskStatus",
    "open_store",
]


def open_store(url: str, *, namespace: str = "e3", **redis_options: Any) -> Store:
    """The store a URL names.

    memory://                      in-process, nothing kept after exit
    memory:///abs/snapshot.json    in-process, snapshot at an absolute path
    memory://./relative.json       in-process, snapshot relative to the cwd
    redis://[:password@]host:port/db, rediss://...   RedisStore under `namespace`;
                                   `redis_options` go to redis.from_url (password=,
                                   ssl_ca_certs=, ssl_certfile=, ssl_keyfile=...)
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme == "memory":
        if redis_options:
            raise ValueError(f"options {sorted(redis_options)} apply to Redis URLs only, not to {url!r}")
        return MemoryStore(Path(rest) if rest else None)
    if sep and scheme in ("redis", "rediss"):
        return RedisStore(url, namespace, **redis_options)
    raise ValueError(f"unsupported store URL {mask_url(url)!r}: expected memory://[path] or redis[s]://host:port/db")
