"""One typed configuration tree for a run, with the paper's settings as presets.

Precedence, lowest first: the preset (`cpu` by default), a YAML file, then
environment variables. An environment variable `E3_<SECTION>__<FIELD>`
overrides one field (`E3_TRAINING__STEPS=20`); a few common ones have short
names (`E3_STORE_URL`, `E3_STORE_PASSWORD`, `E3_GENERATION_TOKEN`, `E3_TRAINER_TOKEN`,
`E3_OPERATOR_TOKEN`, `E3_RUN_DIR`).
Every flag is read here and nowhere else. The `fault` section injects faults
for the fault tests (E3_FAULT__NAN_STEPS="2,3") and is never set in real runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from e3.failpoints import parse as parse_failpoints


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnsConfig(_Section):
    """Which column of a data file holds what (e3.tasks.files). Each setting is a name or a list of names,
    the first present wins; a dotted name reaches into a struct column ("reward_model.ground_truth").
    The defaults read the paper's parquet (prompt, reward_model.ground_truth, rank, data_source) and its
    test.jsonl (prompt, answer, source)."""

    prompt: list[str] = Field(
        ["prompt"], min_length=1, description="chat messages (a list of {role, content}) or the prompt text")
    answer: list[str] = Field(["reward_model.ground_truth", "answer"], min_length=1,
                              description="the ground truth handed to the reward function")
    id: list[str] = Field(["id"], description="optional; rows without one get a hash of their prompt")
    level: list[str] = Field(["level"], description="optional difficulty level, an integer >= 1")
    prior_rank: list[str] = Field(["rank"], description="optional prior difficulty percentile in [0, 1], 0 = easiest")
    source: list[str] = Field(["data_source", "source"], description="optional name of the row's origin")

    @field_validator("*", mode="before")
    @classmethod
    def _one_name_or_list(cls, value: Any) -> Any:
        # One column name may be written alone (also from an E3_DATA__COLUMNS__* variable); a list gives fallbacks.
        return [value] if isinstance(value, str) else value


class DataConfig(_Section):
    """Which questions to train and validate on: the generated arithmetic task, or files (docs/data.md)."""

    task: Literal["arithmetic", "files"] = Field(
        "arithmetic", description="arithmetic: generated questions; files: train_path and valid_path")
    train_size: int = Field(960, ge=1, description="arithmetic: RL questions generated (960 = 15 steps of 64 per epoch)")
    valid_size: int = Field(250, ge=1, description="arithmetic: validation questions generated")
    seed: int = 0
    train_path: str = Field("../shared/data/e3-math/train.parquet", description="files: the RL questions (.parquet or .jsonl)")
    valid_path: str = Field("../shared/data/e3-math/valid.parquet", description="files: the validation questions")
    columns: ColumnsConfig = ColumnsConfig()
    reward: str = Field("math", description="files: the reward function scoring every question: arithmetic, math, "
                        "or python:package.module:function (found in reward.python_path)")
    shuffle: bool = True
    prompt_template: str | None = Field(
        None, description="applied to each question's (last user) text before the chat template; must hold one "
        "{prompt}. None: the default of the task's reward (arithmetic and python: functions: the bare prompt; math: "
        "the paper's instruction to reason step by step and answer in \\boxed{})")

    @field_validator("prompt_template")
    @classmethod
    def _one_placeholder(cls, value: str | None) -> str | None:
        from e3.tasks.prompts import check_template

        return None if value is None else check_template(value)

    @field_validator("reward")
    @classmethod
    def _reward_name(cls, value: str) -> str:
        from e3.tasks.question import check_verifier

        return check_verifier(value, "data.reward")

    def verifier(self) -> str:
        """The reward function that scores this data's answers."""
        return "arithmetic" if self.task == "arithmetic" else self.reward

    def template(self) -> str:
        """The prompt template this data uses (e3.tasks.prompts): the one its reward function expects."""
        from e3.tasks.prompts import task_template

        return task_template(self.verifier(), self.prompt_template)


