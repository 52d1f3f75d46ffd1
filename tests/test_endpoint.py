"""The operators' HTTP endpoint, in process, over a real socket."""

from __future__ import annotations

import asyncio
import socket

import pytest

from harness.services import HOST
from processor.endpoint import serve_endpoint
from processor.errors import ConfigError
from processor.metrics import Metrics
from tests.test_health import Parts


async def _get(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request)
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_metrics_healthz_readyz_answer_and_anything_else_is_refused() -> None:
    metrics, parts = Metrics(), Parts()
    metrics.votes.labels("accepted").inc(3)
    async with serve_endpoint(host=HOST, port=0, metrics=metrics, health=parts.health()) as port:
        status, body = await _get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and b'votebox_votes_total{fate="accepted"} 3.0' in body
        assert await _get(port, b"GET /healthz HTTP/1.1\r\n\r\n") == (200, b"ok\n")
        assert (await _get(port, b"GET /readyz HTTP/1.1\r\n\r\n"))[0] == 200
        parts.connected = False
        status, body = await _get(port, b"GET /readyz?verbose HTTP/1.1\r\n\r\n")
        assert status == 503 and b"not connected to the broker" in body
        assert (await _get(port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await _get(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405


async def test_a_client_that_never_finishes_its_request_does_not_block_the_others() -> None:
    metrics, parts = Metrics(), Parts()
    async with serve_endpoint(host=HOST, port=0, metrics=metrics, health=parts.health()) as port:
        _, idle = await asyncio.open_connection(HOST, port)
        idle.write(b"GET /metr")
        try:
            async with asyncio.timeout(2):
                assert (await _get(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
        finally:
            idle.close()
            await idle.wait_closed()


async def test_a_port_in_use_is_a_config_error_that_names_the_variable() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="VOTEBOX_METRICS_PORT"):
            async with serve_endpoint(
                host=HOST, port=port, metrics=Metrics(), health=Parts().health()
            ):
                pass
