"""One way to open the Redis client, with the password from the environment (never from config), and how long it
waits for a Redis that does not answer: an engine is patient (its jobs wait in Redis; a restart is minutes), a front
end is not (a person waits for its answer: it says within seconds that the storage is away)."""

from __future__ import annotations

import os

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

ENV_PASSWORD = "STYLEBOT_REDIS_PASSWORD"
POOL_EXHAUSTED = "No connection available."  # redis-py's message when no pooled connection freed up in time


def connect(url: str, *, max_connections: int = 64, pool_timeout_s: float = 5.0, patient: bool = True) -> redis.Redis:
    """A client on a pool of at most `max_connections` that makes a command wait up to `pool_timeout_s` for a free
    connection (then raises `ConnectionError`, which the front ends answer with "busy") instead of failing at once.
    `patient` (the engine): a command retries with exponential backoff, 0.1 s up to 5 s, 20 times (about 80 s) while
    Redis restarts. Not patient (the front ends): 3 retries, 0.1 s to 0.4 s, and at most 1 s to open a connection,
    so that a command fails within about 2 s when Redis is away (`unreachable` tells that failure apart)."""
    retry = Retry(ExponentialBackoff(cap=5, base=0.1), retries=20) if patient else \
        Retry(ExponentialBackoff(cap=0.4, base=0.1), retries=3)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout_s,
        password=os.environ.get(ENV_PASSWORD) or None, retry=retry, retry_on_error=[ConnectionError, TimeoutError],
        health_check_interval=30, socket_connect_timeout=None if patient else 1.0)
    return redis.Redis(connection_pool=pool)


def unreachable(e: BaseException) -> bool:
    """Whether a Redis error means that the server is not answering (down, restarting, unreachable), as against
    every pooled connection being busy (a load the front ends answer with "busy") or a reply Redis refused."""
    return isinstance(e, (ConnectionError, TimeoutError)) and str(e) != POOL_EXHAUSTED
