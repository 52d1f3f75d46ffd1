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

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, Final, cast

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.connection import parse_url

from processor.config import RedisTarget
from processor.errors import StoreUnavailable

__all__ = [
    "connect",
    "is_cluster",
    "is_noscript",
    "open_redis",
    "raise_if_away",
    "raise_unless_replicated",
    "redis_errors",
    "redis_text",
    "store_is_away",
    "wait_for_replicas",
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


def connect(
    target: RedisTarget | str,
    *,
    timeout_s: float | None = None,
    retry_once: bool = False,
    single_connection: bool = False,
) -> Redis:
    """A client for ``target``; the caller closes it (``aclose``).

    Args:
        target: one node by URL (``redis://``, ``rediss://``, ``unix://``), or a
            `RedisTarget` that may name Sentinels: the client then talks to the primary they
            name, and asks them again after a failover (redis-py's SentinelConnectionPool).
        timeout_s: deadline of connecting and of each reply; None waits as long as it takes.
        retry_once: after a Redis restart each pooled connection fails once before it is
            replaced: try again at once on a new one. For callers whose commands are safe to
            repeat (a commit retried so is answered as its first try and counted once).
        single_connection: every command, pipelines too, on one connection (a pool of one), so
            that WAIT (`wait_for_replicas`) covers every write made before it: WAIT waits
            for the writes of its own connection only. For the commands a person runs.
    """
    target = _target(target)
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1 if retry_once else 0),
        "retry_on_error": [redis.exceptions.ConnectionError] if retry_once else [],
    }
    if target.cluster:
        # Any node leads to the others; MOVED and ASK are followed by the client. Typed as a
        # Redis: RedisCluster answers the same commands, and the pipelines here use only those
        # it allows (EVALSHA is sent with execute_command). single_connection: one connection
        # per node, so that WAIT on a node covers what was written there.
        cluster = RedisCluster.from_url(
            target.url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=1 if single_connection else 100,
        )
        return cast(Redis, cluster)
    if single_connection:
        options["max_connections"] = 1
    if not target.sentinels:
        if single_connection:
            pool = BlockingConnectionPool.from_url(target.url, timeout=timeout_s, **options)
            return Redis.from_pool(pool)
        return Redis.from_url(target.url, **options)
    assert target.service is not None  # Settings checks they come together
    # The password and db are the primary's, from the URL; the Sentinels are asked without.
    node = parse_url(target.url)  # type: ignore[no-untyped-call]
    node = {key: node[key] for key in ("username", "password", "db") if key in node}
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
        list(target.sentinels),
        sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s},
    )
    sentinel_pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
        target.service, sentinel, **node, **options
    )
    client = _SentinelRedis(connection_pool=sentinel_pool)
    client.sentinels = list(sentinel.sentinels)
    return client


def _target(target: RedisTarget | str) -> RedisTarget:
    return RedisTarget(target) if isinstance(target, str) else target


class _SentinelRedis(Redis):
    """A client of the primary the Sentinels name; it owns its pool and its Sentinel clients."""

    sentinels: list[Redis]

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool=True)
        for sentinel in self.sentinels:
            await sentinel.aclose()


@contextlib.asynccontextmanager
async def open_redis(
    target: RedisTarget | str, *, timeout_s: float | None = None
) -> AsyncIterator[Redis]:
    """`connect`, on one connection, closed when the block ends: for the commands a person
    runs. With ``target.replicas``, the block's writes are waited for before it ends.

    Raises:
        StoreUnavailable: fewer replicas than asked have the block's writes (they are made on
            the primary, and may be lost if it fails before they reach a replica).
    """
    target = _target(target)
    client = connect(target, timeout_s=timeout_s, single_connection=True)
    try:
        yield client
        await wait_for_replicas(
            client, replicas=target.replicas, timeout_ms=target.replica_timeout_ms
        )
    finally:
        await client.aclose()


async def wait_for_replicas(client: Redis, *, replicas: int, timeout_ms: int) -> None:
    """WAIT until ``replicas`` replicas have this connection's writes (0: return at once).

    Raises:
        StoreUnavailable: fewer answered within ``timeout_ms``.
    """
    if not replicas:
        return
    with redis_errors():
        if isinstance(client, RedisCluster):
            # Every primary, each on its one connection (connect(single_connection=True)):
            # a primary this client did not write to answers at once.
            # gather, not a TaskGroup: a node's error must reach redis_errors as itself, not
            # wrapped in an ExceptionGroup.
            answers = await asyncio.gather(
                *(
                    client.execute_command("WAIT", replicas, timeout_ms, target_nodes=node)
                    for node in client.get_primaries()
                ),
                return_exceptions=True,
            )
            for answer in answers:
                if isinstance(answer, BaseException):
                    raise answer
            reached = min(int(answer) for answer in answers)
        else:
            reached = await client.execute_command(  # type: ignore[no-untyped-call]
                "WAIT", replicas, timeout_ms
            )
    raise_unless_replicated(reached, replicas=replicas, timeout_ms=timeout_ms)


def is_cluster(client: Redis) -> bool:
    """Whether ``client`` is a Redis Cluster's (made by `connect`)."""
    return isinstance(client, RedisCluster)


def raise_unless_replicated(reply: object, *, replicas: int, timeout_ms: int) -> None:
    """Raise unless WAIT's ``reply`` counts ``replicas`` replicas.

    Raises:
        StoreUnavailable: fewer replicas have the writes (or WAIT itself failed): the
            primary has them, a promoted replica might not, so nothing may be acknowledged.
    """
    if isinstance(reply, BaseException):
        raise StoreUnavailable(f"Redis WAIT failed: {_describe(reply)}") from reply
    reached = int(reply)  # type: ignore[call-overload]
    if reached < replicas:
        raise StoreUnavailable(
            f"only {reached} of {replicas} Redis replicas have the writes after {timeout_ms} ms"
            " (VOTEBOX_REDIS_REPLICAS): nothing is acknowledged until they do"
        )


def store_is_away(error: BaseException) -> bool:
    """Whether ``error`` (raised by redis-py, or an error reply in a pipeline's results) means
    that Redis cannot take the command now, as opposed to a command that is wrong."""
    if isinstance(
        error,
        redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | OSError
        | TimeoutError
        | redis.exceptions.SlotNotCoveredError,
    ):
        return True
    if isinstance(error, redis.exceptions.RedisClusterException):
        # Not a RedisError: redis-py's cluster client says so when no node it knows answers
        # (a failover under way); its other uses of it are faults of the command.
        return str(error).startswith("Redis Cluster cannot be connected")
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
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
        if store_is_away(exc):
            raise StoreUnavailable(f"Redis: {_describe(exc)}") from exc
        raise


def _describe(error: BaseException) -> str:
    code = getattr(error, "status_code", None)
    return f"{code} {error}" if code else str(error)


def redis_text(value: object) -> str:
    """A Redis reply value as text (the clients here do not decode replies)."""
    return value.decode() if isinstance(value, bytes) else str(value)
