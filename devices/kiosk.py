"""Kiosk and button behaviour in text mode, on top of the device client.

Rule: the screen shows only what the retained ``polls/{poll}/config`` says (docs/protocol.md,
Poll config), so a kiosk never offers an option the poll does not have; a button knows its one
option and sends it on each press. Both end by waiting for their outbox to drain.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable
from typing import Any, TextIO

from devices.ack import code_name
from devices.client import DeviceClient, DeviceConfig
from devices.outbox import Outbox, Pending

__all__ = ["parse_choice", "render_config", "run_button", "run_kiosk"]


def render_config(config: dict[str, Any] | None) -> str:
    """A poll's config as the kiosk's text screen."""
    if not config:
        return "(no poll here: waiting for the operator)"
    lines = [f"{config.get('title', config.get('poll'))}   [{config.get('state')}]"]
    kind = config.get("type", "single")
    labels = list(config.get("labels", ()))
    if kind in ("rating", "nps"):
        low, high = config.get("scale", (0, len(labels) - 1))
        lines.append(f"  type a number from {low} to {high}")
    else:
        lines.extend(f"  {i}) {label}" for i, label in enumerate(labels, 1))
        if kind == "multiple":
            lines.append(f"  type up to {config.get('max_choices')} numbers, such as 1,3")
        else:
            lines.append("  type a number")
    return "\n".join(lines)


def parse_choice(text: str, config: dict[str, Any]) -> int | list[int]:
    """What the voter typed, as the vote's choice (key 0).

    Raises:
        ValueError: with what to type instead.
    """
    kind = config.get("type", "single")
    try:
        numbers = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError("type a number") from None
    if not numbers:
        raise ValueError("type a number")
    if kind in ("rating", "nps"):
        low, high = config["scale"]
        if len(numbers) != 1 or not low <= numbers[0] <= high:
            raise ValueError(f"type one number from {low} to {high}")
        return numbers[0]
    n = len(config.get("labels", ()))
    if any(not 1 <= number <= n for number in numbers):
        raise ValueError(f"options are 1 to {n}")
    if kind == "multiple":
        return sorted({number - 1 for number in numbers})
    if len(numbers) != 1:
        raise ValueError("one option only")
    return numbers[0] - 1


def _report(out: TextIO, lock: threading.Lock) -> Any:
    def on_ack(entry: Pending, code: int) -> None:
        with lock:
            print(
                f"answered epoch={entry.epoch} seq={entry.seq} code={code} ({code_name(code)})",
                file=out,
                flush=True,
            )

    return on_ack


def _stored(out: TextIO, lock: threading.Lock, entry: Pending) -> None:
    with lock:
        print(f"stored epoch={entry.epoch} seq={entry.seq}", file=out, flush=True)


def _drain(client: DeviceClient, out: TextIO, drain_s: float) -> int:
    if client.wait_drained(drain_s):
        print("outbox empty: every vote answered", file=out, flush=True)
        return 0
    print(
        f"{client.outbox.depth()} votes still in the outbox; they are sent on the next start",
        file=out,
        flush=True,
    )
    return 1


def run_kiosk(
    config: DeviceConfig,
    outbox: Outbox,
    poll: str,
    *,
    lines: Iterable[str],
    out: TextIO,
    drain_s: float,
) -> int:
    """A kiosk: show the poll, turn each typed line into a vote, then drain.

    Returns:
        0 when every vote was answered, 1 when some wait in the outbox.
    """
    lock = threading.Lock()
    shown: list[dict[str, Any] | None] = [None]

    def on_config(changed: str, document: dict[str, Any] | None) -> None:
        if changed == poll:
            shown[0] = document
            with lock:
                print(render_config(document), file=out, flush=True)

    client = DeviceClient(
        dataclasses.replace(config, polls=(poll,)),
        outbox,
        on_ack=_report(out, lock),
        on_config=on_config,
    )
    with client.running():
        # The retained config arrives right after the connection; a kiosk offline since boot
        # shows the last one it had (here: none).
        deadline = time.monotonic() + 5
        while shown[0] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        for line in lines:
            document = shown[0]
            if not line.strip():
                continue
            if document is None:
                print("no poll to vote in yet", file=out, flush=True)
                continue
            try:
                choice = parse_choice(line, document)
            except ValueError as exc:
                print(f"? {exc}", file=out, flush=True)
                continue
            _stored(out, lock, client.press(poll, choice))
        return _drain(client, out, drain_s)


def run_button(
    config: DeviceConfig,
    outbox: Outbox,
    poll: str,
    option: int,
    *,
    presses: int | None,
    interval_s: float,
    lines: Iterable[str],
    out: TextIO,
    drain_s: float,
) -> int:
    """A button: each press (a line of input, or ``presses`` of them every ``interval_s``)
    sends ``option``; then drain.

    Returns:
        0 when every vote was answered, 1 when some wait in the outbox.
    """
    lock = threading.Lock()
    client = DeviceClient(config, outbox, on_ack=_report(out, lock))
    with client.running():
        source: Iterable[object] = range(presses) if presses is not None else lines
        for _ in source:
            _stored(out, lock, client.press(poll, option))
            if presses is not None:
                time.sleep(interval_s)
        return _drain(client, out, drain_s)
