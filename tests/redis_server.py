"""A throwaway redis-server for tests: own port, own directory, stopped after.

Tests never touch a Redis the machine already runs (port 6379): each server
here binds 127.0.0.1 on a free port and keeps its files in a temp directory.
With `appendonly=True` it writes an AOF there, so a test can stop it and
start it again on the same directory and port to prove data survives;
`appendfsync="always"` makes every write durable even through `kill()`.
`password` starts it with --requirepass.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

REDIS_SERVER = "/usr/bin/redis-server"


def redis_server_binary() -> str | None:
    """The redis-server to run, or None when this machine has none."""
    return REDIS_SERVER if Path(REDIS_SERVER).exists() else shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, directory: Path, *, appendonly: bool = False, port: int | None = None,
                 appendfsync: str = "everysec", password: str | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(f"no redis-server at {REDIS_SERVER} or on PATH")
        self.binary = binary
        self.directory = Path(directory)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = password
        self.port = port or free_port()
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        """Start the server (again, on the same port and files) and wait for PING."""
        if self._proc is not None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--logfile", str(self.log),
            "--save", "",  # no RDB dumps: durability, when wanted, comes from the AOF
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no",
        ] + (["--requirepass", self.password] if self.password else [])
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, password=self.password)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {self._log_tail()}")
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    pass  # not listening yet (or loading its AOF): try again
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {timeout_s}s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Redis flushes its AOF on it) and wait; SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to flush anything."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()

    def _log_tail(self) -> str:
        stderr = self._proc.stderr.read().decode(errors="replace") if self._proc and self._proc.stderr else ""
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        return (stderr + log)[-2000:]

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
