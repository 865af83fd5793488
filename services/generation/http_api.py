"""A replica's HTTP face: /healthz, /readyz, /metrics, served from its own thread.

It runs on a thread with its own event loop so that health checks answer
while the engine is starting (a blocking half minute on CPU) and however
busy the sampling loop is.
"""

from __future__ import annotations

import os
import threading
import time

import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.generation.metrics import GenerationMetrics, ReplicaState


def create_app(state: ReplicaState, metrics: GenerationMetrics) -> FastAPI:
    app = FastAPI(title=f"e3 generation {metrics.replica_id}")

    @app.get("/healthz")
    async def healthz() -> dict:
        # The pid lets a supervisor (and the tests) tell a reload from a restart.
        return {"status": "ok", "replica": metrics.replica_id, "pid": os.getpid()}

    @app.get("/readyz")
    async def readyz(response: Response) -> dict:
        # Ready means: worth sending work to. A replica on an old policy would
        # only produce groups the scheduler refuses as stale.
        body = state.to_dict() | {"replica": metrics.replica_id}
        if not body["ready"]:
            response.status_code = 503
        return body

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class HttpServerThread:
    """uvicorn on a daemon thread; uvicorn skips signal handlers off the main thread."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="generation-http", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        self.thread.start()
        # A port already in use ends the thread, not the process; say so here.
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                config = self.server.config
                raise OSError(f"generation HTTP server did not start on {config.host}:{config.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
