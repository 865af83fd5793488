"""Run the reward service: python -m services.reward --host 127.0.0.1 --port 8200.

The bearer token comes only from E3_API_TOKEN, never a flag, so it does not
show up in process listings. `--python-path DIR` (repeatable) names the
directories python: reward functions may be imported from (docs/data.md);
the launcher passes one for each entry of `reward.python_path`.
"""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from services.common.runtime import serve_http
from services.reward.app import create_app
from services.reward.settings import RewardSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.reward", description=__doc__.splitlines()[0])
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--timeout-s", type=float, help="time limit per verification (default 2.0)")
    parser.add_argument("--workers", type=int, help="verifier worker processes")
    parser.add_argument("--max-batch", type=int, help="items per request (default 4096)")
    parser.add_argument("--max-response-chars", type=int, help="longer responses score 0 unparsed")
    parser.add_argument("--python-path", action="append", metavar="DIR",
                        help="directory python: reward functions are imported from (repeatable; none: python: names score 0)")
    parser.add_argument("--log-level", default="info")
    args = vars(parser.parse_args(argv))
    log_level = args.pop("log_level")
    # Unset flags fall through to the settings' defaults (and the environment).
    try:
        settings = RewardSettings(**{k: v for k, v in args.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        parser.error(problems)
    serve_http(create_app(settings), settings.host, settings.port, log_level=log_level)


if __name__ == "__main__":
    main()
