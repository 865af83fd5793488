"""`make k8s-checkov`: checkov's Kubernetes policies over every rendered overlay, against the accepted findings.

    python scripts/k8s_checkov.py [--checkov PATH]     exit 1 on problems, 2 if checkov is missing

Each overlay of scripts/k8s_check.py (and each component variant) is rendered
as `make k8s-check` renders it and scanned by checkov (--framework kubernetes,
offline: --skip-download). A failed check is a problem unless
deploy/k8s/checkov-accepted.txt accepts it, one line each:

    CKV_K8S_11  *                      why this finding is accepted
    CKV_K8S_35  Deployment/e3-scheduler  why, for that object only

An accepted line that no longer matches any finding is a problem too, so the
list says only what is true. checkov is not in the project's lock (its
dependency tree is large); the make target installs a pinned version into
its own virtualenv, .venv/e3-tools/checkov.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

import k8s_check
import k8s_crds

ACCEPTED = k8s_check.K8S_DIR / "checkov-accepted.txt"
DEFAULT_CHECKOV = k8s_check.ROOT / ".venv" / "e3-tools" / "checkov" / "bin" / "checkov"


@dataclass(frozen=True)
class Finding:
    overlay: str
    check_id: str
    resource: str  # Kind/name
    name: str


@dataclass(frozen=True)
class Accepted:
    line: int
    check_id: str
    resources: frozenset[str] | None  # None: every resource
    reason: str

    def covers(self, finding: Finding) -> bool:
        return finding.check_id == self.check_id and (self.resources is None or finding.resource in self.resources)


def parse_accepted(text: str, source: str = ACCEPTED.name) -> list[Accepted]:
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 3 or not parts[0].startswith("CKV_"):
            raise ValueError(f"{source}:{number}: expected `CKV_ID  *|Kind/name[,Kind/name]  reason`, got {raw!r}")
        scope = None if parts[1] == "*" else frozenset(parts[1].split(","))
        out.append(Accepted(number, parts[0], scope, parts[2]))
    return out


def findings(report, overlay_of_file: dict[str, str]) -> list[Finding]:
    """The failed checks of checkov's JSON report (one framework: an object; several: a list)."""
    out = []
    for section in report if isinstance(report, list) else [report]:
        for failed in section.get("results", {}).get("failed_checks", []):
            kind, *_, name = failed["resource"].split(".")
            overlay = overlay_of_file.get(Path(failed["file_path"]).name, failed["file_path"])
            out.append(Finding(overlay, failed["check_id"], f"{kind}/{name}", failed["check_name"]))
    return out


def problems(found: list[Finding], accepted: list[Accepted]) -> list[str]:
    out = [f"overlay {f.overlay}: {f.resource}: {f.check_id} {f.name} (not accepted in {ACCEPTED.name})"
           for f in sorted(set(found), key=lambda f: (f.overlay, f.resource, f.check_id))
           if not any(a.covers(f) for a in accepted)]
    out += [f"{ACCEPTED.name}:{a.line}: {a.check_id} accepts a finding checkov no longer reports; remove the line"
            for a in accepted if not any(a.covers(f) for f in found)]
    return out


def rendered() -> dict[str, list[dict]]:
    out = {overlay: k8s_check.render(overlay) for overlay in k8s_check.OVERLAYS}
    for component, overlay in k8s_check.COMPONENTS.items():
        out[f"{overlay}+{component}"] = k8s_check.render_variant(overlay, components=(component,))
    return out


def scan(checkov: str, docs_by_overlay: dict[str, list[dict]]) -> list[Finding]:
    with tempfile.TemporaryDirectory(prefix="e3-checkov-") as scratch:
        files = {}
        for overlay, docs in docs_by_overlay.items():
            name = overlay.replace("+", "_") + ".yaml"
            # checkov knows built-in kinds only: a JobSet is scanned as the Jobs it makes (Job/<jobset>-<job>-0).
            embedded = [job for doc in docs for _, job in k8s_crds.embedded_objects(doc)]
            (Path(scratch) / name).write_text(yaml.safe_dump_all(docs + embedded))
            files[name] = overlay
        done = subprocess.run([checkov, "-d", scratch, "--framework", "kubernetes", "--quiet", "--compact",
                               "--skip-download", "-o", "json"], capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: some check failed
        raise RuntimeError(f"checkov exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return findings(json.loads(done.stdout), files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkov", default=str(DEFAULT_CHECKOV) if DEFAULT_CHECKOV.exists() else shutil.which("checkov"))
    args = parser.parse_args(argv)
    if not args.checkov:
        print("k8s-checkov: checkov is not installed (make k8s-checkov installs it)", file=sys.stderr)
        return 2
    try:
        found = scan(args.checkov, rendered())
    except FileNotFoundError as exc:
        print(f"k8s-checkov: {exc}", file=sys.stderr)
        return 2
    out = problems(found, parse_accepted(ACCEPTED.read_text()))
    for problem in out:
        print(f"k8s-checkov: {problem}", file=sys.stderr)
    print(f"k8s-checkov: {len(found)} finding(s), {'FAILED, ' + str(len(out)) + ' problem(s)' if out else 'all accepted'}")
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main())
