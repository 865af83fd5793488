"""Generation replicas: lease rollout tasks, sample them with vLLM, score them, submit them."""
