"""Offline checks of every PromQL expression e3 ships: rules, dashboards, autoscaler rules.

Expressions are parsed with promql-parser (a Rust port of Prometheus' own
parser, pinned in requirements/cpu.lock); every metric and label they
select must exist in what the services export (scripts/metric_facts.py) or
in a recording rule. The rule files get the structural checks `promtool check
rules` makes (group and rule fields, names, durations, templates); promtool
itself is run too by tests/deploy when it is installed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import promql_parser
import yaml

import metric_facts

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
DASHBOARDS_DIR = ROOT / "deploy" / "grafana" / "dashboards"
# Grafana's built-in interval variables become a duration before parsing.
GRAFANA_DURATIONS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")
GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
RECORD_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*(:[a-zA-Z0-9_]+)+")  # level:metric:operations
ALERT_NAME = re.compile(r"[A-Z][A-Za-z0-9]+")
RULE_KEYS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}


@dataclass(frozen=True)
class Selector:
    metric: str | None
    labels: frozenset[str]


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of a PromQL expression; raises ValueError if it does not parse."""
    try:
        ast = promql_parser.parse(expr)
    except Exception as exc:  # the parser raises its own error types
        raise ValueError(f"does not parse: {exc}") from None
    found: list[Selector] = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            names = [m.value for m in node.matchers.matchers if m.name == "__name__"]
            found.append(Selector(node.name or (names[0] if names else None), frozenset(labels)))
        return True

    promql_parser.walk(ast, pre_visit=visit)
    return found


def reference_problems(expr: str, known: dict[str, frozenset[str] | None], where: str) -> list[str]:
    """Problems with `expr` given known series (name -> label names, None = any labels)."""
    try:
        found = selectors(expr)
    except ValueError as exc:
        return [f"{where}: {exc}: {expr!r}"]
    out = []
    for selector in found:
        if selector.metric is None:
            out.append(f"{where}: selects by labels only; name the metric ({expr!r})")
        elif selector.metric not in known:
            out.append(f"{where}: {selector.metric} is not exported by any e3 service nor recorded by a rule")
        elif known[selector.metric] is not None:
            unknown = sorted(selector.labels - known[selector.metric])
            if unknown:
                out.append(f"{where}: {selector.metric} has no label(s) {unknown}")
    return out


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values that keep the expression parseable."""
    expr = GRAFANA_DURATIONS.sub("5m", expr)
    return GRAFANA_VARIABLE.sub("var", expr)


# ---------------------------------------------------------------- rules

def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def load_rules(path: Path) -> list[dict]:
    data = yaml.safe_load(path.read_text()) or {}
    if set(data) != {"groups"} or not isinstance(data["groups"], list):
        raise ValueError(f"{path.name}: a rule file is a mapping with one key, groups (a list)")
    return data["groups"]


def recorded_series() -> dict[str, None]:
    """Names recording rules produce (their labels depend on the expression: not checked)."""
    return {rule["record"]: None for path in rule_files() for group in load_rules(path)
            for rule in group.get("rules", []) if "record" in rule}


def known_series() -> dict[str, frozenset[str] | None]:
    return {**metric_facts.series(), **recorded_series()}


def _duration_ok(text) -> bool:
    try:
        promql_parser.parse_duration(str(text))
        return True
    except Exception:  # noqa: BLE001 - any parse failure means "not a duration"
        return False


def rules_problems() -> list[str]:
    out = []
    known = known_series()
    files = rule_files()
    if not files:
        return [f"no rule files in {RULES_DIR.relative_to(ROOT)}"]
    groups_seen: set[str] = set()
    for path in files:
        try:
            groups = load_rules(path)
        except (ValueError, yaml.YAMLError) as exc:
            out.append(f"{path.name}: {exc}")
            continue
        for group in groups:
            name = group.get("name")
            where = f"{path.name}: group {name!r}"
            if not name or name in groups_seen:
                out.append(f"{where}: groups need a unique, non-empty name")
            groups_seen.add(name)
            if "interval" in group and not _duration_ok(group["interval"]):
                out.append(f"{where}: interval {group['interval']!r} is not a duration")
            for index, rule in enumerate(group.get("rules") or []):
                out += _rule_problems(rule, f"{where} rule {index}", known)
    return out


def _rule_problems(rule: dict, where: str, known) -> list[str]:
    out = []
    extra = set(rule) - RULE_KEYS
    if extra:
        out.append(f"{where}: unknown field(s) {sorted(extra)}")
    if ("record" in rule) == ("alert" in rule):
        return out + [f"{where}: needs exactly one of record and alert"]
    if "record" in rule:
        where = f"{where} ({rule['record']})"
        if not RECORD_NAME.fullmatch(rule["record"]):
            out.append(f"{where}: recording rule names are level:metric:operations")
        if "for" in rule or "annotations" in rule:
            out.append(f"{where}: a recording rule has no for or annotations")
    else:
        where = f"{where} ({rule['alert']})"
        if not ALERT_NAME.fullmatch(rule["alert"]):
            out.append(f"{where}: alert names are CamelCase")
        if "for" in rule and not _duration_ok(rule["for"]):
            out.append(f"{where}: for {rule['for']!r} is not a duration")
        if (rule.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
            out.append(f"{where}: labels.severity must be critical, warning or info")
        annotations = rule.get("annotations") or {}
        if not annotations.get("summary") or not annotations.get("description"):
            out.append(f"{where}: annotations need summary and description")
        for key, text in annotations.items():
            if str(text).count("{{") != str(text).count("}}"):
                out.append(f"{where}: annotation {key} has unbalanced template braces")
    if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
        return out + [f"{where}: expr must be a non-empty string"]
    return out + reference_problems(rule["expr"], known, where)


# ---------------------------------------------------------------- dashboards

def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out += panel.get("panels", [])  # collapsed rows keep their panels inside
    return out


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) for every query of every panel and templating variable."""
    out = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                out.append((f"panel {panel.get('title')!r} query {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query") if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text or "")
            if match:
                out.append((f"variable {variable['name']!r}", match.group(1)))
    return out


