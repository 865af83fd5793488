"""A replica's HTTP face: /healthz, /readyz, /metrics.

/healthz is liveness: it fails (503, with the reason) once the vLLM engine
is dead, which only a restart cures; /readyz is readiness.

It is served from its own thread (services.common.http_thread) so that health
checks answer while the engine is starting (a blocking half minute on CPU)
and however busy the sampling loop is.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.generation.metrics import GenerationMetrics, ReplicaState


def create_app(state: ReplicaState, metrics: GenerationMetrics) -> FastAPI:
    app = FastAPI(title=f"e3 generation {metrics.replica_id}")

    @app.get("/healthz", responses={503: {"description": "the engine is dead: restart the replica"}})
    async def healthz(response: Response) -> dict:
        # The pid lets a supervisor (and the tests) tell a reload from a restart.
        body = {"status": "ok", "replica": metrics.replica_id, "pid": os.getpid()}
        failure = state.engine_failure()
        if failure is not None:
            response.status_code = 503
            body |= {"status": "engine_dead", "reason": failure}
        return body

    @app.get("/readyz", responses={503: {"description": "not ready yet (a probe answer, not a failure)"}})
    async def readyz(response: Response) -> dict:
        # Ready means: worth sending work to. A replica on an old policy would
        # only produce groups the scheduler refuses as stale.
        body = state.to_dict() | {"replica": metrics.replica_id}
        if not body["ready"]:
            response.status_code = 503
        return body

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
