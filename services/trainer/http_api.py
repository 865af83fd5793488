"""The trainer's HTTP face: /healthz, /readyz (model loaded), /metrics."""

from __future__ import annotations

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.trainer.metrics import TrainerMetrics


def create_app(metrics: TrainerMetrics, status: dict) -> FastAPI:
    """`status` is updated by the loop: {"ready": bool, "step": int, "policy_version": int}."""
    app = FastAPI(title="e3 trainer")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict:
        if not status.get("ready"):
            response.status_code = 503
        return dict(status)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