def dashboard_problems() -> list[str]:
    out = []
    known = known_series()
    uids: dict[str, str] = {}
    files = dashboard_files()
    if not files:
        return [f"no dashboards in {DASHBOARDS_DIR.relative_to(ROOT)}"]
    for path in files:
        try:
            dashboard = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            out.append(f"{path.name}: not JSON: {exc}")
            continue
        where = path.name
        uid = dashboard.get("uid")
        if not uid or uid in uids:
            out.append(f"{where}: needs a unique uid (also used by {uids.get(uid)})")
        uids[uid] = path.name
        if dashboard.get("id") is not None:
            out.append(f"{where}: id must be null so provisioning assigns one")
        variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
        if "datasource" not in variables:
            out.append(f"{where}: needs a datasource variable so it works with any Prometheus data source")
        out += _layout_problems(dashboard, where)
        for panel in _panels(dashboard):
            if panel.get("type") == "row":
                continue
            source = (panel.get("datasource") or {}).get("uid")
            if source != "${datasource}":
                out.append(f"{where}: panel {panel.get('title')!r} must use datasource uid ${{datasource}}, not {source!r}")
            if not panel.get("targets"):
                out.append(f"{where}: panel {panel.get('title')!r} has no query")
        for place, expr in dashboard_expressions(dashboard):
            for name in {m.group(1) or m.group(2) for m in GRAFANA_VARIABLE.finditer(GRAFANA_DURATIONS.sub("", expr))}:
                if name not in variables:
                    out.append(f"{where}: {place} uses undefined variable ${name}")
            out += reference_problems(grafana_to_promql(expr), known, f"{where}: {place}")
    return out


def _layout_problems(dashboard: dict, where: str) -> list[str]:
    out, cells, ids = [], {}, set()
    for panel in _panels(dashboard):
        if panel.get("id") in ids:
            out.append(f"{where}: panel id {panel.get('id')} is used twice")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos") or {}
        x, y, w, h = (grid.get(k) for k in ("x", "y", "w", "h"))
        if None in (x, y, w, h) or x < 0 or w < 1 or h < 1 or x + w > 24:
            out.append(f"{where}: panel {panel.get('title')!r} has a bad gridPos {grid}")
            continue
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                if (cx, cy) in cells:
                    out.append(f"{where}: panels {cells[(cx, cy)]!r} and {panel.get('title')!r} overlap")
                    break
                cells[(cx, cy)] = panel.get("title")
            else:
                continue
            break
    return out
