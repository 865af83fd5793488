"""The trainer's pure torch half: batches, chunked log-probabilities and the GRPO update.

No network, no process state: the trainer service (services/trainer) feeds
these functions a model, an optimizer and a step's groups.
"""
