"""The replica's vLLM engine settings: from the config to the keywords vLLM gets, and the bad ones refused early."""

import pytest

from e3.config import ConfigError, load_config
from services.generation.engine import EngineSettings, engine_arguments


def test_the_scheduler_limits_reach_vllm_by_name():
    config = load_config(environ={"E3_GENERATION__MAX_NUM_SEQS": "384", "E3_GENERATION__MAX_NUM_BATCHED_TOKENS": "6000"})
    arguments = engine_arguments("/models/m", EngineSettings.from_config(config.generation, seed=3), on_cpu=False)
    assert (arguments["max_num_seqs"], arguments["max_num_batched_tokens"]) == (384, 6000)


def test_unset_limits_are_stated_not_left_to_vllm():
    # vLLM's offline LLM class picks other defaults than an AsyncLLM engine; the keywords must carry numbers
    # so that the throughput benchmark's offline side runs with the replica's limits.
    arguments = engine_arguments("/models/m", EngineSettings.from_config(load_config(environ={}).generation, seed=0),
                                 on_cpu=True)
    assert isinstance(arguments["max_num_seqs"], int) and isinstance(arguments["max_num_batched_tokens"], int)


def test_a_step_budget_smaller_than_its_sequences_is_refused_with_both_names():
    with pytest.raises(ConfigError) as refused:
        load_config(environ={"E3_GENERATION__MAX_NUM_SEQS": "512", "E3_GENERATION__MAX_NUM_BATCHED_TOKENS": "256"})
    message = str(refused.value)
    assert "max_num_batched_tokens (256)" in message and "max_num_seqs (512)" in message
