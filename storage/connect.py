"""One way to open the Redis client, with the password from the environment (never from config)."""

from __future__ import annotations

import os

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

ENV_PASSWORD = "STYLEBOT_REDIS_PASSWORD"


def connect(url: str, *, max_connections: int = 64, pool_timeout_s: float = 5.0) -> redis.Redis:
    """A client that retries with exponential backoff (0.1 s up to 5 s) when Redis restarts, on a pool of at most
    `max_connections` that makes a command wait up to `pool_timeout_s` for a free connection (then raises
    `ConnectionError`, which the front ends answer with "busy") instead of failing at once."""
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout_s,
        password=os.environ.get(ENV_PASSWORD) or None, retry=Retry(ExponentialBackoff(cap=5, base=0.1), retries=20),
        retry_on_error=[ConnectionError, TimeoutError], health_check_interval=30)
    return redis.Redis(connection_pool=pool)
