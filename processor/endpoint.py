"""The operators' HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``.

Rule: it is served by the processor's own event loop, so a loop that is stuck stops answering
``/healthz`` and the orchestrator restarts the process (a thread would answer for a dead loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

from processor.errors import ConfigError
from processor.health import Health
from processor.metrics import CONTENT_TYPE, Metrics

__all__ = ["serve_endpoint"]

log = logging.getLogger(__name__)

_REQUEST_MAX_BYTES: Final = 8192
_REQUEST_TIMEOUT_S: Final = 5.0
_REASONS: Final = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


@contextlib.asynccontextmanager
async def serve_endpoint(
    *, host: str, port: int, metrics: Metrics, health: Health
) -> AsyncIterator[int]:
    """Serve the endpoint while the block runs; yields the port it listens on.

    Args:
        host: address to listen on.
        port: port to listen on; 0 picks a free one.
        metrics: what ``/metrics`` exports.
        health: what ``/readyz`` asks.

    Raises:
        ConfigError: the address cannot be bound (in use, or not an address of this host).
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                status, ctype, body = await _respond(head, metrics, health)
                writer.write(
                    f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a scraper that hangs up or dawdles costs nothing but its connection
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        server = await asyncio.start_server(handle, host, port, limit=_REQUEST_MAX_BYTES)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror}); set "
            "VOTEBOX_METRICS_PORT to a free port (each processor on a host needs its own)"
        ) from None
    bound = server.sockets[0].getsockname()[1]
    log.info("metrics and health on http://%s:%d/metrics, /healthz, /readyz", host, bound)
    try:
        yield bound
    finally:
        server.close()
        await server.wait_closed()


async def _respond(head: bytes, metrics: Metrics, health: Health) -> tuple[int, str, bytes]:
    method, _, rest = head.partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    if method != b"GET":
        return 405, "text/plain", b"GET only\n"
    if path == b"/metrics":
        return 200, CONTENT_TYPE, metrics.exposition()
    if path == b"/healthz":
        return 200, "text/plain", b"ok\n"
    if path == b"/readyz":
        readiness = await health.readiness()
        return (200 if readiness.ready else 503), "application/json", readiness.to_json()
    return 404, "text/plain", b"try /metrics, /healthz or /readyz\n"
