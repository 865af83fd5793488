#!/usr/bin/env python3
"""Container health check: exit 0 if GET <url> answers 2xx in time, else 1.

The images have no curl or wget; Python is always there. A 503 from /readyz
raises HTTPError, so "not ready yet" counts as unhealthy.
"""

import sys
import urllib.request


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: e3-healthcheck URL [TIMEOUT_S]", file=sys.stderr)
        return 2
    url, timeout_s = argv[1], float(argv[2]) if len(argv) == 3 else 3.0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 0 if 200 <= response.status < 300 else 1
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"; say which
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
