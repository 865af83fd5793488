"""The scheduler service: dataset order, difficulty statistics, rollout budgets,
temperature and policy version, served over gRPC (work) and HTTP (state)."""
