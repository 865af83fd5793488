"""The scheduler's HTTP read side: state, statistics, allocations, health, metrics."""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, HTTPException, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from services.scheduler.engine import SchedulerEngine
from services.scheduler.metrics import SchedulerMetrics


class State(BaseModel):
    step: int
    epoch: int
    total_steps: int
    steps_per_epoch: int
    finished: bool
    temperature: float
    temperature_control: bool
    entropy_target: float | None
    last_entropy: float | None
    n_min: int | None
    n_max: int | None
    allocation_mode: str
    policy_version: int
    weights_path: str
    queue_depth: int
    leased_tasks: int
    step_groups_done: int
    step_groups_total: int
    questions: int


class QuestionView(BaseModel):
    question_id: str
    level: int | None
    source: str
    attempts: int
    reward_sum: float
    accuracy: float
    rank: float | None
    prior_rank: float | None


class Allocation(BaseModel):
    step: int
    epoch: int
    n_min: int
    n_max: int
    budget: int
    temperature: float
    policy_version: int
    question_ids: list[str]
    ranks: list[float]
    counts: list[int]


def create_app(engine: SchedulerEngine, metrics: SchedulerMetrics, ready=lambda: True) -> FastAPI:
    app = FastAPI(
        title="e3 scheduler",
        version="1",
        description="State of an E3 run: step, temperature, rollout budgets and per-question difficulty.",
    )

    def question_view(qid: str, stats, ranks) -> QuestionView:
        q = engine.questions[qid]
        s = stats.get(qid)
        return QuestionView(
            question_id=qid, level=q.level, source=q.source,
            attempts=s.attempts if s else 0, reward_sum=s.reward_sum if s else 0.0,
            accuracy=s.accuracy if s else 0.0, rank=ranks.get(qid), prior_rank=q.prior_rank,
        )

    @app.get("/v1/state", response_model=State)
    def state() -> State:
        return State(**engine.snapshot())

    @app.get("/v1/questions/{question_id}", response_model=QuestionView)
    def question(question_id: str) -> QuestionView:
        if question_id not in engine.questions:
            raise HTTPException(404, f"question_id {question_id!r} is not in the training set")
        return question_view(question_id, engine.store.stats([question_id]), engine.store.ranks())

    @app.get("/v1/questions", response_model=list[QuestionView])
    def questions(
        order: Literal["hardest", "easiest"] = "hardest",
        limit: int = Query(10, ge=1, le=1000),
        sampled_only: bool = True,
    ) -> list[QuestionView]:
        """Questions by cumulative accuracy; ties broken by the number of attempts."""
        stats = engine.store.all_stats()
        ranks = engine.store.ranks()
        ids = list(stats) if sampled_only else engine.question_ids
        ids = [q for q in ids if q in engine.questions]
        sign = 1 if order == "hardest" else -1
        ids.sort(key=lambda q: (sign * (stats[q].accuracy if q in stats else 0.0), -(stats[q].attempts if q in stats else 0), q))
        return [question_view(q, stats, ranks) for q in ids[:limit]]

    @app.get("/v1/allocations/{step}", response_model=Allocation)
    def allocation(step: int) -> Allocation:
        record = engine.allocation(step)
        if record is None:
            raise HTTPException(404, f"no allocation for step {step} (planned steps are kept for 64 steps)")
        return Allocation(**{k: record[k] for k in Allocation.model_fields})

    @app.get("/v1/reports")
    def reports(limit: int = Query(20, ge=1, le=64)) -> list[dict]:
        """The trainer's most recent step reports, as the scheduler absorbed them."""
        return engine.state["reports"][-limit:]

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict:
        if not ready():
            response.status_code = 503
            return {"status": "starting"}
        return {"status": "ready", "step": engine.step}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
