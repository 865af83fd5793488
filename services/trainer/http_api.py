"""The trainer's HTTP face: /healthz, /readyz (model loaded), /metrics."""

from __future__ import annotations

from fastapi import FastAPI, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.trainer.metrics import TrainerMetrics


def create_app(metrics: TrainerMetrics, status: dict) -> FastAPI:
    """`status` is updated by the loop: {"ready", "step", "policy_version", "world_size" (ranks), "device"}."""
    app = FastAPI(title="e3 trainer")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready yet (a probe answer, not a failure)"}})
    def readyz(response: Response) -> dict:
        if not status.get("ready"):
            response.status_code = 503
        return dict(status)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
