"""The reward service's Prometheus metrics, on a registry owned by one app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from e3 import metric_names
from e3.verify import VERIFIERS, Verdict

# Checks take milliseconds when they succeed and the timeout when they do not;
# the top buckets make a raised timeout visible too.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
# What a built-in verifier's Verdict.outcome can be (they give 0 or 1, never partial credit).
OUTCOMES = ("correct", "incorrect", "timeout", "error")


class RewardMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.verifications = Counter(
            metric_names.REWARD_VERIFICATIONS_TOTAL,
            "Responses scored, by verifier and outcome (correct, partial, incorrect, timeout, error).",
            ["verifier", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            metric_names.REWARD_LATENCY_SECONDS,
            "Wall time of one verification, excluding queueing.",
            ["verifier"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.timeouts = Counter(
            metric_names.REWARD_TIMEOUTS_TOTAL,
            "Verifications killed at the time limit.",
            ["verifier"],
            registry=registry,
        )
        # The built-in verifiers' counters exist at 0 before their first event, so that panels and the
        # timeout alert read 0 rather than nothing and increase() counts the first event too.
        for verifier in VERIFIERS:
            self.timeouts.labels(verifier=verifier)
            for outcome in OUTCOMES:
                self.verifications.labels(verifier=verifier, outcome=outcome)

    def record(self, verifier: str, verdict: Verdict) -> None:
        outcome = verdict.outcome
        self.verifications.labels(verifier=verifier, outcome=outcome).inc()
        self.latency.labels(verifier=verifier).observe(verdict.elapsed_s)
        if outcome == "timeout":
            self.timeouts.labels(verifier=verifier).inc()
