"""The trainer service: pulls batches over gRPC, runs the GRPO update, measures
entropy, publishes weights and reports each step back to the scheduler."""
