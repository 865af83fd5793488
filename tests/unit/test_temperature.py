"""The temperature controller: direction of updates, warm-up, annealing, closed loop."""

import math

import pytest
from hypothesis import given, strategies as st

from e3.core.temperature import (
    TemperatureConfig,
    TemperatureState,
    annealed_target,
    initial_state,
    observe_entropy,
)

V = 151_936  # the paper's Qwen vocabulary


def after_warmup(target=1.0, **kwargs):
    config = TemperatureConfig(vocab_size=V, **kwargs)
    return config, observe_entropy(config, initial_state(config), target)


def test_warmup_keeps_temperature_and_averages_the_target():
    config = TemperatureConfig(vocab_size=V, init_steps=3)
    state = initial_state(config)
    for entropy in (0.9, 1.2, 1.5):
        state = observe_entropy(config, state, entropy)
        assert state.temperature == 1.0
    assert state.target_entropy == pytest.approx(1.2)
    assert state.steps_observed == 3


def test_given_target_is_kept_through_warmup():
    config = TemperatureConfig(vocab_size=V, init_steps=1, target_entropy=0.7)
    state = observe_entropy(config, initial_state(config), 2.0)
    assert state.target_entropy == 0.7 and state.temperature == 1.0


def test_entropy_below_target_raises_temperature():
    config, state = after_warmup(1.0)
    assert observe_entropy(config, state, 0.5).temperature > 1.0


def test_entropy_above_target_lowers_temperature():
    config, state = after_warmup(1.0)
    assert observe_entropy(config, state, 2.0).temperature < 1.0


def test_entropy_on_target_keeps_temperature():
    config, state = after_warmup(1.0)
    assert observe_entropy(config, state, 1.0).temperature == pytest.approx(1.0)


def test_update_matches_the_formula_by_hand():
    config, state = after_warmup(0.8)
    t = 1.0
    expected = t * (1 + t * math.log(0.8 / 0.4) / (math.log(V) + math.log(math.log(V))))
    assert observe_entropy(config, state, 0.4).temperature == pytest.approx(expected, rel=1e-12)


def test_bounds_clamp_a_runaway_update():
    config, state = after_warmup(1.0, max_temperature=1.01)
    assert observe_entropy(config, state, 1e-9).temperature == 1.01


def test_annealing_endpoints():
    config = TemperatureConfig(vocab_size=V, annealing=True, total_steps=100, annealing_ratio=0.4, annealing_factor=0.9)
    assert annealed_target(config, 2.0, 0) == 2.0
    assert annealed_target(config, 2.0, 60) == pytest.approx(2.0)  # window starts at 60
    assert annealed_target(config, 2.0, 80) == pytest.approx(2.0 * 0.95)  # halfway down the cosine
    assert annealed_target(config, 2.0, 100) == pytest.approx(1.8)
    assert annealed_target(config, 2.0, 500) == pytest.approx(1.8)


@given(st.floats(0.01, 10.0), st.floats(0.01, 10.0))
def test_state_round_trips_through_a_plain_dict(temperature, entropy):
    config = TemperatureConfig(vocab_size=V, max_temperature=10.0, min_temperature=0.01, initial_temperature=1.0)
    state = observe_entropy(config, TemperatureState(temperature=temperature), entropy)
    assert TemperatureState.from_dict(state.to_dict()) == state


@pytest.mark.parametrize(
    "data, message",
    [({"temperature": 1.0, "bogus": 1}, "unknown"), ({}, "missing"), ({"temperature": -1.0}, "invalid temperature")],
)
def test_bad_state_dicts_are_rejected(data, message):
    with pytest.raises(ValueError, match=message):
        TemperatureState.from_dict(data)


@pytest.mark.parametrize("entropy", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_entropy_is_rejected(entropy):
    config, state = after_warmup(1.0)
    with pytest.raises(ValueError, match="entropy"):
        observe_entropy(config, state, entropy)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        TemperatureConfig(vocab_size=2)
    with pytest.raises(ValueError, match="total_steps"):
        TemperatureConfig(vocab_size=V, annealing=True)
    with pytest.raises(ValueError, match="target_entropy"):
        TemperatureConfig(vocab_size=V, init_steps=0)


def simulated_entropy(temperature: float, progress: float) -> float:
    """A policy whose entropy collapses as training goes on and grows with T."""
    return 1.5 * math.exp(-2.0 * progress) * temperature**1.5


def run_loop(steps: int, control: bool, vocab_size: int = 64):
    config = TemperatureConfig(vocab_size=vocab_size, init_steps=1)
    state = initial_state(config)
    entropies = []
    for step in range(steps):
        t = state.temperature if control else 1.0
        entropy = simulated_entropy(t, step / steps)
        entropies.append(entropy)
        state = observe_entropy(config, state, entropy)
    return state, entropies


def test_closed_loop_holds_entropy_near_target_where_fixed_temperature_collapses():
    steps = 300
    state, controlled = run_loop(steps, control=True)
    _, fixed = run_loop(steps, control=False)
    target = state.target_entropy
    assert target == pytest.approx(1.5)
    # After a settling period the controlled entropy stays within 5% of target...
    assert all(abs(h - target) / target < 0.05 for h in controlled[30:])
    # ...while at fixed temperature it falls to exp(-2) of where it started.
    assert fixed[-1] < 0.2 * target
    assert state.temperature > 1.5  # the controller had to heat the policy up
