"""One module for every metric name e3 exports; code and dashboards read the same names."""

# Reward service (services/reward). Labels: verifier = arithmetic | math | python:package.module:function;
# outcome = correct | partial | incorrect | timeout | error (see e3.verify.Verdict.outcome).
REWARD_VERIFICATIONS_TOTAL = "e3_reward_verifications_total"
REWARD_LATENCY_SECONDS = "e3_reward_latency_seconds"
REWARD_TIMEOUTS_TOTAL = "e3_reward_timeouts_total"

# Scheduler service (services/scheduler).
ROLLOUTS_PLANNED_TOTAL = "e3_rollouts_planned_total"
ROLLOUTS_GENERATED_TOTAL = "e3_rollouts_generated_total"  # accepted in submitted groups, scored
ROLLOUTS_TRAINED_TOTAL = "e3_rollouts_trained_total"
ALLOCATION_ROLLOUTS = "e3_allocation_rollouts"  # histogram: rollouts given to one question
ALLOCATION_POLICY = "e3_allocation_policy"  # 1, label policy = the run's allocation.mode
ALLOCATION_ROUND_ROLLOUTS_TOTAL = "e3_allocation_round_rollouts_total"  # label round = 1 | 2 (two-round policies)
GROUPS_TOTAL = "e3_groups_total"  # label outcome = all_correct | all_wrong | mixed
GROUP_OUTCOME_SHARE = "e3_group_outcome_share"  # last trained step; label outcome
TEMPERATURE = "e3_temperature"
ENTROPY = "e3_entropy"
ENTROPY_TARGET = "e3_entropy_target"
VALIDATION_ACCURACY = "e3_validation_accuracy"  # label level = all | 1..5
VALIDATION_ROLLOUTS_TOTAL = "e3_validation_rollouts_total"  # sampled and scored by replicas, never trained
VALIDATION_TOKENS_TOTAL = "e3_validation_tokens_total"  # their response tokens
STEP = "e3_step"
RUN_FINISHED = "e3_run_finished"  # 1 once the scheduler says the run is over
SCHEDULER_HALTED = "e3_scheduler_halted"  # 1 once this scheduler stopped acting on the run (fenced, store went back)
EPOCH = "e3_epoch"
POLICY_VERSION = "e3_policy_version"
ROLLOUT_BOUNDS = "e3_rollout_bounds"  # label bound = n_min | n_max
QUEUE_DEPTH = "e3_queue_depth"
LEASED_TASKS = "e3_leased_tasks"
LEASE_EXPIRIES_TOTAL = "e3_lease_expiries_total"
SUBMISSIONS_TOTAL = "e3_submissions_total"  # label result = accepted | duplicate | rejected
# label reason = the check that failed (services.scheduler.submission): no_lease | stale_policy | wrong_temperature |
# wrong_sample_count | empty_sample | mixed_prompts | bad_logprobs | bad_reward | response_too_long | over_context |
# empty_prompt | token_out_of_vocabulary | prompt_mismatch | unknown_task
SUBMISSIONS_REJECTED_TOTAL = "e3_submissions_rejected_total"  # label reason = the check that failed, as listed above
LEASE_RENEWALS_TOTAL = "e3_lease_renewals_total"  # label result = renewed | lost
TASK_FAILURE_REPORTS_TOTAL = "e3_task_failure_reports_total"  # label outcome = requeued | failed | stale | finished
TASKS_FAILED_TOTAL = "e3_tasks_failed_total"  # label reason = prompt_too_long | engine_error | reward_error | rejected_group | lease_expired

# Generation service (services/generation). Label replica on every series.
GENERATION_TOKENS_TOTAL = "e3_generation_tokens_total"
GENERATION_TOKENS_PER_SECOND = "e3_generation_tokens_per_second"
WEIGHT_SYNC_SECONDS = "e3_weight_sync_seconds"
REPLICA_POLICY_VERSION = "e3_replica_policy_version"
POLICY_STALENESS = "e3_policy_staleness"  # scheduler's version minus the replica's
GENERATION_REWARD_RETRIES_TOTAL = "e3_generation_reward_retries_total"

# Trainer service (services/trainer).
TRAINER_STEP_SECONDS = "e3_trainer_step_seconds"  # histogram; label phase = wait | forward_backward | publish | validate
TRAINER_LOSS = "e3_trainer_loss"
TRAINER_SKIPPED_STEPS_TOTAL = "e3_trainer_skipped_steps_total"
# The last trained step's batch, from its metrics.jsonl record (a skipped step with no groups leaves them as they were).
TRAINER_MEAN_REWARD = "e3_trainer_mean_reward"
TRAINER_RESPONSE_LENGTH_TOKENS = "e3_trainer_response_length_tokens"
TRAINER_TRUNCATED_SHARE = "e3_trainer_truncated_share"
TRAINER_GRAD_NORM = "e3_trainer_grad_norm"  # the largest over the step's mini-batches (training.mini_batches)
TRAINER_CLIP_FRACTION = "e3_trainer_clip_fraction"
TRAINER_SAMPLER_LOGPROB_DIFF = "e3_trainer_sampler_logprob_diff"  # label stat = mean | max
TRAINER_GROUP_ROLLOUTS = "e3_trainer_group_rollouts"  # label level = the questions' difficulty level (0: none given)
TRAINER_SAMPLER_RATIO_MAX = "e3_trainer_sampler_ratio_max"  # exp(max |trainer - sampler| log-prob): the largest ratio
TRAINER_GROUP_STALENESS = "e3_trainer_group_staleness"  # histogram: policy versions between sampling and training
TRAINER_STALE_TOKEN_SHARE = "e3_trainer_stale_token_share"  # loss tokens an older policy sampled (max_async_level)
