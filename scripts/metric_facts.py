"""e3's Prometheus metrics as the services define them, and Prometheus' naming rules.

The metrics are read from the services' own registries: every class named
`*Metrics` in services/*/metrics.py is instantiated and its collectors are
listed (name, type, help, label names, buckets). e3/metric_names.py adds the
constant each name comes from and the comment beside it. So the catalogue
(docs/metrics.md) and the PromQL checks see exactly what a scrape would show.
"""

from __future__ import annotations

import importlib
import inspect
import io
import re
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from prometheus_client import CollectorRegistry

from e3 import metric_names

ROOT = Path(__file__).resolve().parent.parent
METRIC_NAMES_FILE = ROOT / "e3" / "metric_names.py"
# Labels Prometheus attaches to every scraped series: `job`/`instance` always,
# the rest by Kubernetes service discovery (prometheus-operator's ServiceMonitor).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "container", "endpoint"})
# Series Prometheus makes itself for every target.
BUILTIN_SERIES = {"up": frozenset(TARGET_LABELS), "scrape_duration_seconds": frozenset(TARGET_LABELS)}
# Series of exporters e3 does not ship but its alerts read where they run: NVIDIA's DCGM exporter
# (installed by the GPU Operator on GPU nodes), with the labels it puts on every GPU's series.
EXTERNAL_SERIES = {name: frozenset({"gpu", "UUID", "Hostname", "modelName", "device"}) | TARGET_LABELS
                   for name in ("DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE")}
