"""Shared fixtures: a private redis-server for the session, a clean database per test."""

from __future__ import annotations

import pytest
import redis

from redis_server import RedisServer, redis_server_binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """The URL of a redis-server started for this test session (never port 6379)."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def redis_url(redis_server: str):
    """The session server's URL, its database emptied before the test."""
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    return redis_server
