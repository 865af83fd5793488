"""The scheduler's HTTP face: state, statistics, allocations, leases, failed tasks; one admin action.

Access (services.common.auth): the mutating endpoint (POST
/v1/replicas/{id}/release) needs `Authorization: Bearer <operator token>`
(E3_OPERATOR_TOKEN); the /v1 reads need it too unless `api_read_open` is
true (the default); a generation or trainer token there is 403. /healthz,
/readyz and /metrics stay open for probes and Prometheus.
A store that cannot be reached answers 503 with Retry-After.
"""

from __future__ import annotations

from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from e3.store import StoreFenced, StoreUnavailable
from services.common.auth import RoleTokens, http_role
from services.common.http_guard import reject_unknown_query
from services.scheduler.engine import SchedulerEngine, SchedulerError
from services.scheduler.metrics import SchedulerMetrics

NOT_FOUND = {404: {"description": "no such question or step"}}
REFUSED = {401: {"description": "missing or unknown bearer token"},
           403: {"description": "a token of another role than operator"}}
UNAVAILABLE = {503: {"description": "the store cannot be reached; retry"}}


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
    step_groups_done: int = Field(description="tasks of the current step finished: groups accepted plus tasks failed")
    step_groups_total: int
    step_tasks_failed: int = Field(description="tasks of the current step marked failed (no group)")
    tasks_failed: int = Field(description="tasks marked failed in the whole run (GET /v1/failed-tasks lists them)")
    questions: int
    validation_questions: int = Field(description="held-out questions each validation samples")
    validation: dict[str, float] | None = Field(
        None, description="the last finished validation: step, policy_version, val_accuracy[_L<level>], train_accuracy")


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
    question_ids: list[str] = Field(description="the batch, then the reserve (`reserve` questions) of a policy "
                                    "that may skip or refill")
    ranks: list[float]
    counts: list[int] = Field(description="rollouts per question of question_ids, all rounds together (0: not sampled)")
    reserve: int = Field(0, description="how many of question_ids are the reserve, after the batch")
    rounds: list[list[int]] | None = Field(
        None, description="a two-round policy's counts per round (dapo, speed): the first round, then the "
        "second once the first is scored; None for a one-round policy")
    policy: str = Field(description="the allocation policy that planned the step (allocation.mode)")


class Lease(BaseModel):
    task_id: str
    step: int
    question_id: str
    replica_id: str
    expires_in_s: float
    times_leased: int


class FailedTask(BaseModel):
    step: int
    task_id: str
    question_id: str
    reason: str = Field(description="the last failure's code: prompt_too_long | engine_error | reward_error")
    detail: str
    replica_id: str = Field(description="the replica that reported the last failure")
    failures: int


class Released(BaseModel):
    replica_id: str
    task_ids: list[str]


