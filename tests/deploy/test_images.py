"""The images' build-time import check, the gRPC stubs' grpcio floor, and the CUDA images' shared base."""

from __future__ import annotations

import re
import subprocess
import sys

import compose_check
import dockerfile
import image_requirements
from e3.contracts import build

DOCKER = compose_check.ROOT / "deploy" / "docker"


def test_every_target_imports_the_services_it_runs_at_build_time():
    stages = dockerfile.parse()
    assert compose_check.dockerfile_problems(stages) == []
    assert "services.trainer.__main__" in dockerfile.import_checked(stages["generation-cpu"])
    # A RUN before the code is copied checks nothing.
    trainer = stages["trainer"]
    trainer.runs.insert(0, trainer.runs.pop())
    trainer.last_code_copy = 1
    assert any("trainer: no RUN e3-import-check services.trainer.__main__" in p
               for p in compose_check.dockerfile_problems(stages))


def test_the_import_check_fails_on_a_module_that_cannot_be_imported(tmp_path):
    (tmp_path / "services" / "broken").mkdir(parents=True)
    (tmp_path / "services" / "__init__.py").write_text("")
    (tmp_path / "services" / "broken" / "__init__.py").write_text("")
    (tmp_path / "services" / "broken" / "__main__.py").write_text("def main():\n    import not_a_package_e3\n")
    done = subprocess.run([sys.executable, str(DOCKER / "import_check.py"), "services.broken.__main__"],
                          capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1 and "cannot import not_a_package_e3" in done.stderr
    done = subprocess.run([sys.executable, str(DOCKER / "import_check.py"), "services.scheduler.__main__"],
                          capture_output=True, text=True, cwd=compose_check.ROOT)
    assert done.returncode == 0, done.stderr


def test_the_stubs_match_the_proto_and_ask_only_for_the_stated_grpcio():
    assert build.stale_files() == []
    stub = (build.OUT_DIR / "e3_pb2_grpc.py").read_text()
    assert f"GRPC_GENERATED_VERSION = '{build.GRPC_MINIMUM}'" in stub
    floor = re.search(r'"grpcio>=([\d.]+)"', (compose_check.ROOT / "pyproject.toml").read_text()).group(1)
    assert build.GRPC_MINIMUM.startswith(floor)


def test_every_image_pins_a_grpcio_and_protobuf_the_stubs_accept():
    minimum = tuple(int(x) for x in build.GRPC_MINIMUM.split("."))
    for image in image_requirements.IMAGES:
        pins = dict(line.split("==") for line in (image_requirements.OUT_DIR / f"{image.name}.txt").read_text().splitlines()
                    if "==" in line and not line.startswith("#"))
        assert tuple(int(x) for x in pins["grpcio"].split(".")) >= minimum, image.name
        assert pins["protobuf"].split(".")[0] == "7", image.name  # e3_pb2.py is protoc 7.x gencode


def test_trainer_and_generation_are_built_from_the_same_vllm_image():
    stages = dockerfile.parse()
    assert stages["trainer"].base == stages["generation"].base
    assert re.fullmatch(r"vllm/vllm-openai:v0\.32\.0", stages["trainer"].base)
    # vLLM's image starts `vllm serve`; e3's images run their own command, with the GPUs Docker gives them.
    assert stages["trainer"].entrypoint == [] and stages["generation"].entrypoint == []
    assert "gpu-claim" not in dockerfile.DOCKERFILE.read_text()
    text = dockerfile.DOCKERFILE.read_text()
    assert "generation.txt" in text and "trainer.txt" in text
    # docs/deploy.md states the driver for the CUDA version that image's torch (2.13.0) is built with.
    docs = (compose_check.ROOT / "docs" / "deploy.md").read_text()
    assert "CUDA 13.0" in docs and "580" in docs
