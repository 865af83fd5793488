"""Process plumbing shared by the service entry points."""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
from pathlib import Path


def setup_logging(service: str, level: str = "INFO") -> logging.Logger:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return logging.getLogger(service)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so loops can finish their work and exit."""
    stop = threading.Event()

    def handler(signum, frame):
        logging.getLogger("e3").info("received signal %s; finishing in-flight work", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def model_vocab_size(model_dir: str | Path) -> int:
    path = Path(model_dir) / "config.json"
    try:
        return int(json.loads(path.read_text())["vocab_size"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read vocab_size from {path}: {exc}") from exc


def serve_http(app, host: str, port: int, log_level: str = "warning", **uvicorn_options) -> None:
    """Run a FastAPI app with uvicorn until SIGTERM/SIGINT, then return normally.

    uvicorn shuts down gracefully on those signals, restores the previous
    handlers and raises the signal again; with Python's default handlers that
    kills the process before the caller's clean-up (stopping gRPC, writing the
    store snapshot) can run. Handlers that only log make the re-raise harmless.
    `uvicorn_options` add e.g. TLS (services.common.tls.uvicorn_options).
    """
    import uvicorn

    def note(signum, frame):
        logging.getLogger("e3").info("signal %s after HTTP shutdown", signum)

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options)
