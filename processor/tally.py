"""Redis tally. Rule: every write for one batch happens in one round trip of script calls.

A batch is split by poll, and a poll spread over several shards by device (keys.shard_of). On
one Redis node (or Sentinel's primary) the whole batch is one script call that counts each
poll's share in turn, so a batch spread over hundreds of polls costs one call; on a Redis
Cluster each share is a call of its own, touching one hash tag's keys, and the calls travel
together in one pipeline.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from processor.changes import announce
from processor.codec import Vote
from processor.keys import (
    DEVICES_ONLINE,
    DEVICES_SEEN,
    DEVICES_SEEN_BEFORE,
    DEVICES_STATUS,
    KEY_SUFFIXES,
    SET_ASIDE,
    UNATTRIBUTED_FATES,
    PollKeys,
    batch_commit,
    fates_counted,
    shard_of,
)
from processor.reasons import Reason
from processor.store import (
    is_cluster,
    is_noscript,
    raise_if_away,
    raise_unless_replicated,
    redis_errors,
    redis_text,
    wait_for_replicas,
)

__all__ = ["COMMIT_MEMORY_S", "DEDUP_WINDOW", "CommitResult", "Tally"]

log = logging.getLogger(__name__)

# Seqs remembered per device and poll, exactly: 4096 bits = 512 bytes of Redis per device and
# poll. An offline kiosk may replay up to this many votes out of order and each counts once.
DEDUP_WINDOW: Final = 4096
SET_ASIDE_MAXLEN: Final = 100_000
# How long a poll remembers the answer it gave a batch (by the batch's token): a commit retried
# after a lost reply gets the same answer ("accepted", not "duplicate" of itself). Retries come
# within seconds; ten minutes is a wide margin at one small key per batch and poll.
COMMIT_MEMORY_S: Final = 600

_SCRIPT: Final = resources.files("processor").joinpath("tally.lua").read_text()
# KEYS[1] the unattributed fates, KEYS[2] the batch's mark; ARGV[1] how long the mark lasts,
# then reason, count pairs.
_COUNT_ONCE: Final = """
if not redis.call('SET', KEYS[2], 1, 'NX', 'PX', ARGV[1]) then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
# tally.lua's answer to a call routed by a wrong number of shards, and to one for a poll that
# does not exist (it wrote nothing); and how many times a batch's votes are routed before a
# poll being made or deleted meanwhile counts as unknown.
_MISROUTED: Final = -1
_UNKNOWN: Final = -2
_FAILED: Final = -3
# How long a poll id found not to exist is left out of the change feed (a poll made meanwhile
# is announced by its creator), and how many such ids are remembered.
_UNKNOWN_MEMORY_S: Final = 5.0
_UNKNOWN_MEMORY_MAX: Final = 10_000
_ROUTES: Final = 3
_SCRIPT_SHA: Final = hashlib.sha1(_SCRIPT.encode()).hexdigest()
# One script call: the names of the shards it counts on (keys.PollKeys.name, for the change
# feed), KEYS, ARGV.
_Call = tuple[tuple[str, ...], list[str], list[str | int]]
# Where a share of a batch's votes goes: the shard's keys, the poll's shards as we believe,
# the indexes of its votes, and their packed arguments (tally.lua, ARGV[9..]).
_Route = tuple[PollKeys, int, list[int], list[str | int]]


@dataclass(frozen=True, slots=True)
class CommitResult:
    """Outcome codes aligned with the votes given to `Tally.commit`, new poll versions, and
    the receipts asked for: by the vote's index, the (shard, entry) of its place in the poll's
    chain (tally.lua, The chain)."""

    codes: list[int]
    versions: dict[str, int]
    receipts: dict[int, tuple[int, int]] = field(default_factory=dict)


def _choice_arg(choice: int | tuple[int, ...]) -> str:
    if isinstance(choice, int):
        return str(choice)
    return ",".join(map(str, choice)) if len(choice) > 1 else str(choice[0])


