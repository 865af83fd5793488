"""The scheduler's Prometheus series (names from e3.metric_names)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from e3 import metric_names as m
from e3.core.advantages import GroupOutcome
from e3.store.base import SubmitOutcome


class SchedulerMetrics:
    """Receives the engine's events and keeps the series up to date."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.planned = Counter(m.ROLLOUTS_PLANNED_TOTAL, "Rollouts planned by the allocator", registry=r)
        self.generated = Counter(m.ROLLOUTS_GENERATED_TOTAL, "Rollouts generated and scored (accepted groups)", registry=r)
        self.trained = Counter(m.ROLLOUTS_TRAINED_TOTAL, "Rollouts in batches the trainer reported", registry=r)
        self.validation_rollouts = Counter(m.VALIDATION_ROLLOUTS_TOTAL,
                                           "Validation rollouts generated and scored (accepted groups; never trained)",
                                           registry=r)
        self.validation_tokens = Counter(m.VALIDATION_TOKENS_TOTAL, "Response tokens of accepted validation rollouts",
                                         registry=r)
        self.allocation = Histogram(
            m.ALLOCATION_ROLLOUTS, "Rollouts given to one question in one step", registry=r,
            buckets=(1, 2, 4, 6, 8, 10, 12, 16, 24, 32),
        )
        self.policy = Gauge(m.ALLOCATION_POLICY, "1 for the run's allocation policy (allocation.mode)", ["policy"],
                            registry=r)
        self.round_rollouts = Counter(m.ALLOCATION_ROUND_ROLLOUTS_TOTAL,
                                      "Rollouts planned per allocation round (round 2: two-round policies only)",
                                      ["round"], registry=r)
        self.groups = Counter(m.GROUPS_TOTAL, "Trained groups by outcome", ["outcome"], registry=r)
        self.outcome_share = Gauge(m.GROUP_OUTCOME_SHARE, "Share of groups by outcome in the last step", ["outcome"], registry=r)
        self.temperature = Gauge(m.TEMPERATURE, "Sampling temperature of the current step", registry=r)
        self.entropy = Gauge(m.ENTROPY, "Mean token entropy the trainer measured last", registry=r)
        self.entropy_target = Gauge(m.ENTROPY_TARGET, "Entropy target of the temperature controller", registry=r)
        self.validation = Gauge(m.VALIDATION_ACCURACY, "Validation pass@1: the mean over samples at the fixed validation temperature", ["level"], registry=r)
        self.step = Gauge(m.STEP, "Current step", registry=r)
        self.finished = Gauge(m.RUN_FINISHED, "1 once the run is finished", registry=r)
        self.halted = Gauge(m.SCHEDULER_HALTED, "1 once this scheduler stopped acting on the run", registry=r)
        self.epoch = Gauge(m.EPOCH, "Current epoch", registry=r)
        self.policy_version = Gauge(m.POLICY_VERSION, "Policy version replicas must sample with", registry=r)
        self.bounds = Gauge(m.ROLLOUT_BOUNDS, "Per-question rollout bounds of the current step", ["bound"], registry=r)
        self.queue_depth = Gauge(m.QUEUE_DEPTH, "Rollout tasks waiting for a replica", registry=r)
        self.leased = Gauge(m.LEASED_TASKS, "Rollout tasks leased and not yet submitted", registry=r)
        self.expiries = Counter(m.LEASE_EXPIRIES_TOTAL, "Leases that expired and went back to the queue", registry=r)
        self.submissions = Counter(m.SUBMISSIONS_TOTAL, "Group submissions by result", ["result"], registry=r)
        self.rejections = Counter(m.SUBMISSIONS_REJECTED_TOTAL, "Group submissions refused, by the check that failed",
                                  ["reason"], registry=r)
        self.renewals = Counter(m.LEASE_RENEWALS_TOTAL, "Leases a replica asked to renew, by result", ["result"], registry=r)
        self.failure_reports = Counter(m.TASK_FAILURE_REPORTS_TOTAL, "Task failures replicas reported, by reason and outcome",
                                       ["reason", "outcome"], registry=r)
        self.tasks_failed = Counter(m.TASKS_FAILED_TOTAL, "Tasks marked failed (finished with no group), by the last reason",
                                    ["reason"], registry=r)
        # Labelled counters the dashboards and alerts read exist at 0 before their first event, so that a
        # panel shows 0 rather than no data and increase() counts the first event too.
        for outcome in GroupOutcome:
            self.groups.labels(outcome.value)
        for result in [*(o.value for o in SubmitOutcome), "rejected"]:
            self.submissions.labels(result)
        for result in ("renewed", "lost"):
            self.renewals.labels(result)
        for round_ in ("1", "2"):
            self.round_rollouts.labels(round_)

    def bind(self, engine) -> None:
        """Gauges read live from the engine and store at scrape time."""
        self.queue_depth.set_function(engine.store.queue_depth)
        self.leased.set_function(engine.store.leased_count)
        self.step.set_function(lambda: engine.step)
        self.finished.set_function(lambda: float(engine.state.finished))
        self.halted.set_function(lambda: float(engine.halted is not None))
        self.epoch.set_function(lambda: engine.epoch_of(engine.step))
        self.policy_version.set_function(lambda: engine.state.policy_version)
        self.temperature.set_function(lambda: engine.temperature)
        self.policy.labels(engine.config.allocation.mode).set(1)

    def on_plan(self, record: dict) -> None:
        """A step planned; for a two-round policy this is its first round (on_round adds the second)."""
        first = record["rounds"][0] if "rounds" in record else record["counts"]
        self.planned.inc(sum(first))
        self.round_rollouts.labels("1").inc(sum(first))
        if "rounds" not in record:  # a two-round step's per-question totals are known after its second round
            for count in record["counts"]:
                if count:  # a question the policy skipped (greso) is no group
                    self.allocation.observe(count)
        self.bounds.labels("n_min").set(record["n_min"])
        self.bounds.labels("n_max").set(record["n_max"])

    def on_round(self, record: dict) -> None:
        """A two-round step's second round planned: its rollouts, and every question's total of both rounds."""
        self.planned.inc(sum(record["rounds"][1]))
        self.round_rollouts.labels("2").inc(sum(record["rounds"][1]))
        for count in record["counts"]:
            if count:  # a question the policy did not sample is no group
                self.allocation.observe(count)

    def on_submit(self, outcome, rewards, tokens, validation: bool = False) -> None:
        self.submissions.labels(outcome.value).inc()
        if outcome.value == "accepted":
            (self.validation_rollouts if validation else self.generated).inc(len(rewards))
            if validation:
                self.validation_tokens.inc(tokens)

    def on_rejected(self, reason: str) -> None:
        self.submissions.labels("rejected").inc()
        self.rejections.labels(reason).inc()

    def on_lease_expiries(self, count: int) -> None:
        self.expiries.inc(count)

    def on_renew(self, renewed: int, lost: int) -> None:
        self.renewals.labels("renewed").inc(renewed)
        self.renewals.labels("lost").inc(lost)

    def on_task_failure(self, reason: str, outcome) -> None:
        self.failure_reports.labels(reason, outcome.value).inc()
        if outcome.value == "failed":
            self.tasks_failed.labels(reason).inc()

    def on_tasks_failed(self, reason: str, count: int) -> None:
        """Tasks the scheduler itself marked failed (their leases expired too often)."""
        self.tasks_failed.labels(reason).inc(count)

    def on_report(self, entry: dict, engine) -> None:
        self.trained.inc(entry["rollouts"])
        total = sum(entry["outcomes"].values()) or 1
        for outcome, count in entry["outcomes"].items():
            self.groups.labels(outcome).inc(count)
            self.outcome_share.labels(outcome).set(count / total)
        if entry["entropy"] and entry["entropy"] > 0:
            self.entropy.set(entry["entropy"])
        if entry["target_entropy"] is not None:
            self.entropy_target.set(entry["target_entropy"])
        self.on_validation(entry.get("validation") or {})

    def on_validation(self, measured: dict) -> None:
        """The pass@1 a finished validation measured (services.scheduler.validation.summarize)."""
        for key, value in measured.items():
            if key == "val_accuracy":
                self.validation.labels("all").set(value)
            elif key.startswith("val_accuracy_L"):
                self.validation.labels(key.removeprefix("val_accuracy_L")).set(value)
