"""Device sites: where a kiosk stands, for analysts (the ``site`` tag of its InfluxDB points).

Rule: a site is set by an operator (``votebox device add --site``, ``votebox device site``) in
Redis, and its version bumped in the same transaction; the processor looks at the version every
`REFRESH_S`, reads all sites only when it moved, and hands each vote's to the tally, which
stores it with the vote's point, so a point written twice is written the same.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Final

from redis.asyncio import Redis

from processor.errors import ConfigError, StoreUnavailable
from processor.keys import DEVICES_SITE, DEVICES_SITE_VERSION
from processor.store import redis_errors, redis_text

__all__ = ["REFRESH_S", "Sites", "check_site", "clear_site", "read_sites", "set_site"]

log = logging.getLogger(__name__)

# How soon a site set or changed reaches the votes counted after it.
REFRESH_S: Final = 5.0
# A tag value analysts type in queries: letters, digits, spaces and _ . - (no tabs or newlines,
# which separate the tally's fields).
_SITE: Final = re.compile(r"[A-Za-z0-9_.\- ]{1,64}")


def check_site(site: str) -> str:
    """The site, or ConfigError saying what a site may be."""
    if not _SITE.fullmatch(site) or site.strip() != site:
        raise ConfigError(
            f"a site is 1-64 letters, digits, spaces, _ . - (no leading or trailing space); "
            f"got {site!r}"
        )
    return site


async def set_site(redis: Redis, device: str, site: str) -> None:
    """Put ``device`` at ``site``: the votes it casts from now on carry it."""
    check_site(site)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(DEVICES_SITE, device, site)
        pipe.incr(DEVICES_SITE_VERSION)
        await pipe.execute()


async def clear_site(redis: Redis, device: str) -> bool:
    """Take ``device``'s site away; whether it had one."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hdel(DEVICES_SITE, device)
        pipe.incr(DEVICES_SITE_VERSION)
        removed, _ = await pipe.execute()
    return bool(removed)


async def read_sites(redis: Redis) -> dict[str, str]:
    """Every device's site."""
    stored = await redis.hgetall(DEVICES_SITE)
    return {redis_text(k): redis_text(v) for k, v in stored.items()}


class Sites:
    """The processor's copy of every device's site, read again when their version moved."""

    def __init__(self, redis: Redis, *, timeout_s: float, refresh_s: float = REFRESH_S) -> None:
        self._redis = redis
        self._timeout_s = timeout_s
        self._refresh_s = refresh_s
        self.current: dict[str, str] = {}
        self._version: bytes | str | None = None
        self._loaded = False

    async def load(self) -> None:
        """Read the sites now, if they changed since the last read.

        Raises:
            StoreUnavailable: Redis is away.
        """
        with redis_errors():
            async with asyncio.timeout(self._timeout_s):
                version = await self._redis.get(DEVICES_SITE_VERSION)
                if self._loaded and version == self._version:
                    return
                # The version first: a change after it is read is seen at the next look.
                self.current = await read_sites(self._redis)
                self._version, self._loaded = version, True

    async def run(self) -> None:
        """Look for changed sites every `REFRESH_S` until cancelled; an outage keeps the last
        copy."""
        while True:
            try:
                await self.load()
            except StoreUnavailable as exc:
                log.warning("device sites not refreshed, Redis unavailable: %s", exc)
            await asyncio.sleep(self._refresh_s)