class Tally:
    """Commits batches of votes to Redis.

    Args:
        redis: a client; Tally never closes it.
        timeout_s: deadline of one round trip.
        points_max: bound of each poll's queue of points for InfluxDB; 0 queues nothing.
        clock_skew_s: how far a device clock may be off and still date its vote's point.
        replicas: a commit returns only once WAIT says this many replicas have it (in the
            same round trip); fewer raise `StoreUnavailable`, so nothing is acknowledged.
        replica_timeout_ms: how long WAIT waits for them.
        dedup_window: seqs remembered per device and poll (a multiple of 8). Every processor
            of a deployment must use the same; tests make it small to reach its wrap-around.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        timeout_s: float,
        points_max: int = 0,
        clock_skew_s: int = 300,
        replicas: int = 0,
        replica_timeout_ms: int = 500,
        dedup_window: int = DEDUP_WINDOW,
    ) -> None:
        self._redis = redis
        self._window = dedup_window
        self._timeout_s = timeout_s
        self._points_max = points_max
        self._clock_skew_s = clock_skew_s
        self._replicas = replicas
        self._replica_timeout_ms = replica_timeout_ms
        # Shards of the polls spread over several (the rest have one), learnt from the script.
        self._shards: dict[str, int] = {}
        # Poll ids the script found not to exist, until when (monotonic s): not announced.
        self._unknown: dict[str, float] = {}
        # On one node (or Sentinel's primary) a batch is one script call whatever polls it
        # touches; a cluster needs one per poll (per hash tag).
        self._one_call = not is_cluster(redis)

    @property
    def redis(self) -> Redis:
        """The client it commits with (shared by the results and stats readers)."""
        return self._redis

    async def load(self) -> None:
        """Load the script, so the first batch need not; also a readiness probe of Redis.
        Moves last-seen times kept in the hash of before 2026-12-05 into their sorted set, and
        makes the set of devices online from their statuses if it is not there yet."""
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                await self._redis.script_load(_SCRIPT)
                before = await self._redis.hgetall(DEVICES_SEEN_BEFORE)
                if before:
                    # GT: a time the new set has already is newer than the old hash's.
                    mapping = {redis_text(k): int(v) for k, v in before.items()}
                    await self._redis.zadd(DEVICES_SEEN, mapping, gt=True)
                    await self._redis.delete(DEVICES_SEEN_BEFORE)
                if not await self._redis.exists(DEVICES_ONLINE):
                    await self._online_from_statuses()

    async def _online_from_statuses(self) -> None:
        """`DEVICES_ONLINE` from the statuses stored before it existed (2026-12-05): once,
        when a processor of this version first starts. A resumed MQTT session is not sent
        the retained statuses again, so they are read from Redis."""
        statuses = {
            redis_text(device): redis_text(body)
            for device, body in (await self._redis.hgetall(DEVICES_STATUS)).items()
        }
        scored: list[tuple[bytes, float]] = await self._redis.zrange(  # type: ignore[assignment]
            DEVICES_SEEN, 0, -1, withscores=True
        )
        seen = {redis_text(device): int(ms) for device, ms in scored}
        online, _ = _presence(statuses, seen)
        if online:
            await self._redis.zadd(DEVICES_ONLINE, online, nx=True)

    async def commit(
        self,
        votes: Sequence[Vote],
        *,
        now_ms: int,
        unattributed: Counter[Reason] | None = None,
        seen: Iterable[str] = (),
        reports: Mapping[str, Mapping[str, str]] | None = None,
        token: str | None = None,
        sites: Mapping[str, str] | None = None,
    ) -> CommitResult:
        """De-duplicate and count ``votes`` atomically per poll, in one round trip.

        Args:
            votes: decoded votes, any polls, any order (order within a device matters for
                nothing but which copy of a repeat is "accepted").
            now_ms: the processor's clock, stored as the tally's update time.
            unattributed: rejections of messages that name no poll, counted in the same trip.
            seen: devices heard from in this batch; their last-seen time becomes ``now_ms``.
            reports: devices' latest health reports, by Redis hash (`keys.DEVICES_HEALTH`,
                `keys.DEVICES_STATUS`), then by device; written in the same round trip.
            token: names this batch, the same for every retry of it: each poll remembers
                its answer for `COMMIT_MEMORY_S` and gives it again, so a retry after a lost
                reply is answered as the first attempt was (not "duplicate" of itself).
            sites: each device's site (processor/sites.py), stored with its votes' points.

        Returns:
            One `Fate`/`Reason` code per vote, and each changed poll's new version.

        Raises:
            StoreUnavailable: Redis is down or slow; nothing may be acknowledged.
        """
        codes = [0] * len(votes)
        versions: dict[str, int] = {}
        receipts: dict[int, tuple[int, int]] = {}
        asked: set[int] = set()  # the votes that asked for a receipt, found while routing
        set_aside: list[tuple[Vote, str]] = []
        extra: _Extra | None = _Extra(
            unattributed or Counter(), {device: now_ms for device in seen}, reports or {}, token
        )
        pending = list(range(len(votes)))
        unknown = 0
        for attempt in range(_ROUTES):
            routes = self._routes(votes, pending, sites=sites or {}, asked=asked)
            if self._one_call:
                call = self._batch_call(routes, now_ms, token)
                [batch_reply] = await self._run([call], extra)
                replies = _per_route(batch_reply, len(routes))
            else:
                calls = self._calls(routes, now_ms, token, rerouted=attempt > 0)
                replies = await self._run(calls, extra)
            extra = None  # sent with the first round trip
            pending = []
            for (keys, shards, indices, _), reply in zip(routes, replies, strict=True):
                if isinstance(reply, Exception):
                    # Only the script's own failure is left here (`_run` raised for Redis
                    # being away). It happens before its first write (tally.lua, phase 1), so
                    # nothing of this share was stored: set the votes aside, never retry them
                    # forever (that would stall every other poll).
                    log.error(
                        "tally script failed for poll %s (%d votes): %s",
                        keys.poll,
                        len(indices),
                        reply,
                    )
                    for index in indices:
                        codes[index] = int(Reason.STORE_ERROR)
                        set_aside.append((votes[index], str(reply)))
                    continue
                assert isinstance(reply, list)
                if int(reply[0]) == _UNKNOWN:
                    # docs/security.md: a made-up poll id writes no key and is published
                    # nowhere; its votes count as unattributed unknown_poll below.
                    for index in indices:
                        codes[index] = int(Reason.UNKNOWN_POLL)
                    unknown += len(indices)
                    self._forget_later(keys.poll)
                    continue
                if int(reply[0]) == _MISROUTED:
                    # The poll has another number of shards than we thought (it was made, or
                    # made again, since): nothing was written; route these votes again.
                    self._shards[keys.poll] = int(reply[1]) or 1
                    pending += indices
                    continue
                # A poll over several shards: a shard's version is not the poll's (the sum of
                # its shards'), so -1 says "changed, read it" to the results publisher.
                versions[keys.poll] = int(reply[0]) if shards == 1 else -1
                n = len(indices)
                for index, code in zip(indices, reply[1 : n + 1], strict=True):
                    codes[index] = int(code)
                if asked and len(reply) == n + 2:  # an answer from before the chain has none
                    _place(receipts, asked, indices, codes, keys.shard, int(reply[-1]))
            if not pending:
                break
        for index in pending:
            # Still misrouted: the poll is being deleted or made as we count.
            codes[index] = int(Reason.UNKNOWN_POLL)
        unknown += len(pending)
        if unknown:
            # A second round trip, only for batches that name a poll that does not exist: the
            # count lives outside every poll's slot, and the script learnt it only now.
            await self._count_unattributed(Counter({Reason.UNKNOWN_POLL: unknown}), token)
        if set_aside:
            await self._set_aside(set_aside)
        return CommitResult(codes, versions, receipts)

    def _forget_later(self, poll: str) -> None:
        if len(self._unknown) >= _UNKNOWN_MEMORY_MAX:
            self._unknown.clear()  # a flood of made-up ids must not grow us without bound
        self._unknown[poll] = time.monotonic() + _UNKNOWN_MEMORY_S

    def _announced(self, poll: str) -> bool:
        until = self._unknown.get(poll)
        if until is None:
            return True
        if time.monotonic() < until:
            return False
        del self._unknown[poll]
        return True

    async def _count_unattributed(self, counts: Counter[Reason], token: str | None) -> None:
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    _add_unattributed(pipe, counts, f"{token}.unknown" if token else None)
                    await pipe.execute()

    def _routes(
        self,
        votes: Sequence[Vote],
        indices: Iterable[int],
        *,
        sites: Mapping[str, str],
        asked: set[int],
    ) -> list[_Route]:
        """The votes given by ``indices``, by poll (by shard of a poll spread over several),
        packed as tally.lua takes them; those that ask for a receipt are added to ``asked``
        (here, where each vote is read anyway, so a batch that asks for none costs nothing)."""
        by_shard: dict[tuple[str, int], list[int]] = {}
        for index in indices:
            vote = votes[index]
            shards = self._shards.get(vote.poll, 1)
            by_shard.setdefault((vote.poll, shard_of(vote.device, shards)), []).append(index)
        routes: list[_Route] = []
        for (poll, shard), carried in by_shard.items():
            # One argument per vote: Redis splits them in C. One argument for the whole
            # batch saved the processor 0.6 us per vote and cost Redis 1.5 (Lua splitting it).
            packed: list[str | int] = []
            for index in carried:
                _, device, choice, seq, epoch, ts_s, voter, receipt = votes[index]
                if receipt:
                    asked.add(index)
                packed.append(
                    f"{device}\t{epoch}\t{seq}\t"
                    f"{choice if type(choice) is int else _choice_arg(choice)}\t"
                    f"{'' if ts_s is None else ts_s}\t{'' if voter is None else voter.hex()}"
                    f"\t{sites.get(device, '')}"
                )
            routes.append((_keys_of(poll, shard), self._shards.get(poll, 1), carried, packed))
        return routes

    def _calls(
        self, routes: list[_Route], now_ms: int, token: str | None, *, rerouted: bool
    ) -> list[_Call]:
        """One script call per poll (per shard of a poll spread over several): what a Redis
        Cluster needs, a call touching one hash tag's keys."""
        calls: list[_Call] = []
        for keys, shards, carried, packed in routes:
            args: list[str | int] = [
                now_ms,
                self._window,
                keys.window_prefix,
                self._points_max,
                self._clock_skew_s,
                COMMIT_MEMORY_S * 1000,
                shards,
                keys.shard,
                *packed,
            ]
            call_keys = list(keys.all_keys())
            if token is not None:
                if shards > 1 or rerouted:
                    # The answer is for these votes on this shard: a retry routed otherwise
                    # (the shards learnt meanwhile) must not be given another call's answer.
                    carried_crc = zlib.crc32(",".join(map(str, carried)).encode())
                    call_keys.append(keys.commit(f"{token}.{shards}.{carried_crc:x}"))
                else:
                    call_keys.append(keys.commit(token))
            calls.append(((keys.name,), call_keys, args))
        return calls

    def _batch_call(self, routes: list[_Route], now_ms: int, token: str | None) -> _Call:
        """The whole batch in one script call, on one Redis node (tally.lua, the loop at its
        end): a batch spread over hundreds of polls costs one call, not hundreds."""
        answer_key = ""
        if token is not None:
            # The answer is for this routing: a retry routed otherwise (the shards learnt
            # meanwhile) must not be given another call's answer.
            routing = ";".join(f"{keys.name}:{shards}" for keys, shards, _, _ in routes)
            answer_key = batch_commit(f"{token}.{zlib.crc32(routing.encode()):x}")
        args: list[str | int] = [
            "*",
            now_ms,
            self._window,
            self._points_max,
            self._clock_skew_s,
            COMMIT_MEMORY_S * 1000,
            answer_key,
            len(KEY_SUFFIXES),
            *KEY_SUFFIXES,
        ]
        for keys, shards, _, packed in routes:
            args += (keys.prefix, shards, keys.shard, len(packed), *packed)
        return tuple(keys.name for keys, _, _, _ in routes), [], args

    async def _set_aside(self, entries: list[tuple[Vote, str]]) -> None:
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for vote, error in entries:
                        pipe.xadd(
                            SET_ASIDE,
                            {
                                "poll": vote.poll,
                                "device": vote.device,
                                "epoch": vote.epoch,
                                "seq": vote.seq,
                                "choice": _choice_arg(vote.choice),
                                "error": error[:500],
                            },
                            maxlen=SET_ASIDE_MAXLEN,
                            approximate=True,
                        )
                    await pipe.execute()

    async def _run(self, calls: list[_Call], extra: _Extra | None) -> list[object]:
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                replies = await self._pipeline(calls, extra)
                missing = [i for i, r in enumerate(replies) if is_noscript(r)]
                if missing:
                    # Redis restarted or flushed its script cache: load and rerun only those.
                    await self._redis.script_load(_SCRIPT)
                    again = await self._pipeline([calls[i] for i in missing], None)
                    for i, reply in zip(missing, again[: len(missing)], strict=True):
                        replies[i] = reply
                # READONLY, OOM, LOADING...: the store is away, not the batch at fault.
                raise_if_away(replies)
        for reply in replies[len(calls) :]:
            if isinstance(reply, Exception):  # last-seen and health: lost until the next one
                log.warning("device bookkeeping write failed: %s", reply)
        return replies[: len(calls)]

    async def _pipeline(self, calls: list[_Call], extra: _Extra | None) -> list[object]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, keys, args in calls:
                # execute_command: redis-py's cluster pipeline refuses its evalsha method.
                pipe.execute_command("EVALSHA", _SCRIPT_SHA, len(keys), *keys, *args)
            # After the scripts, never before: a reader that sees the entry finds their writes.
            names = [name for shards, _, _ in calls for name in shards]
            announce(pipe, [name for name in names if self._announced(name.split(":")[0])])
            if extra is not None:
                _add_unattributed(pipe, extra.unattributed, extra.token)
                online, offline = _presence(extra.reports.get(DEVICES_STATUS, {}), extra.seen)
                if online:
                    pipe.zadd(DEVICES_ONLINE, online)
                if extra.seen:
                    # Outside the scripts: it spans polls, and a lost update costs nothing
                    # but a device looking silent until its next message.
                    pipe.zadd(DEVICES_SEEN, extra.seen)
                    pipe.zadd(DEVICES_ONLINE, extra.seen, xx=True)  # only those online
                if offline:
                    pipe.zrem(DEVICES_ONLINE, *offline)
                for key, latest in extra.reports.items():
                    if latest:
                        pipe.hset(key, mapping=latest)  # type: ignore[arg-type]
            in_pipeline = self._replicas and not is_cluster(self._redis)
            if in_pipeline:
                # Last on the same connection: it waits for every write above.
                pipe.execute_command("WAIT", self._replicas, self._replica_timeout_ms)
            replies = list(await pipe.execute(raise_on_error=False))
        if in_pipeline:
            raise_if_away(replies[-1:])
            raise_unless_replicated(
                replies.pop(), replicas=self._replicas, timeout_ms=self._replica_timeout_ms
            )
        elif self._replicas:
            # A cluster's writes went to several primaries: each waits for its replicas, on
            # the connection that wrote there (one per node for the tally's client).
            raise_if_away(replies)
            await wait_for_replicas(
                self._redis, replicas=self._replicas, timeout_ms=self._replica_timeout_ms
            )
        return replies