class AllocationConfig(_Section):
    """E3.md section 1: rollout budget per question."""

    mode: Literal["e3", "uniform", "knapsack", "greso", "dapo", "speed"] = Field(
        "e3", description="e3: the paper's difficulty rule; uniform: n each (GRPO); knapsack: the most expected "
        "informative groups; greso: skip questions whose recent groups were all the same; dapo: part of the "
        "budget first, the rest refilled with further questions; speed: screen every question, then finish "
        "the mixed ones (e3.core.policies; dapo and speed plan each step in two rounds)")
    n: int = Field(8, ge=1, description="uniform group size; budget R = batch_questions * n")
    n_low: int = Field(4, ge=1)
    n_high: int = Field(12, ge=1)
    n_update: int = Field(2, ge=0)
    rerank: Literal["epoch", "step"] = Field("epoch", description="when ranks are recomputed (the paper: epoch)")
    greso_p_easy: float = Field(0.5, ge=0, le=1, description="greso: keep a question whose last z groups were all "
                                "correct with probability max(p_easy ** z, floor)")
    greso_p_hard: float = Field(0.5, ge=0, le=1, description="greso: the same for all-wrong groups")
    greso_floor: float = Field(0.01, ge=0, le=1, description="greso: the least keep probability (exploration)")
    greso_history: int = Field(4, ge=1, le=64, description="greso: groups per question the store keeps")
    dapo_first_share: float = Field(0.75, gt=0, le=1, description="dapo: the budget's share the first round spends")
    speed_screen: int | None = Field(None, ge=1, description="speed: screening rollouts per question; None: n_low")

    def policy_settings(self) -> dict[str, Any]:
        """The settings of `mode`'s policy, as e3.core.policies.make_policy takes them."""
        if self.mode == "greso":
            return {"p_easy": self.greso_p_easy, "p_hard": self.greso_p_hard, "floor": self.greso_floor}
        if self.mode == "dapo":
            return {"first_share": self.dapo_first_share}
        if self.mode == "speed":
            return {"screen": self.speed_screen}
        return {}

    @model_validator(mode="after")
    def _ordered(self) -> "AllocationConfig":
        if not self.n_low <= self.n <= self.n_high:
            raise ValueError(f"allocation needs n_low <= n <= n_high, got {self.n_low}, {self.n}, {self.n_high}")
        return self


class TemperatureSettings(_Section):
    """E3.md section 2: entropy-targeting temperature control."""

    control: bool = True
    initial: float = Field(1.0, gt=0)
    init_steps: int = Field(1, ge=0)
    target_entropy: float | None = Field(None, gt=0)
    annealing: bool = False
    annealing_ratio: float = Field(0.4, ge=0, le=1)
    annealing_factor: float = Field(0.9, gt=0, le=1)
    min: float = Field(0.05, gt=0)
    max: float = Field(5.0, gt=0)


