"""A load generator fast enough not to be the bottleneck: raw MQTT 3.1.1 over sockets.

Rule: every PUBLISH is built before the clock starts; the timed loop only writes prepared bytes
and counts PUBACKs, with at most ``window`` un-acked messages per connection (like a
publisher with an in-flight window). It is run as its own process and prints one JSON line.

Why not ``mosquitto_pub -l``: it sends one topic only, and at QoS 1 it stops early, with exit
code 0, once its message ids pass 65,535 (noted in the benchmark issue).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass

from devices.encoder import encode_batch, encode_vote

__all__ = ["Load", "build_load", "main"]


@dataclass(frozen=True, slots=True)
class Load:
    """Prepared packets per connection, and what they should add up to."""

    packets: list[list[bytes]]
    votes: int
    unique_votes: int
    per_option: list[int]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish(topic: bytes, payload: bytes, packet_id: int) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + _varint(len(body)) + body


def _connect(client_id: str) -> bytes:
    cid = client_id.encode()
    user = b"loadgen"
    variable = b"\x00\x04MQTT\x04\x82\x00\x3c"  # 3.1.1, username + clean session, keepalive 60
    payload = len(cid).to_bytes(2, "big") + cid + len(user).to_bytes(2, "big") + user
    body = variable + payload
    return b"\x10" + _varint(len(body)) + body


def build_load(
    *,
    poll: str,
    options: int,
    messages: int,
    devices: int,
    connections: int,
    dup_share: float,
    batch_share: float,
    seed: int,
) -> Load:
    """Build ``messages`` PUBLISH packets spread over ``devices`` device topics; with several
    polls (``a,b,c``), device d votes in poll d mod 3.

    A share of them repeat an earlier vote of the same device (same seq: a duplicate), and a
    share are batches of 2-5 votes (an offline kiosk catching up).
    """
    rng = random.Random(seed)
    seqs = [0] * devices
    sent_by_device: list[list[bytes]] = [[] for _ in range(devices)]
    per_option = [0] * options
    packets: list[list[bytes]] = [[] for _ in range(connections)]
    votes = unique = 0
    polls = poll.split(",")
    for i in range(messages):
        device = i % devices
        topic = f"votes/{polls[device % len(polls)]}/dev-{device:05d}".encode()
        roll = rng.random()
        if roll < dup_share and sent_by_device[device]:
            payload = rng.choice(sent_by_device[device])
            votes += 1 if payload[0] & 0xE0 == 0xA0 else payload[0] & 0x1F
        else:
            n = rng.randint(2, 5) if roll < dup_share + batch_share else 1
            encoded = []
            for _ in range(n):
                seqs[device] += 1
                choice = rng.randrange(options)
                per_option[choice] += 1
                encoded.append(encode_vote(choice, seqs[device], ts=int(time.time())))
            payload = encode_batch(encoded) if n > 1 else encoded[0]
            sent_by_device[device].append(payload)
            if len(sent_by_device[device]) > 4:
                sent_by_device[device].pop(0)
            votes += n
            unique += n
        conn = device % connections
        packet_id = len(packets[conn]) % 65535 + 1
        packets[conn].append(_publish(topic, payload, packet_id))
    return Load(packets, votes, unique, per_option)


class _Connection:
    def __init__(self, host: str, port: int, client_id: str, window: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(_connect(client_id))
        reply = self.sock.recv(4)
        if reply[:1] != b"\x20" or reply[3:4] != b"\x00":
            raise ConnectionError(f"CONNACK refused: {reply!r}")
        self.window = window
        self.acked = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_pubacks, daemon=True)
        self._reader.start()

    def _read_pubacks(self) -> None:
        pending = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            pending += data
            # Only PUBACKs (40 02 id id) come back on this connection.
            whole = len(pending) // 4
            pending = pending[whole * 4 :]
            with self._cond:
                self.acked += whole
                self._cond.notify_all()

    def send(self, packets: list[bytes], *, sent: int) -> None:
        """Send, keeping at most ``window`` un-acked."""
        with self._cond:
            self._cond.wait_for(lambda: sent - self.acked < self.window, timeout=30)
        self.sock.sendall(b"".join(packets))

    def wait_acked(self, total: int, timeout_s: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.acked >= total, timeout=timeout_s)

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
        finally:
            self.sock.close()


def run(
    load: Load, *, host: str, port: int, window: int, rate: float | None, chunk: int = 100
) -> dict[str, object]:
    """Send the prepared load; returns counts and timestamps (time.time(), seconds)."""
    conns = [
        _Connection(host, port, f"loadgen-{i}-{time.time_ns()}", window)
        for i in range(len(load.packets))
    ]
    threads = []
    started = time.time()
    cpu_started = time.process_time()  # the packets were built before: not part of the load
    # (time, messages sent so far) on the first connection: with one connection and no
    # duplicates or batches, message k is vote k, for publish-to-result latency.
    send_log: list[tuple[float, int]] = []

    def pump(index: int) -> None:
        packets = load.packets[index]
        conn = conns[index]
        per_conn_rate = rate / len(conns) if rate else None
        for start in range(0, len(packets), chunk):
            if per_conn_rate:
                due = started + start / per_conn_rate
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
            part = packets[start : start + chunk]
            conn.send(part, sent=start)
            if index == 0:
                send_log.append((time.time(), start + len(part)))

    for i in range(len(conns)):
        thread = threading.Thread(target=pump, args=(i,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    sent_done = time.time()
    for conn, packets in zip(conns, load.packets, strict=True):
        conn.wait_acked(len(packets), timeout_s=120)
    acked_done = time.time()
    acked = sum(conn.acked for conn in conns)
    for conn in conns:
        conn.close()
    return {
        "started": started,
        "cpu_s": time.process_time() - cpu_started,
        "sent_done": sent_done,
        "acked_done": acked_done,
        "messages": sum(len(p) for p in load.packets),
        "acked": acked,
        "votes": load.votes,
        "unique_votes": load.unique_votes,
        "send_log": send_log,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--poll", default="bench", help="a poll id, or several: a,b,c")
    parser.add_argument("--options", type=int, default=4)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=None, help="messages/s; default: flat out")
    parser.add_argument("--dup-share", type=float, default=0.05)
    parser.add_argument("--batch-share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=100, help="messages per write")
    args = parser.parse_args(argv)
    load = build_load(
        poll=args.poll,
        options=args.options,
        messages=args.messages,
        devices=args.devices,
        connections=args.connections,
        dup_share=args.dup_share,
        batch_share=args.batch_share,
        seed=args.seed,
    )
    result = run(
        load, host=args.host, port=args.port, window=args.window, rate=args.rate, chunk=args.chunk
    )
    result["per_option"] = load.per_option
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
