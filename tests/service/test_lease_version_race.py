"""A lease that lands between a report's queueing of the next step and its commit names that step's policy.

Before the fix the reply named the policy of the state read before the
store lease, older than the tasks': the replica, holding that older policy,
left the tasks to expire (a lease lifetime lost, 60 s by default).
"""

from __future__ import annotations

import threading

from e3.config import load_config
from e3.store import MemoryStore
from e3.tasks.datasets import load_split
from services.scheduler.engine import SchedulerEngine, StepReport, SubmittedSample, Submission


class LeaseDuringPlan(MemoryStore):
    """Once armed, a replica leases from another thread right after the next step is queued."""

    engine: SchedulerEngine | None = None
    reply = None

    def plan_step(self, step, tasks):
        super().plan_step(step, tasks)
        if self.engine is not None and step == 1:
            engine, self.engine = self.engine, None
            thread = threading.Thread(target=lambda: setattr(self, "reply", engine.lease("r", 100)))
            thread.start()
            thread.join(timeout=0.5)  # the lease waits for the report's commit: it cannot finish here
            self.thread = thread


def test_a_lease_between_queueing_and_commit_gets_the_new_policy_and_weights():
    store = LeaseDuringPlan()
    config = load_config(environ={}, run_dir="/", data={"train_size": 8}, validation_questions=0,
                         training={"batch_questions": 2, "steps": 4}, allocation={"n": 2, "n_low": 1, "n_high": 3})
    engine = SchedulerEngine(config, load_split(config.data, "train"), store, vocab_size=54)
    for leased in engine.lease("r", 100).tasks:
        task = leased.record
        engine.submit(Submission(task.task_id, task.lease_id, "r", 0, task.temperature,
                                 [SubmittedSample([1, 2], [3], [-0.1], "x", 1.0) for _ in range(task.num_samples)]))
    engine.wait_for_batch(0, 1.0)
    store.engine = engine
    engine.report(StepReport(0, 1.0, 1, "/weights/v1"))
    store.thread.join(timeout=10)
    reply = store.reply
    assert reply is not None and {t.record.step for t in reply.tasks} == {1}
    assert {t.record.policy_version for t in reply.tasks} == {1}
    assert (reply.policy_version, reply.weights_path) == (1, "/weights/v1")
