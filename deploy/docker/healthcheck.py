#!/usr/bin/env python3
"""Container health check: exit 0 if GET <url> answers 2xx in time, else 1.

    e3-healthcheck [--index-0-only] URL [TIMEOUT_S]

The images have no curl or wget; Python is always there. A 503 from /readyz
raises HTTPError, so "not ready yet" counts as unhealthy.

--index-0-only is for the trainer's pods in a Kubernetes Indexed Job: only
torch rank 0 serves HTTP, and it runs on the pod of completion index 0, so a
pod whose JOB_COMPLETION_INDEX is another number has nothing to ask and passes
(its liveness is torchrun's: a failed rank ends the container).
"""

import os
import sys
import urllib.request

INDEX_ONLY = "--index-0-only"


def main(argv: list[str]) -> int:
    args = argv[1:]
    index_0_only = bool(args) and args[0] == INDEX_ONLY
    if index_0_only:
        args = args[1:]
    if len(args) not in (1, 2):
        print(f"usage: e3-healthcheck [{INDEX_ONLY}] URL [TIMEOUT_S]", file=sys.stderr)
        return 2
    if index_0_only and os.environ.get("JOB_COMPLETION_INDEX", "0") != "0":
        return 0
    url, timeout_s = args[0], float(args[1]) if len(args) == 2 else 3.0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 0 if 200 <= response.status < 300 else 1
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"; say which
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
