"""The E3 algorithms as a pure core: plain data in, plain data out.

Nothing here touches the network, Redis or process state, and nothing imports
torch at module load except `policy_loss`, which is the tensor half of GRPO.
Every service imports this package; its tests need nothing but Python.
"""
