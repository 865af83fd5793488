"""HTTP API of the reward service: a thin FastAPI layer over `e3.verify.VerifierPool`.

POST /v1/score   {"items": [{verifier, response, ground_truth}, ...]}
                 -> {"verdicts": [{reward, reason, elapsed_s}, ...]} in order
                 verifier: "arithmetic", "math" or "python:package.module:function"
                 (a malformed name is a 422 naming the item); reward in [0, 1]
GET  /healthz    the process is up
GET  /readyz     the worker pool is up (503 until then)
GET  /metrics    Prometheus text

Verification is blocking (a pipe round trip to a worker process), so each
item runs on one of as many threads as there are workers; the event loop
only awaits. Items of one batch run concurrently across the workers, and
the threads take items in turn from each client (the peer address) and each
request (services.reward.fair), so a small request never waits behind a
whole slow batch of another client.

Before FastAPI reads a /v1/score body, services.reward.body_limit checks the
token (401) and the body's size (413 over `max_body_bytes`, with or without
a Content-Length).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from e3.tasks.question import PYTHON_VERIFIER, check_verifier
from e3.verify import Verdict, VerifierPool
from services.common.auth import http_bearer
from services.common.http_guard import reject_unknown_query
from services.reward.body_limit import BodyLimit
from services.reward.fair import FairExecutor
from services.reward.metrics import RewardMetrics
from services.reward.settings import RewardSettings

log = logging.getLogger(__name__)


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The pattern documents the names in the OpenAPI schema; the validator gives the clear message.
    verifier: str = Field(json_schema_extra={"pattern": f"^(arithmetic|math|{PYTHON_VERIFIER.pattern})$"})
    response: str
    ground_truth: str

    @field_validator("verifier")
    @classmethod
    def _known_form(cls, value: str) -> str:
        return check_verifier(value)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The upper bound is a setting, so it is checked in the handler.
    items: list[ScoreItem] = Field(min_length=1)


class VerdictOut(BaseModel):
    reward: float
    reason: str | None
    elapsed_s: float


class ScoreResponse(BaseModel):
    verdicts: list[VerdictOut]


class _Service:
    """What the routes share: settings, the pool once started, the executor, the metrics."""

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self.pool: VerifierPool | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="e3-reward-start")  # starts the pool
        self.scoring = FairExecutor(settings.workers, name="e3-verify")
        self.metrics = RewardMetrics(CollectorRegistry())

    def start_pool(self) -> None:
        s = self.settings
        self.pool = VerifierPool(workers=s.workers, timeout_s=s.timeout_s, max_response_chars=s.max_response_chars,
                                 python_path=s.python_path)
        log.info("reward: %d verifier workers up (timeout %.3gs, python_path %s)", s.workers, s.timeout_s,
                 list(s.python_path))

    def score_one(self, item: ScoreItem) -> Verdict:
        verdict = self.pool.verify(item.verifier, item.response, item.ground_truth)
        self.metrics.record(item.verifier, verdict)
        return verdict

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.scoring.shutdown()
        if self.pool is not None:
            self.pool.close()


def create_app(settings: RewardSettings) -> FastAPI:
    service = _Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Starting workers blocks for a moment; doing it in the background
        # lets /healthz answer at once while /readyz says "not yet".
        loop = asyncio.get_running_loop()
        starting = loop.run_in_executor(service.executor, service.start_pool)
        starting.add_done_callback(_log_start_failure)
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="e3 reward", lifespan=lifespan, dependencies=[Depends(reject_unknown_query)])
    app.state.service = service

    @app.post(
        "/v1/score", response_model=ScoreResponse, dependencies=[Depends(http_bearer(settings.api_token))],
        responses={400: {"description": "the body is not JSON"}, 401: {"description": "missing or wrong bearer token"},
                   413: {"description": "the body is over max_body_bytes"}, 503: {"description": "workers still starting"}},
    )
    async def score(request: ScoreRequest, http: Request) -> ScoreResponse:
        if len(request.items) > settings.max_batch:
            raise RequestValidationError(
                [
                    {
                        "type": "too_long",
                        "loc": ("body", "items"),
                        "msg": f"at most {settings.max_batch} items per request, got {len(request.items)}",
                        "input": None,
                    }
                ]
            )
        if service.pool is None:
            raise HTTPException(503, "verifier workers are still starting", headers={"Retry-After": "1"})
        client = http.client.host if http.client else "unknown"
        calls = [functools.partial(service.score_one, item) for item in request.items]
        verdicts = await asyncio.gather(*map(asyncio.wrap_future, service.scoring.submit_all(client, calls)))
        return ScoreResponse(
            verdicts=[VerdictOut(reward=v.reward, reason=v.reason, elapsed_s=v.elapsed_s) for v in verdicts]
        )

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready yet (a probe answer, not a failure)"}})
    async def readyz(response: Response) -> dict:
        pool = service.pool
        alive = 0 if pool is None else pool.alive
        ready = alive == settings.workers
        if not ready:
            response.status_code = 503
        return {"ready": ready, "workers_alive": alive, "workers": settings.workers}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # Outermost, so that it runs before FastAPI reads the body.
    app.add_middleware(BodyLimit, token=settings.api_token, max_body_bytes=settings.max_body_bytes)
    return app


def _log_start_failure(future: asyncio.Future) -> None:
    # Without this, a failed start would only show as /readyz staying 503.
    if not future.cancelled() and future.exception() is not None:
        log.error("reward: verifier workers failed to start: %r", future.exception())
