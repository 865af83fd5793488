"""`python -m services run|inspect|eval`: the `e3` command line (services/cli.py)."""

from services.cli import main

# Guarded: vLLM's engine core may start by re-importing the main module
# (`e3 eval` builds an engine in this process).
if __name__ == "__main__":
    raise SystemExit(main())
