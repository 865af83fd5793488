"""The sizes a client may send, in one place, and the checks that enforce them.

Every string, list and count a caller controls is bounded here, because the
scheduler copies some of them into the store (a replica id rides in every
task it leases) and the store is shared by the whole run. A value over its
limit is refused with a message naming the field, the limit and the size
sent; the gRPC handlers answer it with INVALID_ARGUMENT, the HTTP services
with 413 (a body) or 422 (a field).
"""

from __future__ import annotations

MAX_ID_BYTES = 256  # replica_id, task_id, lease_id, trainer_id, question ids (UTF-8 bytes)
MAX_REASON_BYTES = 256  # a sample's reward_reason and finish_reason
MAX_DETAIL_BYTES = 8 * 1024  # free text beside an id, e.g. a failure's detail
MAX_PATH_BYTES = 4096  # a weights path (PATH_MAX on Linux)
MAX_TEXT_BYTES = 4 * 1024 * 1024  # a sample's response text
MAX_TOKENS_PER_LIST = 1 << 20  # prompt or response token ids, or logprobs, of one sample
MAX_SAMPLES_PER_GROUP = 4096  # samples in one SubmitGroup
MAX_METRICS = 1024  # entries in a ReportStep's metrics map
MAX_BATCH_WAITERS = 4  # StreamBatch calls that may wait at once (of 16 gRPC threads)
MAX_REWARD_BODY_BYTES = 64 * 1024 * 1024  # one POST /v1/score body


class LimitExceeded(ValueError):
    """A client sent more than a limit allows; the message names the field and the limit."""


def check_bytes(field: str, value: str, limit: int) -> None:
    """Refuse a string longer than `limit` UTF-8 bytes, naming `field`."""
    if len(value) * 4 <= limit:  # no string of this many characters can be over the limit
        return
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise LimitExceeded(f"{field} is {size} bytes; at most {limit} are allowed")


def check_id(field: str, value: str) -> None:
    """A non-empty id of at most MAX_ID_BYTES bytes."""
    if not value:
        raise LimitExceeded(f"{field} must be non-empty")
    check_bytes(field, value, MAX_ID_BYTES)


def check_count(field: str, count: int, limit: int) -> None:
    """Refuse a list or map with more than `limit` entries, naming `field`."""
    if count > limit:
        raise LimitExceeded(f"{field} has {count} entries; at most {limit} are allowed")
