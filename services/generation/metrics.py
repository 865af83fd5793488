"""A replica's Prometheus metrics and the state its health endpoints read.

Every series carries `replica`, so one dashboard can sum or split replicas.
The worker loop writes; the HTTP thread reads; plain attribute writes of
ints and bools need no lock for that. vLLM's own engine series (vllm:*)
are re-exported beside e3's (VllmSeries), with `replica` added.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from e3 import metric_names

# An in-place reload takes tens of milliseconds for a small model on CPU and
# seconds for a large one on GPU; the buckets cover both.
SYNC_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ReplicaState:
    """What /healthz and /readyz decide on."""

    def __init__(self) -> None:
        self.model_loaded = False
        self.loaded_version: int | None = None
        self.scheduler_version: int | None = None  # as of the last lease reply
        # Why the engine can sample no more, or None (GenerationEngine.failure, asked at each probe).
        self.engine_failure: Callable[[], str | None] = lambda: None

    @property
    def ready(self) -> bool:
        return (
            self.engine_failure() is None
            and self.model_loaded
            and self.scheduler_version is not None
            and self.loaded_version == self.scheduler_version
        )

    def to_dict(self) -> dict:
        return {
            "ready": self.ready,
            "model_loaded": self.model_loaded,
            "policy_version": self.loaded_version,
            "scheduler_policy_version": self.scheduler_version,
        }


class VllmSeries(Collector):
    """vLLM's own series, read at scrape time from the registry vLLM's PrometheusStatLogger writes to.

    That logger (passed to AsyncLLM by services.generation.engine) registers
    its gauges, counters and histograms, named vllm:*, in prometheus_client's
    default registry; the replica serves its own registry, so this collector
    copies the vllm:* families into it, each sample with `replica` added.
    Until the engine is up there are none.
    """

    PREFIX = "vllm:"

    def __init__(self, replica_id: str, source: CollectorRegistry = REGISTRY) -> None:
        self.replica_id, self.source = replica_id, source

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            if not family.name.startswith(self.PREFIX):
                continue
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                copy.add_sample(sample.name, {**sample.labels, "replica": self.replica_id}, sample.value,
                                sample.timestamp, sample.exemplar)
            yield copy


class GenerationMetrics:
    def __init__(self, replica_id: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.replica_id = replica_id
        self.registry.register(VllmSeries(replica_id))
        labels = ["replica"]
        self._tokens = Counter(
            metric_names.GENERATION_TOKENS_TOTAL, "Response tokens sampled.", labels, registry=self.registry
        )
        self._tokens_per_s = Gauge(
            metric_names.GENERATION_TOKENS_PER_SECOND,
            "Response tokens per second over the last lease's sampling.",
            labels,
            registry=self.registry,
        )
        self._sync = Histogram(
            metric_names.WEIGHT_SYNC_SECONDS,
            "Seconds generation was paused to load a new policy in place.",
            labels,
            buckets=SYNC_BUCKETS,
            registry=self.registry,
        )
        self._version = Gauge(
            metric_names.REPLICA_POLICY_VERSION, "Policy version the replica samples with.", labels, registry=self.registry
        )
        self._staleness = Gauge(
            metric_names.POLICY_STALENESS,
            "Scheduler's policy version minus the replica's, as of the last lease reply.",
            labels,
            registry=self.registry,
        )
        self._reward_retries = Counter(
            metric_names.GENERATION_REWARD_RETRIES_TOTAL,
            "Retried calls to the reward service (down, or answering 5xx).",
            labels,
            registry=self.registry,
        )
        # Touch every series so that it is exported (as 0) before its first event.
        for metric in (self._tokens, self._tokens_per_s, self._sync, self._version, self._staleness, self._reward_retries):
            metric.labels(replica=replica_id)

    def generated(self, tokens: int, seconds: float) -> None:
        self._tokens.labels(replica=self.replica_id).inc(tokens)
        if seconds > 0:
            self._tokens_per_s.labels(replica=self.replica_id).set(tokens / seconds)

    def weight_sync(self, seconds: float) -> None:
        self._sync.labels(replica=self.replica_id).observe(seconds)

    def versions(self, replica_version: int | None, scheduler_version: int | None) -> None:
        if replica_version is not None:
            self._version.labels(replica=self.replica_id).set(replica_version)
        if replica_version is not None and scheduler_version is not None:
            self._staleness.labels(replica=self.replica_id).set(scheduler_version - replica_version)

    def reward_retry(self) -> None:
        self._reward_retries.labels(replica=self.replica_id).inc()
