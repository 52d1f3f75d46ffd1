"""A TCP proxy on loopback that can stop forwarding without closing anything: the partition a
dead switch or a stuck NAT makes, which neither end sees until a deadline runs out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["Proxy", "proxy_to"]


class Proxy:
    """Forwards every connection to its target while not held."""

    def __init__(self, target_port: int) -> None:
        self.port = 0
        self._target_port = target_port
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()

    def hold(self) -> None:
        """Stop forwarding, in both directions, on every connection, new ones too."""
        self._flowing.clear()

    def release(self) -> None:
        """Forward again, starting with what was read before the hold."""
        self._flowing.set()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(65536)
                await self._flowing.wait()  # what was read when the hold began waits too
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.close()
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pump(reader, up_writer))
            tg.create_task(self._pump(up_reader, writer))

    def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@contextlib.asynccontextmanager
async def proxy_to(target_port: int) -> AsyncIterator[Proxy]:
    """A `Proxy` to ``127.0.0.1:target_port`` on a free loopback port; every connection it
    carries is closed when the block ends."""
    proxy = Proxy(target_port)
    server = await asyncio.start_server(proxy._track, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        proxy.release()
        server.close()
        for task in list(proxy._tasks):
            task.cancel()
        await asyncio.gather(*proxy._tasks, return_exceptions=True)