# vLLM's own engine series that the dashboards read, as a replica's /metrics re-exports them
# (services.generation.metrics.VllmSeries: vLLM's labels model_name and engine, plus replica).
# vLLM names them in vllm/v1/metrics/loggers.py; tests/deploy/test_metrics.py checks the installed
# vLLM still registers each.
VLLM_GAUGES = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")
VLLM_COUNTERS = ("vllm:num_preemptions", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits")
VLLM_SERIES = {name: frozenset({"model_name", "engine", "replica"}) | TARGET_LABELS
               for name in (*VLLM_GAUGES, *(f"{c}{suffix}" for c in VLLM_COUNTERS for suffix in ("_total", "_created")))}
RESERVED_LABELS = frozenset({"le", "quantile"}) | TARGET_LABELS
# Units Prometheus asks to be given in base units (seconds, bytes, ratios).
NON_BASE_UNITS = ("milliseconds", "ms", "microseconds", "us", "minutes", "hours", "days",
                  "kilobytes", "megabytes", "gigabytes", "percent")


@dataclass(frozen=True)
class Metric:
    name: str  # as exposed (counters include _total)
    type: str  # counter | gauge | histogram | summary
    labels: tuple[str, ...]
    help: str
    service: str
    constant: str  # the e3.metric_names constant holding the name
    note: str  # the comment beside the constant
    buckets: tuple[float, ...] = ()

    def series(self) -> dict[str, frozenset[str]]:
        """Every series name a scrape of this metric shows, with its labels."""
        labels = frozenset(self.labels)
        if self.type == "counter":
            return {self.name: labels, self.name.removesuffix("_total") + "_created": labels}
        if self.type == "histogram":
            return {self.name + "_bucket": labels | {"le"}, self.name + "_sum": labels,
                    self.name + "_count": labels, self.name + "_created": labels}
        return {self.name: labels}


def _instantiate(cls):
    kwargs = {}
    for name, parameter in inspect.signature(cls).parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            continue
        if name == "registry":
            kwargs[name] = CollectorRegistry()
        elif name == "replica_id":
            kwargs[name] = "catalogue"
        else:
            raise TypeError(f"{cls.__module__}.{cls.__name__}: cannot build it for the catalogue (argument {name!r})")
    return cls(**kwargs)


def metrics_classes() -> list[tuple[str, type]]:
    found = []
    for path in sorted((ROOT / "services").glob("*/metrics.py")):
        module = importlib.import_module(f"services.{path.parent.name}.metrics")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and name.endswith("Metrics") and obj.__module__ == module.__name__:
                found.append((path.parent.name, obj))
    return found


@lru_cache(maxsize=1)
def constants() -> dict[str, tuple[str, str, str]]:
    """metric name -> (constant, comment beside it, section comment above its group)."""
    out: dict[str, tuple[str, str, str]] = {}
    section: list[str] = []
    block: list[str] = []
    pending = None
    tokens = tokenize.generate_tokens(io.StringIO(METRIC_NAMES_FILE.read_text()).readline)
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if pending and tok.start[0] == pending[2]:
                out[pending[1]] = (pending[0], text, " ".join(section))
                pending = None
            elif tok.start[1] == 0:
                block.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 0 and tok.string.isupper():
            if block:
                section, block = block, []
            value = getattr(metric_names, tok.string)
            pending = (tok.string, value, tok.start[0])
            out.setdefault(value, (tok.string, "", " ".join(section)))
        elif tok.type == tokenize.NL and pending is None:
            continue
    return out


@lru_cache(maxsize=1)
def exported() -> dict[str, Metric]:
    """name -> Metric for every e3 metric a service registers."""
    names = constants()
    out: dict[str, Metric] = {}
    for service, cls in metrics_classes():
        instance = _instantiate(cls)
        registry = getattr(instance, "registry")
        # prometheus_client keeps collectors in a private map; pinned in requirements/cpu.lock.
        for collector in list(registry._collector_to_names):
            kind = getattr(collector, "_type", None)
            if kind is None:
                continue
            name = collector._name + ("_total" if kind == "counter" else "")
            constant, note, _ = names.get(name, ("", "", ""))
            buckets = tuple(getattr(collector, "_upper_bounds", ()))
            out[name] = Metric(name, kind, tuple(collector._labelnames), collector._documentation,
                               service, constant, note, buckets)
    return out


def series() -> dict[str, frozenset[str]]:
    """Every series name the services export (plus Prometheus' own, DCGM's and vLLM's), with its label names."""
    out = dict(BUILTIN_SERIES) | EXTERNAL_SERIES | VLLM_SERIES
    for metric in exported().values():
        for name, labels in metric.series().items():
            out[name] = labels | TARGET_LABELS
    return out


def naming_problems() -> list[str]:
    """Prometheus' naming rules (prometheus.io/docs/practices/naming) applied to e3's metrics."""
    out = []
    metrics = exported()
    values = {v for k, v in vars(metric_names).items() if k.isupper() and isinstance(v, str)}
    for name in sorted(values - set(metrics)):
        out.append(f"{name} ({constants()[name][0]}) is in e3/metric_names.py but no service registers it")
    for name, m in sorted(metrics.items()):
        where = f"{name} ({m.service})"
        if name not in values:
            out.append(f"{where}: registered under a name that is not in e3/metric_names.py")
        if not re.fullmatch(r"e3_[a-z][a-z0-9]*(_[a-z0-9]+)*", name):
            out.append(f"{where}: not snake_case with the e3_ prefix")
        if (m.type == "counter") != name.endswith("_total"):
            out.append(f"{where}: only counters end in _total ({m.type})")
        base = name.removesuffix("_total")
        if re.search(r"_(bucket|sum|count|created|info)$", base):
            out.append(f"{where}: ends in a suffix Prometheus reserves for its own series")
        for unit in NON_BASE_UNITS:
            if f"_{unit}_" in f"{base}_":
                out.append(f"{where}: unit {unit!r} is not a base unit (use seconds or bytes)")
        if "seconds" in base and not base.endswith("_seconds") and not base.endswith("_per_second"):
            out.append(f"{where}: the unit must be the last part of the name")
        if not m.help.strip():
            out.append(f"{where}: no help text")
        for label in m.labels:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", label) or label in RESERVED_LABELS:
                out.append(f"{where}: label {label!r} is reserved or not snake_case")
    return out
