"""A replica's calls to the reward service: one batch of completions scored per call, retried until a deadline.

A 5xx answer or a transport error (the service restarting) is retried with
e3.retry's back-off until the next wait would pass the deadline, which the
caller reads again before every wait (the leases' current, renewed expiry
less a margin); any other refusal, and the last failure, raise RewardError.
"""

from __future__ import annotations

import logging
from typing import Callable

import httpx

from e3.retry import retry_async
from services.generation.metrics import GenerationMetrics
from services.generation.retry_policy import FIRST_DELAY_S, MAX_DELAY_S

log = logging.getLogger(__name__)


class RewardError(Exception):
    """The reward service could not score a batch in time, or refused it."""


class RewardUnavailable(Exception):
    """One scoring call failed in a way worth retrying (a 5xx answer, a transport error)."""


class RewardClient:
    def __init__(self, http: httpx.AsyncClient, base_url: str, token: str | None, timeout_s: float,
                 metrics: GenerationMetrics) -> None:
        self.http, self.timeout_s, self.metrics = http, timeout_s, metrics
        self.url = base_url.rstrip("/") + "/v1/score"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def _score_once(self, items: list[dict]) -> list[dict]:
        try:
            response = await self.http.post(self.url, json={"items": items}, headers=self.headers, timeout=self.timeout_s)
        except httpx.TransportError as exc:
            raise RewardUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500:
            raise RewardUnavailable(f"HTTP {response.status_code}")
        if response.status_code != 200:
            raise RewardError(f"reward service refused the batch: HTTP {response.status_code} {response.text[:300]}")
        verdicts = response.json()["verdicts"]
        if len(verdicts) != len(items):
            raise RewardError(f"reward service returned {len(verdicts)} verdicts for {len(items)} items")
        return verdicts

    async def score(self, items: list[dict], deadline: Callable[[], float]) -> list[dict]:
        """One verdict per item, in order; `deadline()` is unix seconds, read before every wait."""

        def retrying(exc: BaseException, delay: float) -> None:
            self.metrics.reward_retry()
            log.warning("reward service at %s: %s; retrying in %.2fs", self.url, exc, delay)

        try:
            return await retry_async(lambda: self._score_once(items), lambda exc: isinstance(exc, RewardUnavailable),
                                     first_delay_s=FIRST_DELAY_S, max_delay_s=MAX_DELAY_S, deadline=deadline,
                                     on_retry=retrying)
        except RewardUnavailable as exc:
            raise RewardError(f"reward service at {self.url} still failing at the lease deadline ({exc})") from exc
