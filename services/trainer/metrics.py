"""The trainer's Prometheus series (names from e3.metric_names), set from each step's metrics.jsonl record."""

from __future__ import annotations

import math
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from e3 import metric_names as m


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class TrainerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.step_seconds = Histogram(
            m.TRAINER_STEP_SECONDS, "Wall time of one training step by phase", ["phase"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.loss = Gauge(m.TRAINER_LOSS, "GRPO loss of the last step", registry=r)
        self.skipped = Counter(m.TRAINER_SKIPPED_STEPS_TOTAL, "Steps skipped for a non-finite loss or gradient", registry=r)
        self.mean_reward = Gauge(m.TRAINER_MEAN_REWARD, "Mean reward of the last trained step's rollouts", registry=r)
        self.response_length = Gauge(m.TRAINER_RESPONSE_LENGTH_TOKENS,
                                     "Mean response length of the last trained step's rollouts, in tokens", registry=r)
        self.truncated = Gauge(m.TRAINER_TRUNCATED_SHARE,
                               "Share of the last trained step's responses cut at the response token limit", registry=r)
        self.grad_norm = Gauge(m.TRAINER_GRAD_NORM, "Gradient norm of the last step, before clipping to training.grad_clip", registry=r)
        self.clip_fraction = Gauge(m.TRAINER_CLIP_FRACTION,
                                   "Share of the last step's tokens whose importance ratio was clipped", registry=r)
        self.sampler_diff = Gauge(m.TRAINER_SAMPLER_LOGPROB_DIFF,
                                  "Absolute difference of vLLM's and the trainer's log-probability of the last step's "
                                  "sampled tokens, before the update", ["stat"], registry=r)
        self.group_rollouts = Gauge(m.TRAINER_GROUP_ROLLOUTS,
                                    "Mean rollouts per question in the last trained step, by difficulty level",
                                    ["level"], registry=r)
        self.sampler_ratio = Gauge(m.TRAINER_SAMPLER_RATIO_MAX,
                                   "Largest ratio of the trainer's to vLLM's probability of a sampled token in the "
                                   "last step (either way round), before the update", registry=r)
        self.staleness = Histogram(m.TRAINER_GROUP_STALENESS,
                                   "Policy versions between a trained group's sampling policy and the policy it "
                                   "updated (0: on-policy)", registry=r, buckets=(0, 1, 2, 3, 4, 8))
        self.stale_share = Gauge(m.TRAINER_STALE_TOKEN_SHARE,
                                 "Share of the last step's loss tokens sampled by an older policy (they carry "
                                 "decoupled PPO's truncated behaviour weight); 0 in lock-step", registry=r)
        self._levels: set[str] = set()
        # Until the first step is recorded there is no value, and 0 would be read as one (a loss, a reward
        # of 0): NaN is Prometheus' "no value", drawn as a gap.
        for gauge in (self.loss, self.mean_reward, self.response_length, self.truncated, self.grad_norm,
                      self.clip_fraction, self.sampler_ratio):
            gauge.set(math.nan)

    def observe(self, record: dict) -> None:
        for phase, seconds in record["timings"].items():
            self.step_seconds.labels(phase).observe(seconds)
        if _finite(record["loss"]):
            self.loss.set(record["loss"])
        if not record.get("rollouts"):
            return  # no groups (every task failed): nothing was sampled or trained
        self.mean_reward.set(record["mean_reward"])
        self.response_length.set(record["tokens"] / record["rollouts"])
        self.truncated.set(record.get("truncated", 0) / record["rollouts"])
        if _finite(record.get("grad_norm")):
            self.grad_norm.set(record["grad_norm"])
        self.clip_fraction.set(record.get("clip_fraction", 0.0))
        for stat in ("mean", "max"):
            if _finite(record.get(f"sampler_logprob_diff_{stat}")):
                self.sampler_diff.labels(stat).set(record[f"sampler_logprob_diff_{stat}"])
        if _finite(record.get("sampler_logprob_diff_max")):
            self.sampler_ratio.set(math.exp(record["sampler_logprob_diff_max"]))
        self.stale_share.set(record.get("stale_token_share", 0.0))
        for lag, count in (record.get("staleness") or {}).items():
            for _ in range(count):
                self.staleness.observe(int(lag))
        sizes: dict[str, list[int]] = defaultdict(list)
        for size, level in zip(record["group_sizes"], record["group_levels"]):
            sizes[str(level)].append(size)
        for level in self._levels - set(sizes):
            self.group_rollouts.remove(level)  # a level this step had no question of: no cell, not an old value
        for level, counts in sizes.items():
            self.group_rollouts.labels(level).set(sum(counts) / len(counts))
        self._levels = set(sizes)
