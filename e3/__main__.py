"""`python -m e3` is no longer the command line: it moved to the shells (services/cli.py).

The library imports nothing from services/, so this only says where to go.
"""

import sys

if __name__ == "__main__":
    args = " ".join(sys.argv[1:]) or "run|inspect|eval"
    print(f"e3: the command line moved: run `e3 {args}` or `python -m services {args}`", file=sys.stderr)
    raise SystemExit(2)