@dataclass(frozen=True, slots=True)
class _Extra:
    """The batch's writes beside the scripts, sent once (not again with a NOSCRIPT rerun)."""

    unattributed: Counter[Reason]
    seen: dict[str, int]
    reports: Mapping[str, Mapping[str, str]]
    token: str | None = None


def _presence(
    statuses: Mapping[str, str], seen: Mapping[str, int]
) -> tuple[dict[str, int], list[str]]:
    """From a batch's latest status of each device (`DeviceReports.latest`): the devices that
    came online, with when they were last seen, and those that went offline. Statuses come
    at connects and disconnects: few, so reading their JSON here costs nothing."""
    online: dict[str, int] = {}
    offline: list[str] = []
    for device, body in statuses.items():
        report = json.loads(body)
        if report.get("state") == "online":
            online[device] = max(int(report.get("at_ms", 0)), seen.get(device, 0))
        else:
            offline.append(device)
    return online, offline


@functools.lru_cache(maxsize=16_384)  # the polls a processor counts for, a few keys each
def _keys_of(poll: str, shard: int) -> PollKeys:
    return PollKeys(poll, shard)


def _place(
    receipts: dict[int, tuple[int, int]],
    asked: set[int],
    indices: list[int],
    codes: list[int],
    shard: int,
    length_before: int,
) -> None:
    """Adds the receipts of the votes in ``indices`` that asked for one (``asked``) and were
    accepted: the k-th accepted is the chain's entry ``length_before + k`` (tally.lua, The
    chain)."""
    entry = length_before
    for index in indices:
        if codes[index] == 0:
            entry += 1
            if index in asked:
                receipts[index] = (shard, entry)


