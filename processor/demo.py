"""``votebox demo``: the whole pipeline on embedded defaults, on this machine, in one command.

Rule: every server it starts runs on a free loopback port with data in a temporary folder and
is stopped, by PID, when the demo ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from pathlib import Path

from redis.asyncio import Redis

from devices.simulator import SimulationSummary, simulate
from harness.services import amqtt_broker, processor, redis_server
from processor.config import MqttUrl
from processor.errors import ConfigError
from processor.polls import Poll, create_poll
from processor.watch import format_results, results_stream

__all__ = ["run_demo"]

_POLL = Poll(
    id="demo",
    title="Which snack should the stadium sell?",
    labels=("Pretzels", "Nachos", "Popcorn"),
)


async def _create_poll(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        with contextlib.suppress(ConfigError):
            await create_poll(redis, _POLL)
    finally:
        await redis.aclose()


async def _print_live(url: MqttUrl, stop: threading.Event) -> None:
    is_tty = os.isatty(1)
    drawn = 0
    async for document in results_stream(url, _POLL.id):
        text = format_results(document)
        if is_tty and drawn:
            print(f"\x1b[{drawn}F\x1b[J", end="")  # redraw in place
        print(text, flush=True)
        drawn = text.count("\n") + 1
        if stop.is_set():
            return


def run_demo(*, duration_s: float | None, devices: int, rate: float) -> int:
    """Run the demo until Ctrl-C or ``duration_s``; returns the exit code."""
    with tempfile.TemporaryDirectory(prefix="votebox-demo-") as tmp:
        root = Path(tmp)
        with redis_server(root / "redis") as redis, amqtt_broker(root / "amqtt") as broker:
            asyncio.run(_create_poll(redis.url))
            proc = processor(
                root / "processor",
                env={
                    "VOTEBOX_MQTT_URL": f"mqtt://processor@127.0.0.1:{broker.port}",
                    "VOTEBOX_MQTT_PROTOCOL": "3.1.1",
                    "VOTEBOX_REDIS_URL": redis.url,
                },
            )
            proc.start()
            try:
                print(
                    f"votebox demo: amqtt broker on mqtt://127.0.0.1:{broker.port}, Redis on "
                    f"{redis.url}, data in {root}"
                )
                print(
                    f"{devices} kiosks vote {rate:g} times a second; results are read from the "
                    f"retained topic polls/{_POLL.id}/results. Ctrl-C stops.\n"
                )
                return _vote_and_watch(broker.port, duration_s, devices, rate)
            finally:
                proc.stop()


def _vote_and_watch(port: int, duration_s: float | None, devices: int, rate: float) -> int:
    stop = threading.Event()
    summary: list[SimulationSummary] = []
    url = MqttUrl.parse(f"mqtt://demo-watch@127.0.0.1:{port}")

    async def watch() -> None:
        loop = asyncio.get_running_loop()
        voted = asyncio.Event()

        def kiosks() -> None:
            try:
                summary.append(
                    simulate(
                        host="127.0.0.1",
                        port=port,
                        poll=_POLL.id,
                        n_options=len(_POLL.labels),
                        devices=devices,
                        rate=rate,
                        duration_s=duration_s or float("inf"),
                        weights=(5, 3, 2),
                        stop=stop,
                    )
                )
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone after Ctrl-C
                    loop.call_soon_threadsafe(voted.set)

        # paho's kiosks are threaded, as firmware loops are; they stop when `stop` is set.
        voter = threading.Thread(target=kiosks, name="votebox.demo.kiosks")
        voter.start()
        try:
            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(_print_live(url, stop), name="votebox.demo.watch")
                await voted.wait()
                await asyncio.sleep(1.0)  # the results publish that follows the last ack
                watcher.cancel()
        finally:
            stop.set()
            await asyncio.to_thread(voter.join)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch())
    if summary:
        print("\n" + summary[0].line())
    return 0