class TrainingConfig(_Section):
    """GRPO settings (E3.md section 3) and the run's length."""

    steps: int = Field(45, ge=1, description="45 steps = 3 epochs of the default data, as in the paper")
    batch_questions: int = Field(64, ge=1, description="B: questions per step")
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.28, ge=0)
    kl_coef: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    mini_batches: int = Field(1, ge=1, description="optimizer steps per training step")
    micro_batch: int = Field(256, ge=1, description="most sequences in one forward/backward pass (micro-batch); "
                             "a micro-batch closes at this or at max_tokens_per_micro_batch, whichever comes first")
    max_tokens_per_micro_batch: int = Field(
        16384, ge=1, description="most padded tokens (sequences x the micro-batch's longest) in one forward/backward "
        "pass: sequences are sorted by length and grouped under this budget, each micro-batch padded to its own "
        "longest; a longer sequence gets a micro-batch of its own. Bounds memory, never changes the gradient "
        "(token-level mean over the mini-batch)")
    logit_chunk_tokens: int = Field(
        1024, ge=1, description="positions whose float32 logits exist at once: lm_head runs on the last hidden "
        "state this many positions at a time (recomputed per chunk in the backward pass), so no "
        "[tokens x vocab] tensor is built for a whole micro-batch")
    max_tokens: int = Field(16, ge=1, description="longest response sampled")
    overlong: Literal["score", "mask"] = Field(
        "score", description="responses cut at max_tokens: score them as they are, or leave them out of the loss "
        "(DAPO's overlong filtering; they still count in their group's advantage)")
    seed: int = 0
    checkpoint_every: int = Field(1, ge=1, description="write the training state (sharded weights and AdamW "
                                  "moments) every N steps; a restart without loss needs 1")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in <run_dir>/checkpoints, newest first")
    max_bad_steps: int = Field(3, ge=1, description="consecutive non-finite steps before the run stops")
    max_async_level: int = Field(
        0, ge=0, le=8, description="k: how many steps sampling may run ahead of training. 0: lock-step (a step "
        "is planned when the previous one is reported). k >= 1: the next step is planned as soon as the last "
        "planned one has all its training groups, up to k steps past the one being trained, so a trained group is at "
        "most k policy versions old (docs/training.md, 'Asynchronous rollouts')")
    behaviour_weight_cap: float = Field(
        2.0, ge=1.0, description="groups sampled by an older policy (max_async_level >= 1) are weighted per token "
        "by min(pi_trainer / pi_sampler, this cap): decoupled PPO with the sampler as the behaviour policy, "
        "its weight truncated as in truncated importance sampling")


class SchedulerConfig(_Section):
    host: str = "127.0.0.1"
    http_port: int = Field(8100, ge=0, le=65535)
    grpc_port: int = Field(8101, ge=0, le=65535)
    store_url: str = Field("memory://", description="memory://[snapshot path] or redis[s]://[:password@]host:port/db")
    store_password: str | None = Field(None, repr=False, description="Redis password, instead of putting it in the URL")
    store_password_file: str | None = Field(None, description="a file holding store_password (a mounted Secret); "
                                            "read at load, a missing or empty one refused naming the file")
    store_tls_ca_file: str | None = Field(None, description="rediss://: CA bundle that signed the server's certificate")
    store_tls_cert_file: str | None = Field(None, description="rediss://: client certificate, for mutual TLS")
    store_tls_key_file: str | None = Field(None, description="rediss://: the client certificate's key")
    lease_s: float = Field(60.0, gt=0, description="a lease's lifetime; replicas renew the leases they work on "
                           "(RenewLeases), so it bounds how long a dead replica's tasks wait, not a rollout's length")
    max_task_failures: int = Field(3, ge=1, description="ReportTaskFailure calls after which a task is marked "
                                   "failed (finished, no group) instead of re-queued")
    max_task_expiries: int = Field(5, ge=0, description="expired leases after which a task is marked failed "
                                   "(reason lease_expired) instead of re-queued: a prompt that takes down every "
                                   "replica it reaches; 0: never")
    run_id: str = "e3"
    leader_lease_s: float = Field(15.0, gt=0, le=600, description="the scheduler's leader lease in the store: "
                                  "renewed every third of it; a successor (a second scheduler on the same run) "
                                  "waits until it runs out, then takes the run and fences this one out")

    @model_validator(mode="before")
    @classmethod
    def _read_password_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("store_password_file"):
            return data
        where = "scheduler.store_password_file (E3_STORE_PASSWORD_FILE)"
        password = _read_token_file(str(data["store_password_file"]), where)
        if data.get("store_password") and data["store_password"] != password:
            raise ValueError(f"scheduler.store_password and {where} are both set; set one")
        return dict(data) | {"store_password": password}

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> "SchedulerConfig":
        tls = [n for n in ("store_tls_ca_file", "store_tls_cert_file", "store_tls_key_file") if getattr(self, n)]
        if tls and not self.store_url.startswith("rediss://"):
            raise ValueError(f"{', '.join(tls)} apply to rediss:// store URLs only, not to {self.store_url.split('@')[-1]!r}")
        if self.store_password and not self.store_url.startswith(("redis://", "rediss://")):
            raise ValueError("store_password applies to redis:// and rediss:// store URLs only")
        return self

    def store_options(self) -> dict[str, Any]:
        """Keyword options for e3.store.open_store (redis.from_url) from the settings above."""
        names = {"store_password": "password", "store_tls_ca_file": "ssl_ca_certs",
                 "store_tls_cert_file": "ssl_certfile", "store_tls_key_file": "ssl_keyfile"}
        return {option: getattr(self, field) for field, option in names.items() if getattr(self, field)}