def _per_route(reply: object, routes: int) -> list[object]:
    """A batch call's answer, one per route: tally.lua's answers, a poll's own failure
    ({-3, error}) as the error it was, or the call's failure for every route."""
    if not isinstance(reply, list):
        return [reply] * routes
    out: list[object] = []
    for answer in reply:
        if isinstance(answer, list) and answer and int(answer[0]) == _FAILED:
            out.append(ResponseError(redis_text(answer[1])))
        else:
            out.append(answer)
    if len(out) != routes:
        raise RuntimeError(f"the tally script answered {len(out)} polls of {routes}: a bug")
    return out


def _add_unattributed(pipe: Pipeline, counts: Counter[Reason], token: str | None) -> None:
    """Queue, on ``pipe``, the counts of fates that belong to no poll; once per ``token``
    (a batch's), like its votes: a retry after a lost reply finds its mark and adds nothing."""
    if not counts:
        return
    if token is None:
        for reason, n in counts.items():
            pipe.hincrby(UNATTRIBUTED_FATES, reason.code, n)
        return
    pipe.eval(
        _COUNT_ONCE,
        2,
        UNATTRIBUTED_FATES,
        fates_counted(token),
        COMMIT_MEMORY_S * 1000,
        *(x for reason, n in counts.items() for x in (reason.code, n)),
    )
