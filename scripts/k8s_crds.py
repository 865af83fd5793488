"""The custom objects e3 ships (ServiceMonitor, PrometheusRule, JobSet) against schemas of the fields e3 writes.

kubernetes-validate knows only built-in kinds. The schemas below are e3's
own statement of the part of each API its objects use: prometheus-operator's
monitoring.coreos.com/v1, written from the operator's API reference, and the
JobSet controller's jobset.x-k8s.io/v1alpha2, written from the JobSet API
reference (neither is a copy of the project's CRDs): the fields, their types,
formats and allowed values. Validation is strict, as `kubectl apply
--validate=strict` is against the real CRD: a field not declared here is an
error (a typo the API server would silently prune, or a field e3 starts to
use without saying so here), and lists keyed by name (rule groups, replicated
Jobs) must not repeat a name. A JobSet's Job templates are built-in
batch/v1 Jobs: `embedded_objects` hands them to kubernetes-validate.
"""

from __future__ import annotations

from functools import cache

import jsonschema

DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                        r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}  # kubernetes-validate's ObjectMeta rules
LABEL_SELECTOR = {"type": "object", "properties": {
    "matchLabels": STRINGS,
    "matchExpressions": {"type": "array", "items": {"type": "object", "required": ["key", "operator"], "properties": {
        "key": {"type": "string"}, "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": {"type": "array", "items": {"type": "string"}}}}}}}
ENDPOINT = {"type": "object", "properties": {
    "port": {"type": "string"}, "path": {"type": "string"}, "scheme": {"type": "string", "enum": ["http", "https"]},
    "interval": DURATION, "scrapeTimeout": DURATION, "honorLabels": {"type": "boolean"}}}
RULE = {"type": "object", "required": ["expr"], "properties": {
    "record": {"type": "string"}, "alert": {"type": "string"}, "expr": {"type": "string"}, "for": DURATION,
    "keep_firing_for": DURATION, "labels": STRINGS, "annotations": STRINGS}}
NAME = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}  # a DNS label
NAMES = {"type": "array", "items": {"type": "string"}}
# jobset.x-k8s.io/v1alpha2. A replicated Job's `template` is a batch/v1 JobTemplateSpec, validated by
# kubernetes-validate (embedded_objects) rather than declared again here.
JOBSET_SPEC = {"type": "object", "required": ["replicatedJobs"], "properties": {
    "replicatedJobs": {"type": "array", "minItems": 1, "x-kubernetes-list-type": "map",
                       "x-kubernetes-list-map-keys": ["name"], "items": {
                           "type": "object", "required": ["name", "template"], "properties": {
                               "name": NAME, "groupName": {"type": "string"},
                               "replicas": {"type": "integer", "minimum": 0},
                               "template": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                               "dependsOn": {"type": "array", "maxItems": 5, "items": {
                                   "type": "object", "required": ["name", "status"], "properties": {
                                       "name": {"type": "string"},
                                       "status": {"type": "string", "enum": ["Ready", "Complete"]}}}}}}},
    "network": {"type": "object", "properties": {
        "enableDNSHostnames": {"type": "boolean"}, "subdomain": NAME, "publishNotReadyAddresses": {"type": "boolean"}}},
    "successPolicy": {"type": "object", "required": ["operator"], "properties": {
        "operator": {"type": "string", "enum": ["All", "Any"]}, "targetReplicatedJobs": NAMES}},
    "failurePolicy": {"type": "object", "properties": {
        "maxRestarts": {"type": "integer", "minimum": 0},
        "restartStrategy": {"type": "string", "enum": ["Recreate", "BlockingRecreate", "InPlaceRestart"]},
        "rules": {"type": "array", "items": {"type": "object", "required": ["name", "action"], "properties": {
            "name": {"type": "string", "pattern": r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
            "action": {"type": "string", "enum": ["FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts",
                                                  "RestartJob", "RestartJobAndIgnoreMaxRestarts"]},
            "onJobFailureReasons": NAMES, "onJobFailureMessagePatterns": NAMES, "targetReplicatedJobs": NAMES}}}}},
    "startupPolicy": {"type": "object", "required": ["startupPolicyOrder"], "properties": {
        "startupPolicyOrder": {"type": "string", "enum": ["AnyOrder", "InOrder"]}}},
    "suspend": {"type": "boolean"},
    "coordinator": {"type": "object", "required": ["replicatedJob"], "properties": {
        "replicatedJob": {"type": "string"}, "jobIndex": {"type": "integer", "minimum": 0},
        "podIndex": {"type": "integer", "minimum": 0}}},
    "managedBy": {"type": "string", "maxLength": 63},
    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0}}}
SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": METADATA,
            "spec": {"type": "object", "required": ["selector", "endpoints"], "properties": {
                "selector": LABEL_SELECTOR, "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object", "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": ENDPOINT}}}}},
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": METADATA,
            "spec": {"type": "object", "properties": {
                "groups": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                           "items": {"type": "object", "required": ["name"], "properties": {
                               "name": {"type": "string", "minLength": 1}, "interval": DURATION,
                               "rules": {"type": "array", "items": RULE}}}}}}}},
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": METADATA, "spec": JOBSET_SPEC}},
}


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
def validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a strict validator for each kind SCHEMAS declares."""
    return {key: _Validator(_strict(schema)) for key, schema in SCHEMAS.items()}


def crd_problems(doc: dict, where: str) -> list[str] | None:
    """Schema errors of a custom object (empty: valid); None if SCHEMAS does not declare its kind."""
    validator = validators().get((doc.get("apiVersion"), doc.get("kind")))
    if validator is None:
        return None
    return [f"{where}: {'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message} "
            f"(e3's {doc['apiVersion']} schema, scripts/k8s_crds.py)" for error in validator.iter_errors(doc)]


def embedded_objects(doc: dict) -> list[tuple[str, dict]]:
    """(path, object) for the built-in objects a custom object holds: a JobSet's Job templates, as the
    batch/v1 Jobs the JobSet controller makes of them, for kubernetes-validate."""
    if (doc.get("apiVersion"), doc.get("kind")) != ("jobset.x-k8s.io/v1alpha2", "JobSet"):
        return []
    out = []
    for index, replicated in enumerate((doc.get("spec") or {}).get("replicatedJobs") or []):
        template = replicated.get("template") or {}
        name = f"{doc['metadata']['name']}-{replicated.get('name')}-0"
        metadata = {**(template.get("metadata") or {}), "name": name}
        if "namespace" in doc["metadata"]:
            metadata["namespace"] = doc["metadata"]["namespace"]
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": template.get("spec") or {}}
        out.append((f"spec.replicatedJobs.{index}.template", job))
    return out