class GenerationConfig(_Section):
    replicas: int = Field(1, ge=1)
    max_tasks_per_lease: int = Field(64, ge=1)
    leases_in_flight: int = Field(2, ge=1, le=16, description="leases a replica works on at once (sampling one while scoring another)")
    lease_wait_s: float = Field(2.0, ge=0, le=5, description="long poll: how long the scheduler may hold an empty lease call")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    cpu_kv_cache_gb: int = Field(1, ge=1)
    cpu_idle_spin_s: float = Field(
        0.1, ge=0, le=1, description="CPU hosts: how long vLLM's worker keeps polling its queue after a step "
        "before it sleeps (vLLM's own: 1 s, which takes a core from the trainer; services/generation/idle_spin.py)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica's vLLM engine spans")
    max_model_len: int | None = Field(None, ge=1, description="longest prompt + response vLLM holds; None: the model's own limit")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="vLLM weights and activations; auto: float32 on CPU, the model's own dtype on GPUs")
    enable_prefix_caching: bool = Field(True, description="reuse the KV cache of shared prompt prefixes (a group's n samples)")
    # Unasked, vLLM gives an engine built as a replica builds it (AsyncLLM) 128 sequences and 2,048 tokens a step
    # on every platform, where its own API server takes 1,024 and 8,192 on an H100 or H200 and its offline LLM class
    # 256 and 4,096 on CPU; naming them here keeps the replica and the offline baseline alike (services/bench/throughput.py).
    max_num_seqs: int = Field(
        128, ge=1, description="sequences one vLLM engine step holds (a group of n counts n); 128 is what vLLM gives a "
        "replica's engine unasked; the paper presets take 1,024, as verl's rollout does")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="tokens one vLLM engine step processes, prompt chunks and decodes together; at least "
        "max_num_seqs")
    seed: int | None = Field(None, description="sampler seed; None: derived from training.seed and the replica id")
    http_port: int = Field(8300, ge=0, le=65535, description="metrics/health port of the first replica")

    @model_validator(mode="after")
    def _batch_holds_its_sequences(self) -> "GenerationConfig":
        # vLLM refuses it too, but only once the replica's engine starts, minutes in on a GPU host.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                             f"({self.max_num_seqs}): every sequence of a step needs a token of the step's budget")
        return self


class RewardConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8200, ge=0, le=65535)
    timeout_s: float = Field(2.0, gt=0)
    python_path: list[str] = Field(
        default_factory=list, description="directories python: reward functions are imported from (passed to the "
        "reward service as --python-path; modules anywhere else are refused); relative paths: from the working directory")

    @field_validator("python_path", mode="before")
    @classmethod
    def _path_list(cls, value: Any) -> Any:
        # E3_REWARD__PYTHON_PATH=dir1:dir2 reads as one string, split like PYTHONPATH.
        return [part for part in value.split(os.pathsep) if part] if isinstance(value, str) else value


