"""Entropy-targeting temperature control (E3.md section 2).

After each training step the trainer reports the policy's mean token entropy
H, measured at the temperature T the step's responses were sampled with. For
the first `init_steps` reports T stays put and the entropies are averaged into
the target H* (unless a target is configured). Every later report moves T by

    T <- T * (1 + T * ln(H*/H) / (ln V + ln ln V))

with V the vocabulary size: entropy below target raises T, above lowers it.
Optionally the target is annealed along a cosine over the last part of the
run. The state is a small record that round-trips through a plain dict, so a
store (memory or Redis) can keep it between steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class TemperatureConfig:
    """Settings of the controller; defaults are the reference's."""

    vocab_size: int
    initial_temperature: float = 1.0
    init_steps: int = 1
    target_entropy: float | None = None
    annealing: bool = False
    annealing_ratio: float = 0.4
    annealing_factor: float = 0.9
    total_steps: int | None = None
    # The reference applies no bounds; these are wide enough never to bind in
    # its regime (T stays near 1) and only stop a runaway loop.
    min_temperature: float = 0.05
    max_temperature: float = 5.0

    def __post_init__(self) -> None:
        if self.vocab_size < 3:
            # ln ln V must be defined and positive.
            raise ValueError(f"vocab_size must be >= 3, got {self.vocab_size}")
        if not 0 < self.min_temperature <= self.initial_temperature <= self.max_temperature:
            raise ValueError(
                "temperatures must satisfy 0 < min_temperature <= initial_temperature <= max_temperature, got "
                f"{self.min_temperature}, {self.initial_temperature}, {self.max_temperature}"
            )
        if self.init_steps < 0:
            raise ValueError(f"init_steps must be >= 0, got {self.init_steps}")
        if self.init_steps == 0 and self.target_entropy is None:
            raise ValueError("init_steps=0 needs a target_entropy: there is no warm-up to estimate it")
        if self.target_entropy is not None and not (math.isfinite(self.target_entropy) and self.target_entropy > 0):
            raise ValueError(f"target_entropy must be a positive number, got {self.target_entropy}")
        if not 0 <= self.annealing_ratio <= 1:
            raise ValueError(f"annealing_ratio must be in [0, 1], got {self.annealing_ratio}")
        if not 0 < self.annealing_factor <= 1:
            raise ValueError(f"annealing_factor must be in (0, 1], got {self.annealing_factor}")
        if self.annealing and (self.total_steps is None or self.total_steps < 1):
            raise ValueError("annealing needs total_steps >= 1 (the planned length of the run)")

    @property
    def vocab_scale(self) -> float:
        """ln V + ln ln V, the denominator of the update rule."""
        return math.log(self.vocab_size) + math.log(math.log(self.vocab_size))


@dataclass(frozen=True)
class TemperatureState:
    """Where the controller stands: T for the next step and the target."""

    temperature: float
    steps_observed: int = 0
    target_entropy: float | None = None
    warmup_entropy_sum: float = 0.0
    last_entropy: float | None = None
    last_target: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TemperatureState":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown temperature state fields: {sorted(unknown)}")
        if "temperature" not in data:
            raise ValueError("temperature state is missing 'temperature'")
        state = cls(**data)
        if not (math.isfinite(state.temperature) and state.temperature > 0):
            raise ValueError(f"temperature state has invalid temperature {state.temperature}")
        if state.steps_observed < 0:
            raise ValueError(f"temperature state has negative steps_observed {state.steps_observed}")
        return state


def initial_state(config: TemperatureConfig) -> TemperatureState:
    return TemperatureState(temperature=config.initial_temperature, target_entropy=config.target_entropy)


def annealed_target(config: TemperatureConfig, base_target: float, step: int) -> float:
    """The target at 0-based `step`: H* until the annealing window, then a cosine down to f * H*."""
    if not config.annealing:
        return base_target
    total = config.total_steps
    start = total * (1.0 - config.annealing_ratio)
    span = total - start
    if span <= 0:
        return base_target
    progress = min(max((step - start) / span, 0.0), 1.0)
    f = config.annealing_factor
    return base_target * ((1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * progress)) + f)


def observe_entropy(config: TemperatureConfig, state: TemperatureState, entropy: float) -> TemperatureState:
    """The state after the trainer reports the mean token entropy of one step."""
    if not (isinstance(entropy, (int, float)) and math.isfinite(entropy) and entropy > 0):
        raise ValueError(f"measured entropy must be a positive finite number, got {entropy!r}")
    step = state.steps_observed

    if step < config.init_steps:
        warmup_sum = state.warmup_entropy_sum + entropy
        target = state.target_entropy
        if config.target_entropy is None and step == config.init_steps - 1:
            target = warmup_sum / config.init_steps
        return replace(
            state,
            steps_observed=step + 1,
            warmup_entropy_sum=warmup_sum,
            target_entropy=target,
            last_entropy=entropy,
            last_target=target,
        )

    target = annealed_target(config, state.target_entropy, step)
    t = state.temperature
    new_t = t * (1.0 + t * math.log(target / entropy) / config.vocab_scale)
    new_t = min(max(new_t, config.min_temperature), config.max_temperature)
    return replace(state, temperature=new_t, steps_observed=step + 1, last_entropy=entropy, last_target=target)
