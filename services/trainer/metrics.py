"""The trainer's Prometheus series (names from e3.metric_names)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from e3 import metric_names as m


class TrainerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram(
            m.TRAINER_STEP_SECONDS, "Wall time of one training step by phase", ["phase"], registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.loss = Gauge(m.TRAINER_LOSS, "GRPO loss of the last step", registry=self.registry)
        self.skipped = Counter(m.TRAINER_SKIPPED_STEPS_TOTAL, "Steps skipped for a non-finite loss or gradient", registry=self.registry)

    def observe(self, record: dict) -> None:
        for phase, seconds in record["timings"].items():
            self.step_seconds.labels(phase).observe(seconds)
        if record["loss"] == record["loss"]:  # not NaN
            self.loss.set(record["loss"])
