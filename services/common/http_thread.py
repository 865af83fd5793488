"""An HTTP app served from a daemon thread, for services whose main thread is busy."""

from __future__ import annotations

import threading
import time

import uvicorn


class HttpServerThread:
    """uvicorn on a daemon thread; uvicorn skips signal handlers off the main thread."""

    def __init__(self, app, host: str, port: int, name: str = "http") -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name=name, daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        self.thread.start()
        # A port already in use ends the thread, not the process; say so here.
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                config = self.server.config
                raise OSError(f"{self.thread.name} HTTP server did not start on {config.host}:{config.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
