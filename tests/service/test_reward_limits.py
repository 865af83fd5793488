"""The reward service's bounds on one client: body size checked before parsing, turns taken between clients.

The app is served by uvicorn on loopback (in this process) and called over
real sockets: raw ones where the test must see what is answered before a body is sent.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from services.common.http_thread import HttpServerThread
from services.common.runtime import free_port
from services.reward.app import create_app
from services.reward.settings import RewardSettings

TOKEN = "reward-limits-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 1 << 20
TIMEOUT_S = 0.5
SLOW = {"verifier": "math", "response": r"\boxed{9^{9^{9^{9^{9}}}}}", "ground_truth": "1"}  # runs to the timeout
FAST = {"verifier": "arithmetic", "response": "2", "ground_truth": "2"}


@pytest.fixture(scope="module")
def service():
    port = free_port()
    settings = RewardSettings(api_token=TOKEN, workers=2, timeout_s=TIMEOUT_S, max_body_bytes=MAX_BODY)
    server = HttpServerThread(create_app(settings), "127.0.0.1", port, name="reward-limits")
    server.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while httpx.get(f"{base}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "reward workers did not start"
        time.sleep(0.1)
    yield {"port": port, "base": base}
    server.stop()


def answer_to_headers(port: int, headers: str, body: bytes = b"") -> str:
    """Send the request head (and `body`), never the rest; the status line answered within 3 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n".encode()
                     + body)
        return sock.recv(65536).decode(errors="replace")


def test_an_unauthenticated_or_oversized_body_is_refused_before_it_is_read(service):
    # Today's probe: a 97 MB unauthenticated body was read and parsed before the 401.
    reply = answer_to_headers(service["port"], "Content-Length: 97000000\r\n")
    assert reply.startswith("HTTP/1.1 401"), reply[:200]
    reply = answer_to_headers(service["port"], f"Authorization: Bearer {TOKEN}\r\nContent-Length: {MAX_BODY + 1}\r\n")
    assert reply.startswith("HTTP/1.1 413") and str(MAX_BODY) in reply, reply[:300]


def test_a_chunked_body_is_cut_off_at_the_limit(service):
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY // len(chunk) + 2))
    reply = answer_to_headers(service["port"], f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n", body)
    assert reply.startswith("HTTP/1.1 413") and str(MAX_BODY) in reply, reply[:300]
    # Under the limit, a chunked body is scored as usual.
    ok = json.dumps({"items": [FAST]}).encode()
    reply = answer_to_headers(service["port"], f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n",
                              b"%x\r\n%s\r\n0\r\n\r\n" % (len(ok), ok))
    assert reply.startswith("HTTP/1.1 200") and '"reward":1.0' in reply, reply[:300]


def test_a_one_item_request_does_not_wait_behind_another_clients_slow_batch(service):
    slow_items = 12  # 12 timeouts on 2 workers: 3 s first come, first served
    done = {}

    def slow_client() -> None:
        # Another client: another source address on loopback.
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport, timeout=30) as http:
            done["slow"] = http.post(f"{service['base']}/v1/score", json={"items": [SLOW] * slow_items}, headers=AUTH)

    thread = threading.Thread(target=slow_client)
    thread.start()
    time.sleep(0.3)  # the slow batch is queued and running
    begin = time.monotonic()
    fast = httpx.post(f"{service['base']}/v1/score", json={"items": [FAST]}, headers=AUTH, timeout=30)
    waited = time.monotonic() - begin
    thread.join()
    assert fast.status_code == 200 and fast.json()["verdicts"][0]["reward"] == 1.0
    # At most one slow item per worker runs ahead of it (it waited 3 s behind the whole batch).
    assert waited < TIMEOUT_S + 1.0, f"the one-item request waited {waited:.2f}s"
    assert done["slow"].status_code == 200 and len(done["slow"].json()["verdicts"]) == slow_items
