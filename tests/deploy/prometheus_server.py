"""A real Prometheus server for tests: started on a free loopback port, queried over its HTTP API.

The binary is Debian's (`make compose-check` puts it in <venv>/e3-tools/ by
scripts/fetch_deploy_tools.sh) or one on PATH. The scrape config is
generated from deploy/prometheus/prometheus.yml, so that job names, and
hence the dashboards' and alerts' `job` matchers, are the shipped ones; only
the targets (loopback ports) and the intervals change.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from services.common.runtime import free_port

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "e3.rules.yml"


def prometheus_binary() -> str | None:
    local = Path(sys.prefix) / "e3-tools" / "prometheus"
    return shutil.which("prometheus") or (str(local) if local.is_file() else None)


def scrape_config(jobs_dir: Path, own: str, interval: str = "1s") -> dict:
    """deploy/prometheus/prometheus.yml scraping loopback targets: each e3 job reads `jobs_dir`/<job>.json
    (file service discovery, so targets can be named once their ports are known) instead of the compose names."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["global"] = {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval}
    config["rule_files"] = [str(RULES)]
    config.pop("alerting", None)  # no Alertmanager here; the test reads the alerts from Prometheus' own API
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        if job["job_name"] == "prometheus":
            job["static_configs"] = [{"targets": [own]}]
        else:
            job["file_sd_configs"] = [{"files": [str(jobs_dir / f"{job['job_name']}.json")], "refresh_interval": interval}]
    return config


def shipped_jobs() -> list[str]:
    """The e3 jobs deploy/prometheus/prometheus.yml scrapes (Prometheus' own left out)."""
    return sorted(job["job_name"] for job in yaml.safe_load(SHIPPED_CONFIG.read_text())["scrape_configs"]
                  if job["job_name"] != "prometheus")


class PrometheusServer:
    """`prometheus` on 127.0.0.1 with its TSDB in `workdir`; stop() ends it (a context manager too).

    It starts with no e3 target; `set_targets` names them (job -> host:port list)."""

    def __init__(self, binary: str, workdir: Path, interval: str = "1s") -> None:
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.jobs_dir = workdir / "targets"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(scrape_config(self.jobs_dir, f"127.0.0.1:{self.port}", interval)))
        for job in shipped_jobs():
            (self.jobs_dir / f"{job}.json").write_text("[]")
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.started = time.time()

    def set_targets(self, targets: dict[str, list[str]]) -> None:
        """Point every shipped job at its targets; a job the shipped file does not scrape is an error."""
        if sorted(targets) != shipped_jobs():
            raise ValueError(f"{SHIPPED_CONFIG.name} scrapes {shipped_jobs()}; targets given for {sorted(targets)}")
        for job, addresses in targets.items():
            staged = self.jobs_dir / f".{job}.json"
            staged.write_text(json.dumps([{"targets": addresses}]))
            staged.replace(self.jobs_dir / f"{job}.json")  # whole files only: Prometheus watches the directory

    def scraping(self, jobs: list[str], timeout_s: float = 30) -> None:
        """Wait until Prometheus has a target of each of `jobs`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            active = {t["labels"]["job"] for t in self.api("targets")["activeTargets"]}
            if set(jobs) <= active:
                return
            time.sleep(0.2)
        raise TimeoutError(f"prometheus has no target for {sorted(set(jobs) - active)} after {timeout_s}s")

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout_s}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params) -> dict | list:
        """GET /api/v1/<path>; the `data` of a success, else an AssertionError with Prometheus' error."""
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: str) -> list[dict]:
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        return data["result"]

    def series(self, selector: str, start: float, end: float) -> list[dict]:
        return self.api("series", **{"match[]": selector, "start": start, "end": end})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> "PrometheusServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
