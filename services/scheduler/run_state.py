"""The scheduler's run state: the one document in the store that says where the run stands.

The engine saves it whole (store.save_state) at start-up and at each adopted
report, its commit point, and reads it back (store.load_state) when it starts.
`to_dict` writes the same JSON document the engine wrote when the state was a
plain dict: the keys in OMITTED_AT_DEFAULT are absent until they first hold
something. `from_dict` reads such a document and refuses one with a key it
does not know or without a required one, naming the key, so that a typo or a
document of another scheduler version is an error rather than state silently
dropped. A new field is one line with a default: older documents load with it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from e3.config import TemperatureSettings
from e3.core.temperature import TemperatureState

ALLOCATION_HISTORY = 64  # steps whose allocation (and report entry) the state document keeps
# Keys the document holds only once they differ from their default, as the dict-based engine wrote them.
OMITTED_AT_DEFAULT = frozenset({"validation", "final_validation", "tasks_failed", "failed_tasks", "trainer_epoch"})


@dataclass
class RunState:
    """Where the run stands; `step` is the step being generated (or, once finished, the steps trained)."""

    step: int
    policy_version: int
    weights_path: str  # the policy replicas load; "" for the base model
    finished: bool
    temperature: TemperatureState  # the controller's state (e3.core.temperature)
    allocations: dict[str, dict] = field(default_factory=dict)  # str(step) -> its plan record
    reports: list[dict] = field(default_factory=list)  # the last ALLOCATION_HISTORY report entries
    validation: dict | None = None  # the last finished validation: step, policy_version and pass@1 figures
    final_validation: dict | None = None  # the validation of the final policy, once reported
    tasks_failed: int = 0  # tasks of trained steps marked failed (services.scheduler.failures)
    failed_tasks: list[dict] = field(default_factory=list)  # the last FAILED_HISTORY of them
    # Goes up by one with every save (services.scheduler.reconcile): the store holding a lower
    # one than this scheduler last wrote went backwards. 0 in documents written before revisions.
    revision: int = 0
    trainer_epoch: int = 0  # the current trainer's epoch (RegisterTrainer); 0 until one registers

    def step_temperature(self, settings: TemperatureSettings) -> float:
        """T for this state's step; fixed at the initial value without control."""
        return self.temperature.temperature if settings.control else settings.initial

    def to_dict(self) -> dict:
        """The state document; it shares this state's lists and dicts (the store serialises it at once)."""
        doc = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in OMITTED_AT_DEFAULT and value == _default(f):
                continue
            doc[f.name] = value.to_dict() if isinstance(value, TemperatureState) else value
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> RunState:
        """Read a state document; a key it does not know, or a required key it lacks, is a ValueError naming it."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(doc) - set(known))
        if unknown:
            raise ValueError(f"the stored run state has unknown key(s) {unknown}; known keys are {sorted(known)}")
        missing = sorted(name for name, f in known.items() if name not in doc and _default(f) is MISSING)
        if missing:
            raise ValueError(f"the stored run state lacks the required key(s) {missing}")
        values = dict(doc)
        values["temperature"] = TemperatureState.from_dict(doc["temperature"])
        return cls(**values)


def _default(f):
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default
