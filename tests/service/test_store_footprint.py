"""What a finished group costs on a real Redis, and that it comes back whole.

The scheduler's store keeps each group once, compactly: a response token
costs its id (at most 3 bytes as a varint for a vocabulary under 2**21) and
its float32 log-probability (4 bytes); the prompt's ids are kept once per
group, not once per sample; the response text is not kept. The bounds below
are derived from those figures and the token counts alone, with 25% for the
allocator's size classes and 4 KiB for Redis's own overhead, and measured
with MEMORY USAGE: storing the text, every sample's prompt, or JSON numbers
again breaks them.
"""

from __future__ import annotations

import random
import struct

import pytest
import redis

from e3.config import load_config
from e3.store import RedisStore
from e3.tasks.datasets import load_split
from services.scheduler.engine import SchedulerEngine, Submission, SubmittedSample

VOCAB = 151_643  # Qwen2's: ids need 3 varint bytes
ID_BYTES, LOGPROB_BYTES = 3, 4


def float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def bound(samples: int, response: int, prompt: int) -> int:
    return int(1.25 * (samples * response * (ID_BYTES + LOGPROB_BYTES) + prompt * ID_BYTES)) + 4096


def store_one_group(url: str, samples: int, response: int, prompt_tokens: int):
    """Submit one group through the engine into Redis; (engine, Redis client, submitted samples)."""
    # max_tokens: the scheduler refuses a response longer than training.max_tokens.
    config = load_config(environ={}, data={"train_size": 4},
                         training={"batch_questions": 1, "steps": 2, "max_tokens": response},
                         allocation={"n": samples, "n_low": samples, "n_high": samples}, validation_questions=0)
    engine = SchedulerEngine(config, load_split(config.data, "train"), RedisStore(url, "footprint"), vocab_size=VOCAB)
    rng = random.Random(11)
    prompt = [rng.randrange(VOCAB) for _ in range(prompt_tokens)]
    sent = [SubmittedSample(prompt_token_ids=prompt, response_token_ids=[rng.randrange(VOCAB) for _ in range(response)],
                            response_logprobs=[float32(-rng.expovariate(2.0)) for _ in range(response)],
                            text="".join(rng.choice("abcdefgh 0123456789=+") for _ in range(4 * response)),
                            reward=float(i % 2), finish_reason="length" if i else "stop") for i in range(samples)]
    [leased] = engine.lease("gen", 1).tasks
    task = leased.record
    engine.submit(Submission(task.task_id, task.lease_id, "gen", task.policy_version, task.temperature, sent))
    return engine, redis.Redis.from_url(url), sent


@pytest.mark.parametrize("samples,response,prompt", [(8, 6000, 500), (8, 100, 6000)],
                         ids=["long-responses", "long-prompt"])
def test_a_stored_group_costs_its_token_ids_and_logprobs_once(redis_url, samples, response, prompt):
    engine, client, _ = store_one_group(redis_url, samples, response, prompt)
    used = client.memory_usage("footprint:step:0:groups", samples=0)
    assert used <= bound(samples, response, prompt), f"{used} bytes for {samples} x {response} + {prompt} tokens"


def test_a_stored_group_streams_back_with_every_sample_s_prompt_ids_and_logprobs(redis_url):
    engine, _, sent = store_one_group(redis_url, 3, 50, 20)
    [group] = engine.wait_for_batch(0, 0)["groups"]
    assert [s["prompt_token_ids"] for s in group["samples"]] == [s.prompt_token_ids for s in sent]
    assert [s["response_token_ids"] for s in group["samples"]] == [s.response_token_ids for s in sent]
    assert [s["response_logprobs"] for s in group["samples"]] == [s.response_logprobs for s in sent]
    assert [(s["reward"], s["finish_reason"]) for s in group["samples"]] == [(0.0, "stop"), (1.0, "length"), (0.0, "length")]
    assert [s["text"] for s in group["samples"]] == ["", "", ""]  # the text is not kept
    assert (group["task_id"], group["replica_id"]) == ("s0-0", "gen")
