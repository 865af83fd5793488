"""Shared fixtures of the deployment tests: the checkers in scripts/, and what they load once."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import compose_check  # noqa: E402  (needs scripts/ on the path)
import k8s_check  # noqa: E402


@pytest.fixture(scope="session")
def compose_models() -> dict[str, dict]:
    """The resolved compose model per variant, as `docker compose config` prints it."""
    command = compose_check.compose_command()
    if command is None:
        pytest.skip("no Docker Compose here; `make compose-check` fetches it (scripts/fetch_deploy_tools.sh)")
    return {variant: compose_check.resolved_model(files, command) for variant, files in compose_check.VARIANTS.items()}


@pytest.fixture
def gpu_model(compose_models) -> dict:
    return copy.deepcopy(compose_models["gpu"])


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    if k8s_check.kustomize_command() is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    return {overlay: k8s_check.render(overlay) for overlay in k8s_check.OVERLAYS}


@pytest.fixture
def gpu_docs(rendered) -> list[dict]:
    return copy.deepcopy(rendered["gpu"])
