"""``votebox status``: a running processor's readiness, for a human. Rule: it reads the same
``/readyz`` that orchestrators probe, so the two can never disagree.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any, Final

from processor.commands import Commands, add_command
from processor.config import Settings
from processor.errors import VoteboxError

__all__ = [
    "EXIT_NOT_READY",
    "EXIT_READY",
    "fetch_readiness",
    "format_status",
    "print_status",
    "register",
]

EXIT_READY: Final = 0
EXIT_NOT_READY: Final = 1
# 2, the CLI's exit code for a VoteboxError, means nobody answered.


def fetch_readiness(url: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET ``{url}/readyz`` and return its JSON body, ready or not.

    Raises:
        VoteboxError: nothing answered, or the answer is not a votebox processor's.
    """
    endpoint = url.rstrip("/") + "/readyz"
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()  # 503 carries the same JSON, with what is wrong
        exc.close()
    except (urllib.error.URLError, OSError) as exc:
        raise VoteboxError(
            f"no processor answers at {endpoint} ({getattr(exc, 'reason', exc)}); is it "
            "running, and are VOTEBOX_METRICS_HOST and VOTEBOX_METRICS_PORT (or --url) "
            "where it listens?"
        ) from None
    try:
        answer = json.loads(body)
    except ValueError:
        raise VoteboxError(f"{endpoint} did not answer with votebox's JSON") from None
    if not isinstance(answer, dict) or "checks" not in answer:
        raise VoteboxError(f"{endpoint} did not answer with votebox's JSON")
    return answer


def format_status(url: str, answer: dict[str, Any]) -> str:
    """The lines ``votebox status`` prints."""
    verdict = "READY" if answer.get("ready") else "NOT READY"
    lines = [f"processor {answer.get('client_id', '?')} at {url}: {verdict}"]
    for name, state in answer["checks"].items():
        lines.append(f"  {name:<8} {state}")
    lines.append(f"  uptime {answer.get('uptime_s', '?')} s, {answer.get('held', 0)} messages held")
    votes = answer.get("votes") or {}
    lines.append(
        "  votes    " + (", ".join(f"{k}={n}" for k, n in sorted(votes.items())) or "none yet")
    )
    return "\n".join(lines)


def print_status(url: str) -> int:
    """Print the status; the exit code says ready (0) or not (1).

    Raises:
        VoteboxError: nothing answered at ``url`` (the CLI exits 2).
    """
    answer = fetch_readiness(url)
    print(format_status(url, answer))
    return EXIT_READY if answer.get("ready") else EXIT_NOT_READY


def register(commands: Commands) -> None:
    """Add ``votebox status``."""
    p = add_command(
        commands,
        "status",
        _run,
        help="ask a running processor whether it is ready (exit 0 ready, 1 not ready, 2 no answer)",
    )
    p.add_argument(
        "--url",
        default=None,
        help="its endpoint, default http://VOTEBOX_METRICS_HOST:VOTEBOX_METRICS_PORT "
        "(127.0.0.1:9100)",
    )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    url = args.url or f"http://{settings.metrics_host}:{settings.metrics_port}"
    return print_status(url)
