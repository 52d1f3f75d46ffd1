"""One thread that runs many device clients: what the fleet simulator needs, never firmware.

Rule: a device's own loop (`DeviceClient.run`, paho's ``loop()``) waits in ``select()``, which
cannot watch a file descriptor numbered 1024 or more; 500 kiosks in one process hold thousands
(a socket, paho's wake-up pair and an SQLite outbox each), and 500 threads would spend the GIL
on waking up. Here one selector (epoll on Linux) services every device's socket, and every
device gets its turn (connect when due, keepalive, flush, heartbeat) every ``tick_s``.
"""

from __future__ import annotations

import contextlib
import selectors
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from paho.mqtt.enums import MQTTErrorCode

from devices.client import DeviceClient

__all__ = ["running_together"]

_OK = MQTTErrorCode.MQTT_ERR_SUCCESS


@contextlib.contextmanager
def running_together(clients: Sequence[DeviceClient], *, tick_s: float = 0.2) -> Iterator[None]:
    """Run every client's loop in one thread until the block ends; then take each offline
    cleanly (a retained "offline", then DISCONNECT), as `DeviceClient.running` does for one.

    Raises:
        Whatever stopped the loop's thread, when the block ends.
    """
    stop = threading.Event()
    failures: list[BaseException] = []

    def main() -> None:
        try:
            _FleetLoop(clients, tick_s).run(stop)
        except BaseException as exc:  # re-raised in the caller's thread
            failures.append(exc)

    thread = threading.Thread(target=main, name="device-fleet", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failures:
        raise failures[0]


class _FleetLoop:
    def __init__(self, clients: Sequence[DeviceClient], tick_s: float) -> None:
        self._clients = clients
        self._tick_s = tick_s
        self._selector = selectors.DefaultSelector()
        self._watched: dict[DeviceClient, Any] = {}  # the socket registered for each client

    def run(self, stop: threading.Event) -> None:
        try:
            next_turn = 0.0
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_turn:
                    next_turn = now + self._tick_s
                    self._turn()
                self._service(timeout_s=max(0.0, next_turn - time.monotonic()))
            self._close_all()
        finally:
            self._selector.close()

    def _turn(self) -> None:
        """Every client's turn: connect when due, keepalive, flush, heartbeat."""
        for client in self._clients:
            client.connect_if_due()
            if client.mqtt.socket() is not None:
                client.serviced(client.mqtt.loop_misc())
        self._watch(self._clients)

    def _service(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for sockets to read or write, and read and write them.

        Only the clients serviced here are looked at again, so a wake-up costs what its events
        cost, not a pass over the whole fleet (each turn makes that pass)."""
        touched = []
        for key, mask in self._selector.select(timeout=timeout_s):
            client: DeviceClient = key.data
            rc = _OK
            if mask & selectors.EVENT_READ:
                rc = client.mqtt.loop_read()
            if rc == _OK and mask & selectors.EVENT_WRITE:
                rc = client.mqtt.loop_write()
            if rc != _OK:
                client.serviced(rc)
            touched.append(client)
        self._watch(touched)

    def _watch(self, clients: Sequence[DeviceClient]) -> None:
        """Make the selector watch these clients' current sockets, for writing only when paho
        has something to write. Sockets are opened only in a turn, which passes every client,
        so a closed socket is always forgotten before its number can be registered again."""
        for client in clients:
            old = self._watched.get(client)
            if old is not None and old is not client.mqtt.socket():
                self._selector.unregister(old)
                del self._watched[client]
        for client in clients:
            sock = client.mqtt.socket()
            if sock is None:
                continue
            events = selectors.EVENT_READ
            if client.mqtt.want_write():
                events |= selectors.EVENT_WRITE
            if client not in self._watched:
                self._selector.register(sock, events, client)
                self._watched[client] = sock
            elif self._selector.get_key(sock).events != events:
                self._selector.modify(sock, events, client)

    def _close_all(self) -> None:
        sent = [info for client in self._clients if (info := client.say_offline()) is not None]
        self._watch(self._clients)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not all(info.is_published() for info in sent):
            self._service(timeout_s=0.1)
        for client in self._clients:
            client.disconnect()