class TrainerConfig(_Section):
    """The trainer's processes (e3.train.parallel, e3.train.sharding; docs/training.md)."""

    http_port: int = Field(8400, ge=0, le=65535, description="metrics/health port (rank 0 only)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="cuda: rank r trains on GPU LOCAL_RANK (NCCL), failing at start without one; cpu: "
        "the CPU (gloo); auto: cuda when a GPU is visible, else cpu")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="compute dtype of forward and backward (FSDP2 mixed precision); the sharded "
        "weights and AdamW state stay float32 either way, gradients are reduced in float32")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass: less memory for "
        "long sequences, about a third more compute")
    threads: int = Field(2, ge=1, description="CPU threads per rank (torch.set_num_threads)")
    local_ranks: int = Field(
        1, ge=1, description="ranks `e3 run` starts on this machine (torchrun --nproc-per-node when above 1); "
        "Compose and Kubernetes give torchrun its own arguments instead (docs/deploy.md)")
    max_shard_size: str = Field(
        "5GB", pattern=r"^[0-9]+(\.[0-9]+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$",
        description="largest safetensors file of a published policy; a larger model is split into several "
        "files with a model.safetensors.index.json, as save_pretrained writes them")
    keep_policies: int = Field(3, ge=1, description="published policy versions kept in <run_dir>/weights")
    control_timeout_s: float = Field(
        6 * 3600, gt=0, description="how long ranks other than 0 wait for rank 0's next order (rank 0 waits for "
        "generation to finish a step meanwhile)")