def create_app(
    engine: SchedulerEngine, metrics: SchedulerMetrics, ready=lambda: True,
    tokens: RoleTokens = RoleTokens(), read_open: bool = True,
) -> FastAPI:
    app = FastAPI(
        title="e3 scheduler",
        version="1",
        description="State of an E3 run: step, temperature, rollout budgets and per-question difficulty.",
        responses=UNAVAILABLE,
        dependencies=[Depends(reject_unknown_query)],
    )
    writer = [Depends(http_role(tokens, "operator"))]
    reader = [] if read_open else writer

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"store unavailable, retry: {exc}"}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(SchedulerError)
    async def refused(request: Request, exc: SchedulerError) -> JSONResponse:
        status = {"invalid_argument": 400, "not_found": 404, "failed_precondition": 409}.get(exc.code, 503)
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(StoreFenced)
    async def fenced(request: Request, exc: StoreFenced) -> JSONResponse:
        engine.halt(str(exc))
        return JSONResponse({"detail": f"this scheduler lost the run to another one: {exc}"}, status_code=503)

    def question_view(qid: str, stats, ranks) -> QuestionView:
        q = engine.questions[qid]
        s = stats.get(qid)
        return QuestionView(
            question_id=qid, level=q.level, source=q.source,
            attempts=s.attempts if s else 0, reward_sum=s.reward_sum if s else 0.0,
            accuracy=s.accuracy if s else 0.0, rank=ranks.get(qid), prior_rank=q.prior_rank,
        )

    @app.get("/v1/state", response_model=State, dependencies=reader, responses=REFUSED)
    def state() -> State:
        return State(**engine.snapshot())

    @app.get("/v1/questions/{question_id}", response_model=QuestionView, dependencies=reader, responses=REFUSED | NOT_FOUND)
    def question(question_id: str) -> QuestionView:
        if question_id not in engine.questions:
            raise HTTPException(404, f"question_id {question_id!r} is not in the training set")
        return question_view(question_id, engine.store.stats([question_id]), engine.ranks())

    @app.get("/v1/questions", response_model=list[QuestionView], dependencies=reader, responses=REFUSED)
    def questions(
        order: Literal["hardest", "easiest"] = "hardest",
        limit: int = Query(10, ge=1, le=1000),
        sampled_only: bool = True,
    ) -> list[QuestionView]:
        """Questions by cumulative accuracy; ties broken by the number of attempts."""
        stats = engine.store.all_stats()
        ranks = engine.ranks()
        ids = list(stats) if sampled_only else engine.question_ids
        ids = [q for q in ids if q in engine.questions]
        sign = 1 if order == "hardest" else -1
        ids.sort(key=lambda q: (sign * (stats[q].accuracy if q in stats else 0.0), -(stats[q].attempts if q in stats else 0), q))
        return [question_view(q, stats, ranks) for q in ids[:limit]]

    @app.get("/v1/allocations/{step}", response_model=Allocation, dependencies=reader, responses=REFUSED | NOT_FOUND)
    def allocation(step: int) -> Allocation:
        record = engine.allocation(step)
        if record is None:
            raise HTTPException(404, f"no allocation for step {step} (planned steps are kept for 64 steps)")
        return Allocation(**{k: record[k] for k in Allocation.model_fields if k in record},
                          policy=engine.config.allocation.mode)

    @app.get("/v1/reports", dependencies=reader, responses=REFUSED)
    def reports(limit: int = Query(20, ge=1, le=64)) -> list[dict]:
        """The trainer's most recent step reports, as the scheduler absorbed them."""
        return engine.state.reports[-limit:]

    @app.get("/v1/leases", response_model=list[Lease], dependencies=reader, responses=REFUSED)
    def leases() -> list[Lease]:
        """Tasks out with a replica right now, earliest expiry first."""
        return [Lease(**lease) for lease in engine.leases()]

    @app.get("/v1/failed-tasks", response_model=list[FailedTask], dependencies=reader, responses=REFUSED)
    def failed_tasks() -> list[FailedTask]:
        """Tasks marked failed after scheduler.max_task_failures reports, oldest first: the last
        256 of trained steps, then the current step's. Each counted as finished with no group."""
        return [FailedTask(**f) for f in engine.failed_tasks()]

    @app.post("/v1/replicas/{replica_id}/release", response_model=Released, dependencies=writer, responses=REFUSED)
    def release(replica_id: str = Path(min_length=1, max_length=256)) -> Released:
        """Put every task the replica holds back in the queue now, instead of
        waiting for its leases to expire (say, its pod is known to be gone).
        A late submission from it is refused: it no longer holds the lease."""
        return Released(replica_id=replica_id, task_ids=engine.release(replica_id))

    @app.get("/healthz", responses={503: {"description": "the scheduler halted: it no longer acts on the run"}})
    def healthz(response: Response) -> dict:
        if engine.halted:  # fenced out, or the store lost the run (services.scheduler.reconcile)
            response.status_code = 503
            return {"status": "halted", "reason": engine.halted}
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready yet (a probe answer, not a failure)"}})
    def readyz(response: Response) -> dict:
        if not ready():
            response.status_code = 503
            return {"status": "starting"}
        return {"status": "ready", "step": engine.step}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
