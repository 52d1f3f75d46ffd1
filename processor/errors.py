"""Every error votebox raises, in one place.

VoteboxError
├── VoteRejected        one vote or message cannot be counted; carries its Reason
├── ConfigError         a setting is missing or malformed; the message says which and how to fix it
├── StoreUnavailable    Redis cannot be reached or timed out; the batch is retried, never acked
├── BrokerUnavailable   the MQTT broker refused or dropped the connection
├── InfluxUnavailable   InfluxDB did not answer; points stay queued and are retried
└── InfluxRejected      InfluxDB answered with an error status (400, 413, 429, 5xx...)
"""

from __future__ import annotations

from processor.reasons import Reason

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "InfluxRejected",
    "InfluxUnavailable",
    "StoreUnavailable",
    "VoteRejected",
    "VoteboxError",
]


class VoteboxError(Exception):
    """Base class of votebox's own errors."""


class VoteRejected(VoteboxError):
    """A message or vote breaks the wire contract.

    Args:
        reason: the stable code sent back in the ack.
        detail: a short human explanation for logs.
        seq: the vote's seq when it was readable, so the ack can name the vote.
        epoch: the vote's epoch when it was readable.
    """

    def __init__(
        self, reason: Reason, detail: str = "", *, seq: int | None = None, epoch: int | None = None
    ) -> None:
        super().__init__(f"{reason.code}: {detail}" if detail else reason.code)
        self.reason = reason
        self.detail = detail
        self.seq = seq
        self.epoch = epoch


class ConfigError(VoteboxError):
    """A setting is missing or malformed."""


class StoreUnavailable(VoteboxError):
    """Redis is unreachable or too slow; nothing was acknowledged."""


class BrokerUnavailable(VoteboxError):
    """The MQTT broker cannot be reached or refused the connection."""


class InfluxUnavailable(VoteboxError):
    """InfluxDB could not be reached or did not answer in time."""


class InfluxRejected(VoteboxError):
    """InfluxDB answered a write or query with an error status.

    Args:
        status: the HTTP status.
        body: InfluxDB's explanation.
        retry_after_s: the Retry-After header of a 429 or 503, when given.
    """

    def __init__(self, status: int, body: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body
        self.retry_after_s = retry_after_s