def _read_token_file(path: str, where: str) -> str:
    """The token a secret file holds, surrounding whitespace (a final newline) removed."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ValueError(f"{where}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: cannot read {path} ({exc})") from None
    if not token:
        raise ValueError(f"{where}: {path} is empty")
    return token


class AuthConfig(_Section):
    """One bearer token per role (services/common/auth.py says which calls each may make).

    A service with a token of its role unset refuses to start, unless
    `insecure_loopback` is true and everything it binds and calls is on loopback.
    Each token may instead come from a file (`<role>_token_file`, E3_<ROLE>_TOKEN_FILE:
    a mounted Secret, so the token is in no environment); the file is read when the
    config loads, and a missing or empty one is refused, naming the file.
    """

    generation_token: str | None = Field(None, repr=False, description="the replicas' token: LeaseTasks, RenewLeases, "
                                         "SubmitGroup, ReportTaskFailure, and the reward service's /v1/score")
    trainer_token: str | None = Field(None, repr=False, description="the trainer's token: StreamBatch, ReportStep")
    operator_token: str | None = Field(None, repr=False, description="the scheduler's mutating HTTP calls, and its "
                                       "/v1 reads when api_read_open is false")
    insecure_loopback: bool = Field(False, description="allow a role with no token (its calls are then open), only "
                                    "when every address the service binds or calls is loopback")
    generation_token_file: str | None = Field(None, description="a file holding generation_token (a mounted Secret)")
    trainer_token_file: str | None = Field(None, description="a file holding trainer_token (a mounted Secret)")
    operator_token_file: str | None = Field(None, description="a file holding operator_token (a mounted Secret)")

    @model_validator(mode="before")
    @classmethod
    def _read_token_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for role in ("generation", "trainer", "operator"):
            path = data.get(f"{role}_token_file")
            if not path:  # unset, or E3_<ROLE>_TOKEN_FILE="": no file
                continue
            where = f"auth.{role}_token_file (E3_{role.upper()}_TOKEN_FILE)"
            token = _read_token_file(str(path), where)
            # The same token again is this file's, validated anew (an assignment, a dumped config).
            if data.get(f"{role}_token") and data[f"{role}_token"] != token:
                raise ValueError(f"auth.{role}_token and {where} are both set; set one")
            data[f"{role}_token"] = token
        return data

    @field_validator("generation_token", "trainer_token", "operator_token")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        # E3_TRAINER_TOKEN="" means "no token", never "the empty token".
        return value or None

    @model_validator(mode="after")
    def _distinct(self) -> AuthConfig:
        set_tokens = [(r, getattr(self, f"{r}_token")) for r in ("generation", "trainer", "operator")]
        set_tokens = [(r, t) for r, t in set_tokens if t is not None]
        for i, (role, token) in enumerate(set_tokens):
            for other, other_token in set_tokens[i + 1:]:
                if token == other_token:
                    raise ValueError(f"auth.{role}_token and auth.{other}_token are the same; each role needs its own")
        return self


class TLSConfig(_Section):
    """TLS for the scheduler's gRPC and HTTP and the reward service's HTTP (services/common/tls.py).

    A server with cert_file and key_file serves TLS; with client_ca_file too it
    asks every client for a certificate signed by it (mutual TLS). A client
    with ca_file verifies servers against it and presents cert_file/key_file
    when it has them.
    """

    cert_file: str | None = Field(None, description="this service's certificate (PEM, chain first)")
    key_file: str | None = Field(None, description="the private key of cert_file (PEM)")
    client_ca_file: str | None = Field(None, description="servers: require client certificates signed by these CAs")
    ca_file: str | None = Field(None, description="clients: the CA bundle that verifies the servers' certificates")

    @model_validator(mode="after")
    def _pairs(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: set both or neither")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("tls.client_ca_file (mutual TLS) needs tls.cert_file and tls.key_file")
        for name in ("cert_file", "key_file", "client_ca_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls.{name}: {path} is not a file")
        return self


class FaultConfig(_Section):
    """Fault injection for the fault tests (tests/faults). Test-only: never set in a real run."""

    nan_steps: list[int] = Field(default_factory=list, description="steps whose loss the trainer makes NaN")
    sampling_delay_s: float = Field(0.0, ge=0, le=600, description="seconds a replica holds each lease's "
                                    "sampling back: rollouts that outlast scheduler.lease_s, or a step's groups that arrive apart")
    failpoints: list[str] = Field(default_factory=list, description="name=kill|exit|sleep:<s> entries: the "
                                  "process fails at those points (e3.failpoints)")
    failpoints_dir: str | None = Field(None, description="with it, each failpoint fires once: a marker file there")

    @field_validator("failpoints", mode="before")
    @classmethod
    def _failpoint_list(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("failpoints")
    @classmethod
    def _known_actions(cls, value: list[str]) -> list[str]:
        parse_failpoints(value)
        return value

    @field_validator("nan_steps", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # E3_FAULT__NAN_STEPS="2,3" reads as the text "2,3"; a single "2" as the number 2.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, int):
            return [value]
        return value


class TrackingConfig(_Section):
    """Experiment trackers that get each metrics.jsonl line too (services/trainer/tracking.py)."""

    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="tensorboard (<run_dir>/tensorboard) and/or wandb (<run_dir>/wandb); "
        "E3_TRACKING__REPORT_TO=tensorboard,wandb or `e3 run --report-to`")
    wandb_project: str = Field("e3", min_length=1, description="the W&B project of the run")
    wandb_entity: str | None = Field(None, description="the W&B team or user; None: W&B's default (WANDB_ENTITY)")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files only, `wandb sync` uploads them later; online: needs WANDB_API_KEY")

    @field_validator("report_to", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if value is None:  # E3_TRACKING__REPORT_TO=""
            return []
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class E3Config(_Section):
    preset: str = "cpu"
    run_dir: str = Field("runs/latest", description="where a run writes; `e3 run` takes --run-dir, else this when "
                         "the config file or E3_RUN_DIR sets it, else a new runs/<timestamp> (runs/latest links to it)")
    artifacts_dir: str = "artifacts"
    base_model: str | None = Field(None, description="model directory; None builds the arithmetic base model")
    base_architecture: Literal["llama", "qwen2"] = Field(
        "llama", description="the base model built when base_model is None: llama (character tokenizer, plain "
        "prompts) or qwen2 (q/k/v biases, BPE tokenizer, chat template); see e3/model/architectures.py")
    api_read_open: bool = Field(True, description="False makes the scheduler's HTTP reads (/v1/...) need the "
                                "operator token too")
    validation_every: int = Field(5, ge=1, description="validate the policy of step 0, of every N-th step, and the final one")
    validation_questions: int | None = Field(
        None, ge=0, description="validate on the first N questions of the validation split; None: all; 0: no validation")
    validation_practice: bool = Field(
        True, description="also measure pass@1 on as many of the training questions (train_accuracy)")
    validation_samples: int = Field(8, ge=1, description="samples per validation question for pass@1 (mean over samples)")
    validation_temperature: float = Field(1.0, gt=0, description="fixed sampling temperature of the validation pass@1")
    validation_beside_training: bool = Field(
        False, description="hand a step's batch to the trainer once its training tasks are in, so that it trains "
        "while the replicas validate; the step's report is still adopted (and the replicas move to the new policy) "
        "only once the validation is in. Off by default: on a machine whose trainer and replicas share the CPU "
        "cores the two only slow each other (docs/training.md); on by default in the paper presets")
    data: DataConfig = DataConfig()
    allocation: AllocationConfig = AllocationConfig()
    temperature: TemperatureSettings = TemperatureSettings()
    training: TrainingConfig = TrainingConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    generation: GenerationConfig = GenerationConfig()
    reward: RewardConfig = RewardConfig()
    trainer: TrainerConfig = TrainerConfig()
    auth: AuthConfig = AuthConfig()
    tls: TLSConfig = TLSConfig()
    fault: FaultConfig = FaultConfig()
    tracking: TrackingConfig = TrackingConfig()


# The paper's runs (E3.md sections 1-4; learning rates, response length and
# rollout parallelism from the reference code's scripts/train_1_5b.sh and
# train_7b.sh) and the CPU-sized default.
#
# paper-*: the models are read where the deployment files mount them
# (/models, docs/deploy.md); 480 steps = 3 epochs of the 10,240 training
# questions at 64 a step. The reference samples at most 6,144 response
# tokens and drops prompts over 2,048; e3 keeps every row, so vLLM's context
# is 6,144 + a 4,608-token prompt budget that no prompt of the paper's data
# exceeds (the longest is 4,380 UTF-8 bytes with the instruction, a
# byte-level BPE token is at least one byte, and the chat template adds a few
# tokens; tests/unit/test_config_presets.py). Validation every 10 steps, as the
# reference's test_freq.
# One GPU per replica (tensor_parallel_size 1), also for 7B: its bf16 weights
# (15 GB) fit one GPU with room for the KV cache, and the deployments give a
# replica exactly one GPU. The trainer computes in bfloat16 over float32
# sharded weights and AdamW state (FSDP2 mixed precision), recomputes layer
# activations in the backward pass, and bounds each micro-batch by tokens
# (16,384, about two full-length rollouts); docs/training.md gives the memory
# this needs per GPU.
_PAPER_RUN: dict[str, Any] = {
    "validation_every": 10,
    # One sample per validation question, as the reference validates, and no
    # practice set: at 6k-token responses every validation sample costs a rollout.
    "validation_samples": 1,
    "validation_practice": False,
    # The trainer's GPUs are not the replicas': train while the replicas validate.
    "validation_beside_training": True,
    "data": {"task": "files", "reward": "math"},
    "allocation": {"mode": "e3", "n": 8, "n_low": 4, "n_high": 12, "n_update": 2, "rerank": "epoch"},
    "temperature": {"control": True, "initial": 1.0, "init_steps": 1, "annealing": True,
                    "annealing_ratio": 0.4, "annealing_factor": 0.9},
    "training": {"batch_questions": 64, "steps": 480, "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0,
                 "mini_batches": 1, "max_tokens": 6144, "max_tokens_per_micro_batch": 16384},
    "generation": {"tensor_parallel_size": 1, "max_model_len": 4608 + 6144, "dtype": "bfloat16",
                   "enable_prefix_caching": True,
                   # A step's 64 questions x 8 samples (up to 12 under E3's allocation) decode together, not
                   # in waves of 128; vLLM's own API server takes the same on an H100 or H200.
                   "max_num_seqs": 1024, "max_num_batched_tokens": 8192},
    "trainer": {"device": "cuda", "dtype": "bfloat16", "gradient_checkpointing": True},
}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "paper-1.5b": {**_PAPER_RUN, "base_model": "/models/DeepSeek-R1-Distill-Qwen-1.5B",
                   "training": {**_PAPER_RUN["training"], "learning_rate": 5e-6}},
    "paper-7b": {**_PAPER_RUN, "base_model": "/models/DeepSeek-R1-Distill-Qwen-7B",
                 "training": {**_PAPER_RUN["training"], "learning_rate": 2e-6}},
    "grpo": {"allocation": {"mode": "uniform"}, "temperature": {"control": False}},
    "e3-allocation-only": {"temperature": {"control": False}},
    "e3-temperature-only": {"allocation": {"mode": "uniform"}},
    # Beyond the paper (../shared/reference/ALLOCATION.md): the same budget and bounds, spent where a
    # group is most likely to hold both a right and a wrong answer; temperature control as E3's.
    "knapsack": {"allocation": {"mode": "knapsack"}},
    "greso": {"allocation": {"mode": "greso"}},
    "dapo": {"allocation": {"mode": "dapo"}},
    "speed": {"allocation": {"mode": "speed"}},
}
PRESETS["paper"] = PRESETS["paper-1.5b"]  # the earlier name of the 1.5B run

SHORT_ENV = {
    "E3_STORE_URL": ("scheduler", "store_url"),
    "E3_STORE_PASSWORD": ("scheduler", "store_password"),
    "E3_STORE_PASSWORD_FILE": ("scheduler", "store_password_file"),
    "E3_GENERATION_TOKEN": ("auth", "generation_token"),
    "E3_TRAINER_TOKEN": ("auth", "trainer_token"),
    "E3_OPERATOR_TOKEN": ("auth", "operator_token"),
    "E3_GENERATION_TOKEN_FILE": ("auth", "generation_token_file"),
    "E3_TRAINER_TOKEN_FILE": ("auth", "trainer_token_file"),
    "E3_OPERATOR_TOKEN_FILE": ("auth", "operator_token_file"),
    "E3_RUN_DIR": ("run_dir",),
    "E3_PRESET": ("preset",),
    # The CPU stack's model (docker-compose.cpu.yml, the cpu overlay): it replaces any preset's.
    "E3_BASE_MODEL": ("base_model",),
    "E3_BASE_ARCHITECTURE": ("base_architecture",),
}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names where it came from."""


