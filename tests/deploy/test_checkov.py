"""checkov over the rendered overlays, against deploy/k8s/checkov-accepted.txt (scripts/k8s_checkov.py)."""

from __future__ import annotations

import copy
import shutil

import pytest

import k8s_checkov
from k8s_checkov import Accepted, Finding

CHECKOV = str(k8s_checkov.DEFAULT_CHECKOV) if k8s_checkov.DEFAULT_CHECKOV.exists() else shutil.which("checkov")
needs_checkov = pytest.mark.skipif(CHECKOV is None, reason="checkov is not installed (make k8s-checkov installs it)")


def report(*failed):
    return {"check_type": "kubernetes", "results": {"failed_checks": [
        {"check_id": c, "check_name": "n", "resource": r, "file_path": "/gpu.yaml"} for c, r in failed]}}


def test_the_accepted_list_parses_and_every_line_gives_a_reason():
    accepted = k8s_checkov.parse_accepted(k8s_checkov.ACCEPTED.read_text())
    assert accepted and all(len(a.reason.split()) >= 5 for a in accepted)
    with pytest.raises(ValueError, match="expected `CKV_ID"):
        k8s_checkov.parse_accepted("CKV_K8S_11 *")


def test_a_finding_not_accepted_and_an_accepted_line_matching_nothing_are_both_problems():
    found = k8s_checkov.findings(report(("CKV_K8S_11", "Deployment.e3.e3-reward"), ("CKV_K8S_35", "Job.e3.e3-trainer")),
                                 {"gpu.yaml": "gpu"})
    assert found[0] == Finding("gpu", "CKV_K8S_11", "Deployment/e3-reward", "n")
    accepted = [Accepted(3, "CKV_K8S_11", None, "r"), Accepted(4, "CKV_K8S_35", frozenset({"Deployment/e3-scheduler"}), "r"),
                Accepted(5, "CKV_K8S_99", None, "r")]
    problems = k8s_checkov.problems(found, accepted)
    assert problems[0].startswith("overlay gpu: Job/e3-trainer: CKV_K8S_35") and len(problems) == 3
    assert "checkov-accepted.txt:4" in problems[1] and "checkov-accepted.txt:5" in problems[2]


@needs_checkov
def test_checkov_finds_nothing_the_list_does_not_accept(rendered):
    variants = k8s_checkov.rendered()
    found = k8s_checkov.scan(CHECKOV, variants)
    assert k8s_checkov.problems(found, k8s_checkov.parse_accepted(k8s_checkov.ACCEPTED.read_text())) == []


@needs_checkov
def test_checkov_reports_a_secret_as_a_variable_the_list_does_not_accept(rendered):
    docs = copy.deepcopy(rendered["gpu"])
    trainer = next(d for d in docs if d["kind"] == "JobSet" and d["metadata"]["name"] == "e3-trainer")
    trainer["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "E3_TRAINER_TOKEN", "valueFrom": {"secretKeyRef": {"name": "e3-secrets", "key": "E3_TRAINER_TOKEN"}}})
    found = k8s_checkov.scan(CHECKOV, {"gpu": docs})
    problems = k8s_checkov.problems(found, k8s_checkov.parse_accepted(k8s_checkov.ACCEPTED.read_text()))
    # The JobSet, which checkov does not know, is scanned as the Job it makes.
    assert any(p.startswith("overlay gpu: Job/e3-trainer-node-0: CKV_K8S_35") for p in problems), problems
