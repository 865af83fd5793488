"""e3: the E3 method (difficulty-based rollout budgets and entropy-targeting
temperature control) for RL on reasoning LLMs, as a library and as services."""

__version__ = "0.1.0"