# The one token every role shared until per-role tokens; refused, never guessed into one of them.
RETIRED_TOKEN = ("api_token (E3_API_TOKEN) is no longer read: each role has its own token now, "
                 "auth.generation_token (E3_GENERATION_TOKEN), auth.trainer_token (E3_TRAINER_TOKEN) and "
                 "auth.operator_token (E3_OPERATOR_TOKEN); docs/reliability.md says which calls each may make")


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> dict:
    overrides: dict = {}
    for name, path in SHORT_ENV.items():
        if name in environ:
            _set_path(overrides, path, environ[name])
    for name, value in environ.items():
        if name.startswith("E3_") and "__" in name:
            path = tuple(part.lower() for part in name[3:].split("__"))
            # YAML parsing turns "20" into 20 and "true" into True; pydantic checks the rest.
            _set_path(overrides, path, yaml.safe_load(value) if value != "" else None)
    return overrides


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any) -> E3Config:
    """Preset, then file, then environment, then keyword overrides (nested dicts)."""
    environ = os.environ if environ is None else environ
    file_values: dict = {}
    if path is not None:
        try:
            file_values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    if "E3_API_TOKEN" in environ or "api_token" in file_values or "api_token" in overrides:
        raise ConfigError(RETIRED_TOKEN)
    env_values = _env_overrides(environ)
    preset = overrides.get("preset") or env_values.get("preset") or file_values.get("preset") or "cpu"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    merged = _merge(_merge(_merge(_merge({"preset": preset}, PRESETS[preset]), file_values), env_values), overrides)
    try:
        return E3Config.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid e3 configuration ({problems})") from exc
