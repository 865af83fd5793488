"""Run the reward service: python -m services.reward --host 127.0.0.1 --port 8200.

/v1/score needs the generation token, which comes only from the environment
(E3_GENERATION_TOKEN or E3_AUTH__GENERATION_TOKEN, read by e3.config), never a
flag, so it does not show up in process listings. Without one it exits 2 at
once, unless E3_AUTH__INSECURE_LOOPBACK=true and --host is loopback. With
E3_TLS__CERT_FILE and E3_TLS__KEY_FILE it serves HTTPS (E3_TLS__CLIENT_CA_FILE:
mutual TLS). `--python-path DIR` (repeatable) names the
directories python: reward functions may be imported from (docs/data.md);
the launcher passes one for each entry of `reward.python_path`.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from e3.config import ConfigError, load_config
from services.common.auth import SERVICE_ROLES, require_tokens
from services.common.runtime import serve_http, setup_logging
from services.common.tls import uvicorn_options
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
    try:
        config = load_config(None)  # the environment: auth and tls
        require_tokens(config.auth, SERVICE_ROLES["reward"], "reward service", [settings.host])
    except ConfigError as exc:
        setup_logging("reward").error("cannot start: %s", exc)
        sys.exit(2)
    settings = settings.model_copy(update={"api_token": config.auth.generation_token})
    serve_http(create_app(settings), settings.host, settings.port, log_level=log_level, **uvicorn_options(config.tls))


if __name__ == "__main__":
    main()
