"""How a replica retries: which gRPC answers mean "try again", and the back-off (e3.retry) it waits with.

One setting for every call it makes (leasing, loading weights, scoring,
submitting), so that the replica behaves the same towards each service.
"""

from __future__ import annotations

import grpc

# Codes that mean "the scheduler is down or busy right now", not "you are wrong".
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
FIRST_DELAY_S, MAX_DELAY_S = 0.25, 8.0


def retryable_rpc(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRYABLE
