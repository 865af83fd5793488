"""docker-compose.yml, its CPU override and the Dockerfile against the Compose specification and the code."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

import compose_check
import compose_gpus
import deploy_facts
import dockerfile
import image_requirements


def problems(model, variant="gpu"):
    return compose_check.drift_problems(model, variant)


def mount(service, target):
    """The volume entry of a resolved compose service mounted at `target`."""
    return next(v for v in service["volumes"] if v["target"] == target)


def test_compose_files_are_valid_against_the_compose_specification_schema():
    assert compose_check.compose_schema()["$id"] == "compose_spec.json"
    assert compose_check.schema_problems() == []


def test_schema_check_rejects_a_file_the_specification_forbids(tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump({"services": {"x": {"image": "redis", "healthcheck": {"test": 5}, "restrat": "no"}}}))
    found = compose_check.schema_problems([bad])
    assert any("services.x" in p and "restrat" in p for p in found), found
    assert any("healthcheck" in p for p in found), found


def test_gpu_and_cpu_stacks_load_with_docker_compose_and_match_the_code(compose_models):
    for variant, model in compose_models.items():
        assert problems(model, variant) == [], variant


def test_cpu_override_runs_the_same_services_without_gpus(compose_models):
    gpu, cpu = compose_models["gpu"]["services"], compose_models["cpu"]["services"]
    assert set(gpu) == set(cpu)
    assert cpu["generation"]["build"]["target"] == "generation-cpu"
    assert not cpu["generation"].get("deploy") and gpu["generation"]["deploy"]["resources"]["reservations"]["devices"]


def test_redis_persists_to_an_append_only_file_on_a_volume(compose_models):
    redis = compose_models["gpu"]["services"]["redis"]
    assert "--appendonly yes --appendfsync always" in " ".join(redis["command"])  # acknowledged = on disk
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in redis["volumes"])


@pytest.mark.parametrize("mutate, expected", [
    (lambda s: s["scheduler"]["environment"].update(E3_SCHEDULER__HTTP_PORT="9000"), "expose [8100, 8101] but the service listens on [8101, 9000]"),
    (lambda s: s["reward"]["environment"].update(E3_API_TOKEN="x"), "E3_API_TOKEN) is no longer read"),
    (lambda s: s["generation"]["environment"].update(E3_TRAINER_TOKEN="x"), "generation makes no trainer calls"),
    (lambda s: s["trainer"]["environment"].update(E3_TRAINER__NOPE="1"), "trainer.nope"),
    (lambda s: s["trainer"]["environment"].update(E3_TRAINER_DEVICE="cuda"), "E3_TRAINER_DEVICE has no effect"),
    (lambda s: s["generation"]["command"].__setitem__(2, s["generation"]["command"][2] + " --bogus"), "unrecognized arguments: --bogus"),
    (lambda s: s["generation"]["command"].__setitem__(2, s["generation"]["command"][2].replace("reward:8200", "reward:8201")), "dials reward:8201"),
    (lambda s: s["generation"]["depends_on"].pop("reward"), "must wait for reward"),
    (lambda s: s["generation"].update(container_name="gen"), "stop --scale"),
    (lambda s: s["generation"].pop("deploy"), "needs a GPU"),
    (lambda s: s["trainer"]["environment"].pop("E3_TRAINER_TOKEN"), "E3_TRAINER_TOKEN is not set"),
    (lambda s: mount(s["trainer"], "/var/lib/e3/run").update(read_only=True), "writes run_dir"),
    (lambda s: mount(s["generation"], "/var/lib/e3/run").update(source="other-volume"), "run_dir differs between services"),
    # The paper presets' model and data: mounted where each service opens them, for every preset.
    (lambda s: s["trainer"]["volumes"].remove(mount(s["trainer"], "/models")),
     "trainer: base_model /models/DeepSeek-R1-Distill-Qwen-1.5B is on no volume"),
    (lambda s: s["generation"]["volumes"].remove(mount(s["generation"], "/models")),
     "generation [E3_PRESET=paper-7b]: base_model /models/DeepSeek-R1-Distill-Qwen-7B is on no volume"),
    (lambda s: s["scheduler"]["volumes"].remove(mount(s["scheduler"], "/var/lib/e3/data")),
     "scheduler: train_data /var/lib/e3/data/e3-math/train.parquet is on no volume"),
    (lambda s: mount(s["scheduler"], "/var/lib/e3/data").update(target="/data"),
     "scheduler: valid_data /var/lib/e3/data/e3-math/valid.parquet is on no volume"),
    (lambda s: s["base-model"]["volumes"].remove(mount(s["base-model"], "/models")), "base_model differs between services"),
    (lambda s: s["base-model"].pop("environment"), "base-model: stages or checks base_model None, but the services read"),
    (lambda s: s["trainer"]["environment"].pop("E3_PRESET"), "trainer: loads the e3 config but is not given E3_PRESET"),
    (lambda s: s["trainer"]["environment"].update(E3_BASE_MODEL="models/x"), "base_model models/x is relative"),
    (lambda s: s["reward"]["healthcheck"].update(test=["CMD", "e3-healthcheck", "http://127.0.0.1:8200/ready"]), "health check"),
    (lambda s: s["scheduler"]["depends_on"].pop("base-model"), "does not start after the base-model step"),
    (lambda s: s["scheduler"]["environment"].update(E3_SCHEDULER__HOST="127.0.0.1"), "unreachable from other containers"),
    # The trainer's torchrun: one rank per GPU in its device_ids, on one node.
    (lambda s: s["trainer"]["command"].__setitem__(3, "--nproc-per-node=2"), "--nproc-per-node=2 but the container is given 1 GPU(s)"),
    (lambda s: compose_check.gpu_requests(s["trainer"])[0].update(device_ids=["0", "2"]),
     "--nproc-per-node=1 but the container is given 2 GPU(s)"),
    # GPUs: named by device_ids, one per replica, none given twice.
    (lambda s: compose_check.gpu_requests(s["generation"])[0].update(device_ids=["0"]), "GPU 0 is given to generation, trainer"),
    (lambda s: compose_check.gpu_requests(s["generation"])[0].update(device_ids=None, count="all"), "reserve GPUs by device_ids"),
    (lambda s: compose_check.gpu_requests(s["generation"])[0].update(device_ids=["1", "2"]), "takes one GPU, not ['1', '2']"),
    (lambda s: s["trainer"]["command"].__setitem__(2, "--nnodes=2"), "--nnodes=2 but 1 node(s)"),
    (lambda s: s["trainer"]["command"].__setitem__(0, "python3"), "not started by torchrun"),
    (lambda s: s["trainer"]["environment"].update(E3_TRAINER__DEVICE="cpu"), "set E3_TRAINER__DEVICE=cuda"),
])
def test_drift_between_compose_and_code_is_reported(gpu_model, mutate, expected):
    mutate(gpu_model["services"])
    found = problems(gpu_model)
    assert any(expected in p for p in found), found


def test_the_gpu_stack_trains_the_paper_preset_and_mounts_its_model_and_data_read_only(compose_models):
    services = compose_models["gpu"]["services"]
    for name in ("base-model", "scheduler", "generation", "trainer"):
        assert services[name]["environment"]["E3_PRESET"] == "paper-1.5b", name
        assert mount(services[name], "/models").get("read_only") and mount(services[name], "/models")["type"] == "bind"
    assert mount(services["scheduler"], "/var/lib/e3/data").get("read_only")
    # The trainer writes the run where the replicas read it.
    assert not mount(services["trainer"], "/var/lib/e3/run").get("read_only")
    assert mount(services["generation"], "/var/lib/e3/run")["source"] == mount(services["trainer"], "/var/lib/e3/run")["source"]


def test_the_cpu_stack_points_every_service_at_the_arithmetic_model(compose_models):
    services = compose_models["cpu"]["services"]
    for name in ("base-model", "scheduler", "generation", "trainer"):
        environment = services[name]["environment"]
        assert environment["E3_PRESET"] == "cpu" and environment["E3_BASE_MODEL"] == "/var/lib/e3/artifacts/base-model"


def test_a_prometheus_job_on_the_wrong_port_is_reported(gpu_model, tmp_path):
    prometheus = gpu_model["services"]["prometheus"]
    mount = next(v for v in prometheus["volumes"] if v["target"] == "/etc/prometheus/prometheus.yml")
    copy = tmp_path / "prometheus.yml"
    copy.write_text(open(mount["source"]).read().replace("reward:8200", "reward:9200"))
    mount["source"] = str(copy)
    assert any("e3-reward scrapes ['reward:9200']" in p for p in problems(gpu_model))


def test_dockerfile_targets_match_the_code_and_the_image_rules():
    assert compose_check.dockerfile_problems() == []


def test_image_rules_reject_root_unpinned_and_unchecked_images(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("FROM python:latest AS app\nCMD [\"python3\", \"-m\", \"services.reward\"]\n")
    found = dockerfile.policy_problems(dockerfile.parse(path), ["app"])
    assert any("not pinned" in p for p in found) and any("root" in p for p in found) and any("HEALTHCHECK" in p for p in found)


def test_image_requirement_files_pin_what_the_code_imports():
    assert image_requirements.problems() == []
    control = (image_requirements.OUT_DIR / "control.txt").read_text()
    # The scheduler and reward images carry neither torch nor vLLM.
    assert "torch" not in control and "vllm" not in control and "math-verify==" in control


def test_the_cpu_stack_trains_one_cpu_rank(compose_models):
    trainer = compose_models["cpu"]["services"]["trainer"]
    assert "--nproc-per-node=1" in trainer["command"] and not trainer.get("deploy")
    cpu = __import__("copy").deepcopy(compose_models["cpu"])
    cpu["services"]["trainer"]["command"][3] = "--nproc-per-node=gpu"
    assert any("the CPU trainer runs one rank" in p for p in problems(cpu, "cpu"))


def test_commands_are_recognised_through_sh_and_torchrun():
    split = deploy_facts.split_command
    assert split(["sh", "-c", "exec python3 -m services.generation --host 0.0.0.0"]) == ("generation", ["--host", "0.0.0.0"])
    assert split(["torchrun", "--nnodes=1", "-m", "services.trainer", "--scheduler", "s:1"]) == ("trainer", ["--scheduler", "s:1"])
    assert split(["redis-server", "--appendonly", "yes"]) is None


def test_compose_refuses_to_start_without_the_secrets(compose_models):
    # Without the checker's stand-ins the ${VAR:?message} guards must stop compose.
    done = subprocess.run([*compose_check.compose_command(), "--project-directory", str(compose_check.ROOT),
                           "-f", str(compose_check.ROOT / "docker-compose.yml"), "--env-file", os.devnull, "config", "-q"],
                          capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode != 0 and "required variable" in done.stderr and "compose.env.example" in done.stderr
    # Compose reports whichever guard it meets first, so every guard must point at the example file.
    guards = re.findall(r"\$\{[A-Z_]+:\?([^}]*)\}", (compose_check.ROOT / "docker-compose.yml").read_text())
    assert guards and all("compose.env.example" in message for message in guards), guards


@pytest.fixture(scope="module")
def generated_models(compose_models, tmp_path_factory) -> dict[tuple[int, int], dict]:
    """The stack with each of compose_check.GENERATED_SPLITS' overrides, as docker compose resolves it."""
    variants = compose_check.generated_variants(tmp_path_factory.mktemp("gpus"))
    command = compose_check.compose_command()
    return {split: compose_check.resolved_model(variants[f"gpus-{split[0]}x{split[1]}"], command)
            for split in compose_check.GENERATED_SPLITS}


def test_every_gpu_service_is_given_its_own_gpus_by_device_ids(compose_models, generated_models):
    models = {(2, 1): compose_models["gpu"], **generated_models}
    for (gpus, trainer_gpus), model in models.items():
        services = model["services"]
        assert problems(model, f"gpus-{gpus}x{trainer_gpus}") == []
        owned = {name: compose_check.gpu_ids(s) for name, s in services.items() if compose_check.gpu_requests(s)}
        replicas = sorted(n for n in owned if n != "trainer")
        expected = {"trainer": [str(i) for i in range(trainer_gpus)]}
        expected |= {name: [str(trainer_gpus + i)] for i, name in
                     enumerate(["generation"] + [f"generation-{i}" for i in range(1, gpus - trainer_gpus)])}
        assert owned == expected, (gpus, trainer_gpus)
        all_ids = [gpu for ids in owned.values() for gpu in ids]
        assert sorted(all_ids, key=int) == [str(i) for i in range(gpus)]  # every GPU once, none shared
        # torchrun starts one rank per device the trainer is given.
        assert f"--nproc-per-node={trainer_gpus}" in services["trainer"]["command"]
        assert not any(d.get("count") for s in services.values() for d in compose_check.gpu_requests(s))
        if gpus > 2:  # generated: fixed, distinct replica ids and one DNS name for Prometheus
            ids = {re.search(r"--replica-id (\S+)", services[n]["command"][2]).group(1) for n in replicas}
            assert ids == {f"gen-{i}" for i in range(gpus - trainer_gpus)}
            assert all(services[n]["networks"]["e3"]["aliases"] == ["generation"] for n in replicas if n != "generation")


def test_a_generated_assignment_that_gives_a_gpu_twice_is_reported(generated_models):
    model = __import__("copy").deepcopy(generated_models[(4, 1)])
    compose_check.gpu_requests(model["services"]["generation-2"])[0]["device_ids"] = ["1"]
    assert any("GPU 1 is given to generation, generation-2" in p for p in problems(model, "gpus-4x1"))


@pytest.mark.parametrize("argv, expected", [
    (["--gpus", "1"], "--gpus gives 1 GPU(s), but the trainer's 1 and at least one generation replica need 2"),
    (["--gpus", "4", "--trainer-gpus", "4"], "the trainer's 4 and at least one generation replica need 5"),
    (["--gpus", "4", "--trainer-gpus", "0"], "the trainer needs at least one GPU"),
    (["--gpus", "0,1,1"], "names a GPU twice"),
    (["--gpus", "4 GPUs"], "'4 GPUs' is neither a count nor a GPU index or UUID"),
])
def test_the_generator_refuses_impossible_splits_in_one_line(tmp_path, capsys, argv, expected):
    out = tmp_path / "docker-compose.gpus.yml"
    assert compose_gpus.main([*argv, "-o", str(out)]) == 2 and not out.exists()
    error = capsys.readouterr().err
    assert expected in error and error.count("\n") == 1, error


def test_the_generator_takes_gpu_ids_for_a_second_project(tmp_path):
    out = tmp_path / "docker-compose.gpus.yml"
    assert compose_gpus.main(["--gpus", "4,5,GPU-8f3a", "-o", str(out)]) == 0
    text = out.read_text()
    assert 'device_ids: ["4"]' in text and 'device_ids: ["5"]' in text and 'device_ids: ["GPU-8f3a"]' in text


# ---------------------------------------------------------------- Alertmanager

def _repoint(service, target, path, old, new):
    """Mount a copy of the service's file at `target` with `old` replaced by `new`."""
    entry = mount(service, target)
    path.write_text(open(entry["source"]).read().replace(old, new))
    entry["source"] = str(path)


def test_both_stacks_send_their_alerts_to_one_alertmanager(compose_models):
    for variant, model in compose_models.items():
        services = model["services"]
        assert [n for n, s in services.items() if s["image"].startswith("prom/alertmanager")] == ["alertmanager"], variant
        prometheus = yaml.safe_load(open(mount(services["prometheus"], "/etc/prometheus/prometheus.yml")["source"]))
        assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
        assert "monitoring" in services["alertmanager"]["networks"] and "monitoring" in services["prometheus"]["networks"]
        assert not [p for p in problems(model, variant) if "alertmanager" in p], variant


@pytest.mark.parametrize("mutate, expected", [
    (lambda m, tmp: _repoint(m["services"]["prometheus"], "/etc/prometheus/prometheus.yml", tmp / "prometheus.yml",
                             "alertmanager:9093", "alertmanager:9094"), "sends alerts to ['alertmanager:9094']"),
    (lambda m, tmp: _repoint(m["services"]["prometheus"], "/etc/prometheus/prometheus.yml", tmp / "prometheus.yml",
                             '"alertmanager:9093"', '"alerts:9093"'), "not the alertmanager service"),
    (lambda m, tmp: m["services"]["alertmanager"].update(networks={"store": None}), "shares no network with prometheus"),
    (lambda m, tmp: _repoint(m["services"]["alertmanager"], "/etc/alertmanager/alertmanager.yml",
                             tmp / "alertmanager.yml", "- name: e3-default", "- name: e3-elsewhere"),
     "routes to receiver 'e3-default', which it does not define"),
    (lambda m, tmp: m["services"].pop("alertmanager"), "expected one prom/alertmanager service, found 0"),
])
def test_an_alertmanager_prometheus_cannot_reach_or_cannot_load_is_reported(gpu_model, tmp_path, mutate, expected):
    mutate(gpu_model, tmp_path)
    found = problems(gpu_model)
    assert any(expected in p for p in found), found


@pytest.mark.skipif(compose_check.amtool() is None, reason="amtool not installed (make compose-check fetches it)")
def test_amtool_accepts_the_shipped_alertmanager_config_and_refuses_a_broken_one(tmp_path):
    shipped = compose_check.ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
    assert subprocess.run([compose_check.amtool(), "check-config", str(shipped)], capture_output=True).returncode == 0
    broken = tmp_path / "alertmanager.yml"
    broken.write_text(shipped.read_text().replace("group_wait: 30s", "group_wait: soon"))
    found = compose_check.alertmanager_config_problems(broken, "test")
    assert len(found) == 1 and "amtool check-config" in found[0], found
