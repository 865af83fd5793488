"""The prometheus-operator objects (ServiceMonitor, PrometheusRule) against their CRDs' schemas, offline.

kubernetes-validate knows only built-in kinds. The CRDs of prometheus-operator
(deploy/k8s/schemas/prometheus-operator-v<version>/, vendored unchanged) carry
an OpenAPI v3 schema per version; each object is validated against it with
jsonschema, strictly as `kubectl apply --validate=strict` would be: a field
the schema does not declare is an error (the API server would silently prune
it), and x-kubernetes-list-type map/set lists must not repeat a key.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "deploy" / "k8s" / "schemas" / "prometheus-operator-v0.93.0"


def _strict(schema: dict) -> dict:
    """The schema with undeclared fields refused wherever fields are declared."""
    out = {k: (_strict(v) if isinstance(v, dict) and k not in ("properties",) else v) for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [_strict(sub) for sub in schema[key]]
    return out


def _list_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: the API server refuses two items with the same keys."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry with {dict(zip(keys, key))} (list-type map)")
        seen.add(key)


def _list_type(validator, list_type, instance, schema):
    if list_type == "set" and isinstance(instance, list) and len(set(map(repr, instance))) != len(instance):
        yield jsonschema.ValidationError("duplicate entries in a list-type set")


_Validator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_keys, "x-kubernetes-list-type": _list_type})


@cache
def validators(schema_dir: Path = SCHEMA_DIR) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator, for every served version of every CRD in schema_dir."""
    out = {}
    for path in sorted(schema_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                out[(f"{group}/{version['name']}", kind)] = _Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return out


def crd_problems(doc: dict, where: str) -> list[str] | None:
    """Schema errors of a custom object (empty: valid); None if no vendored CRD defines its kind."""
    validator = validators().get((doc.get("apiVersion"), doc.get("kind")))
    if validator is None:
        return None
    return [f"{where}: {'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message} "
            f"({SCHEMA_DIR.name} CRD schema)" for error in validator.iter_errors(doc)]
