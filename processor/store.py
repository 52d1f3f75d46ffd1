"""The seam to Redis. Rule: the only module that makes a Redis client and the only one that
decides what a redis-py error means.

Redis being away is one condition, whatever words it uses: refused or dropped connections,
timeouts, and the error replies a healthy server gives while it cannot take writes (READONLY
replica, LOADING, OOM under `maxmemory` with `noeviction`, MISCONF after a failed save, BUSY
with a long script, NOREPLICAS under `min-replicas-to-write`, and the cluster's CLUSTERDOWN,
TRYAGAIN, MOVED, ASK, MASTERDOWN). All of them become `StoreUnavailable`: nothing is
acknowledged, the caller retries. Any other error reply is a fault of the command itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Final

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from processor.errors import StoreUnavailable

__all__ = [
    "connect",
    "is_noscript",
    "open_redis",
    "raise_if_away",
    "redis_errors",
    "redis_text",
    "store_is_away",
]

# The first word of an error reply that means "not now" rather than "not this command".
_AWAY_CODES: Final = frozenset(
    {
        "READONLY",
        "LOADING",
        "OOM",
        "MISCONF",
        "BUSY",
        "NOREPLICAS",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "MOVED",
        "ASK",
        "MASTERDOWN",
    }
)


def connect(url: str, *, timeout_s: float | None = None, retry_once: bool = False) -> Redis:
    """A client for ``url``; the caller closes it (``aclose``).

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://``.
        timeout_s: deadline of connecting and of each reply; None waits as long as it takes.
        retry_once: after a Redis restart each pooled connection fails once before it is
            replaced: try again at once on a new one. For callers whose commands are safe to
            repeat (a commit retried so is answered as its first try and counted once).
    """
    retry = Retry(NoBackoff(), 1 if retry_once else 0)
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=retry,
        retry_on_error=[redis.exceptions.ConnectionError] if retry_once else [],
    )


@contextlib.asynccontextmanager
async def open_redis(url: str, *, timeout_s: float | None = None) -> AsyncIterator[Redis]:
    """`connect`, closed when the block ends: for the commands a person runs."""
    client = connect(url, timeout_s=timeout_s)
    try:
        yield client
    finally:
        await client.aclose()


def store_is_away(error: BaseException) -> bool:
    """Whether ``error`` (raised by redis-py, or an error reply in a pipeline's results) means
    that Redis cannot take the command now, as opposed to a command that is wrong."""
    if isinstance(
        error,
        redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | OSError | TimeoutError,
    ):
        return True
    if not isinstance(error, redis.exceptions.ResponseError):
        return False
    # redis-py strips the code from the replies it has a class for and keeps it in status_code
    # (ReadOnlyError, OutOfMemoryError, MovedError...); other replies keep their first word.
    code = getattr(error, "status_code", None) or str(error).split(" ", 1)[0]
    return code in _AWAY_CODES


def is_noscript(reply: object) -> bool:
    """Whether a pipeline's reply says the script is not in Redis's cache (a restart or a
    SCRIPT FLUSH): load it and run it again."""
    return isinstance(reply, redis.exceptions.NoScriptError) or (
        isinstance(reply, redis.exceptions.ResponseError) and str(reply).startswith("NOSCRIPT")
    )


def raise_if_away(replies: Iterable[object]) -> None:
    """Raise `StoreUnavailable` if any of a pipeline's replies (``raise_on_error=False``) says
    Redis is away.

    Raises:
        StoreUnavailable: with the first such reply as its cause.
    """
    for reply in replies:
        if isinstance(reply, BaseException) and store_is_away(reply):
            raise StoreUnavailable(f"Redis: {_describe(reply)}") from reply


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Map redis-py's errors that mean "Redis is away" to `StoreUnavailable`; other errors pass.

    Raises:
        StoreUnavailable: Redis refused, dropped, timed out, or cannot take writes now.
    """
    try:
        yield
    except TimeoutError as exc:
        raise StoreUnavailable("Redis did not answer in time") from exc
    except (redis.exceptions.RedisError, OSError) as exc:
        if store_is_away(exc):
            raise StoreUnavailable(f"Redis: {_describe(exc)}") from exc
        raise


def _describe(error: BaseException) -> str:
    code = getattr(error, "status_code", None)
    return f"{code} {error}" if code else str(error)


def redis_text(value: object) -> str:
    """A Redis reply value as text (the clients here do not decode replies)."""
    return value.decode() if isinstance(value, bytes) else str(value)
