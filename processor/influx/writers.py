"""InfluxDB clients: the 1.x ``/write`` and ``/query`` API, and 2.x/3.x through influxdb-client.

Rule: both are blocking HTTP clients; they run in a worker thread, never on the event loop. Their
errors leave as `InfluxRejected` (an answer with a status) or `InfluxUnavailable` (no answer).
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, Protocol

import urllib3

from processor.config import InfluxTarget
from processor.errors import InfluxRejected, InfluxUnavailable
from processor.influx.line_protocol import MEASUREMENT, QueuedPoint

__all__ = [
    "EXPORT_BUCKETS",
    "EXPORT_BY",
    "EXPORT_TAGS",
    "ExportRow",
    "PointWriter",
    "V1Writer",
    "V2Writer",
    "make_writer",
]

log = logging.getLogger(__name__)


class PointWriter(Protocol):
    """Writes line protocol; blocking (run it in a thread)."""

    def write(self, lines: Sequence[bytes]) -> None:
        """Raises InfluxRejected (4xx, 5xx with a status) or InfluxUnavailable (no answer)."""

    def query_sums(self, poll: str, by: str, since_ns: int, until_ns: int) -> list[ExportRow]:
        """``poll``'s votes (sums of point values) per option and per ``by`` (`EXPORT_BY`),
        dated from ``since_ns`` (inclusive) to ``until_ns`` (exclusive)."""

    def query_points(self, poll: str) -> Iterator[QueuedPoint]:
        """Every point of ``poll`` that has a place in its chain (`votebox audit`, `votebox
        export --by vote`), read in chunks, in no particular order."""

    def close(self) -> None: ...


# What a point of the chain is read back with (its stream_id and poll are not stored).
_POINT_TAGS: Final = ("device", "option", "withdrawn", "site")
_POINT_FIELDS: Final = ("seq", "epoch", "ts_source", "entry", "link", "head")
_CHUNK: Final = 50_000
_NS_PER_S: Final = 1_000_000_000


def _point(poll: str, time_ns: int, values: Sequence[Any]) -> QueuedPoint:
    """A point read back: ``values`` are `_POINT_TAGS` then `_POINT_FIELDS`."""
    device, option, withdrawn, site, seq, epoch, source, entry, link, head = values
    return QueuedPoint(
        "", poll, str(device), int(epoch or 0), int(seq), int(option), time_ns // _NS_PER_S,
        str(source), withdrawn == "1", "" if site in (None, "-") else str(site),
        int(entry or 0), int(link or 0), str(head or ""),
    )  # fmt: skip


# What `votebox export --by` groups votes by, besides the option: a tag of the points, or a
# time bucket (its duration in InfluxQL and in Flux).
EXPORT_TAGS: Final = ("site", "device")
EXPORT_BUCKETS: Final = {"minute": "1m", "hour": "1h"}
EXPORT_BY: Final = ("option", *EXPORT_TAGS, *EXPORT_BUCKETS)


class ExportRow(NamedTuple):
    """One row of ``votebox export``: the votes for one option in one group."""

    group: str  # the site, the device, the bucket's start (RFC 3339), or "" by option
    option: int
    label: str
    votes: int


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class V1Writer:
    """InfluxDB 1.x: ``POST /write?db=&rp=&precision=ns`` and ``/query`` (InfluxQL)."""

    def __init__(self, target: InfluxTarget, *, timeout_s: float) -> None:
        self._target = target
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(total=timeout_s), retries=False, maxsize=2
        )
        self._headers: dict[str, str] = {"Content-Type": "text/plain; charset=utf-8"}
        if target.username:
            token = base64.b64encode(f"{target.username}:{target.password or ''}".encode())
            self._headers["Authorization"] = f"Basic {token.decode()}"
        self._database_ready = False

    def _request(
        self,
        method: str,
        path: str,
        params: dict[str, str],
        body: bytes | None = None,
        *,
        stream: bool = False,
    ) -> Any:
        url = f"{self._target.url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
        try:
            return self._http.request(
                method, url, body=body, headers=self._headers, preload_content=not stream
            )
        except urllib3.exceptions.HTTPError as exc:
            raise InfluxUnavailable(f"InfluxDB at {self._target.url}: {exc}") from exc

    def _ensure_database(self) -> None:
        # Idempotent in InfluxQL; needs admin rights, so a refusal is only logged.
        reply = self._request("POST", "/query", {"q": f'CREATE DATABASE "{self._target.database}"'})
        if reply.status >= 300:
            log.warning(
                "could not create InfluxDB database %s: %s", self._target.database, reply.data[:200]
            )
        self._database_ready = True

    def write(self, lines: Sequence[bytes]) -> None:
        if not self._database_ready:
            self._ensure_database()
        params = {"db": self._target.database, "precision": "ns"}
        if self._target.retention_policy:
            params["rp"] = self._target.retention_policy
        reply = self._request("POST", "/write", params, b"\n".join(lines))
        if reply.status != 204:
            raise InfluxRejected(
                reply.status,
                reply.data.decode(errors="replace")[:500],
                retry_after_s=_retry_after(reply.headers),
            )

    def _query(self, query: str) -> list[Any]:
        """The series of one InfluxQL statement's result, times in ns."""
        params = {"db": self._target.database, "q": query, "epoch": "ns"}
        reply = self._request("GET", "/query", params)
        if reply.status != 200:
            raise InfluxRejected(reply.status, reply.data.decode(errors="replace")[:500])
        result = reply.json()["results"][0]
        self._raise_for(result)
        return list(result.get("series", []))

    def _raise_for(self, result: Mapping[str, Any]) -> None:
        """An InfluxQL statement's result that holds an error, as the error it means."""
        if "error" not in result:
            return
        if str(result["error"]).startswith("database not found"):
            raise InfluxRejected(
                404,
                f"InfluxDB at {self._target.url} has no database "
                f"{self._target.database!r}: no processor has written a point there yet "
                "(one creates it at its first write, if its account may), or "
                "VOTEBOX_INFLUX_DB names another database",
            )
        raise InfluxRejected(400, str(result["error"]))

    def query_sums(self, poll: str, by: str, since_ns: int, until_ns: int) -> list[ExportRow]:
        group = ['"option"', '"label"']
        if by in EXPORT_BUCKETS:
            group.append(f"time({EXPORT_BUCKETS[by]}) fill(none)")
        elif by in EXPORT_TAGS:
            group.append(f'"{by}"')
        query = (
            f'SELECT sum("value") FROM "{MEASUREMENT}" WHERE "poll" = \'{poll}\' '
            f"AND time >= {since_ns} AND time < {until_ns} GROUP BY {', '.join(group)}"
        )
        rows = []
        for series in self._query(query):
            tags = series["tags"]
            for when, total in series["values"]:
                if by in EXPORT_BUCKETS:
                    key = _rfc3339(int(when))
                else:
                    key = tags.get(by, "") if by in EXPORT_TAGS else ""
                rows.append(ExportRow(key, int(tags["option"]), tags["label"], int(total)))
        return rows

    def query_points(self, poll: str) -> Iterator[QueuedPoint]:
        # "epoch" is a tag and a field (line_protocol.line_for): ask for each by its kind.
        columns = ", ".join(
            [f'"{c}"::tag' for c in _POINT_TAGS] + [f'"{c}"::field' for c in _POINT_FIELDS]
        )
        query = f'SELECT {columns} FROM "{MEASUREMENT}" WHERE "poll" = \'{poll}\''
        params = {
            "db": self._target.database, "q": query, "epoch": "ns", "chunked": "true",
            "chunk_size": str(_CHUNK),
        }  # fmt: skip
        # A poll of a million votes is a million rows: read as InfluxDB streams them, a JSON
        # document per chunk and line, never held whole.
        reply = self._request("GET", "/query", params, stream=True)
        try:
            if reply.status != 200:
                raise InfluxRejected(reply.status, reply.data.decode(errors="replace")[:500])
            for line in reply:
                if not line.strip():
                    continue
                for result in json.loads(line).get("results", []):
                    self._raise_for(result)
                    for series in result.get("series", []):
                        for row in series["values"]:
                            yield _point(poll, int(row[0]), row[1:])
        except urllib3.exceptions.HTTPError as exc:
            raise InfluxUnavailable(f"InfluxDB at {self._target.url}: {exc}") from exc
        finally:
            reply.release_conn()

    def close(self) -> None:
        self._http.clear()


class V2Writer:
    """InfluxDB 2.x/3.x and 1.8+: influxdb-client's synchronous write API (its batching writer
    loses buffered points on close or crash; our queue in Redis is the buffer instead)."""

    def __init__(self, target: InfluxTarget, *, timeout_s: float) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        assert target.token and target.org and target.bucket  # InfluxTarget checks it
        self._target = target
        self._org, self._bucket = target.org, target.bucket
        self._client = InfluxDBClient(
            url=target.url, token=target.token, org=target.org, timeout=int(timeout_s * 1000)
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    def write(self, lines: Sequence[bytes]) -> None:
        from influxdb_client.domain.write_precision import WritePrecision
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            self._write_api.write(
                bucket=self._bucket,
                org=self._org,
                record=b"\n".join(lines),
                write_precision=WritePrecision.NS,  # type: ignore[arg-type]  # a str constant
            )
        except ApiException as exc:
            raise InfluxRejected(
                int(exc.status or 0), str(exc.body)[:500], retry_after_s=_retry_after(exc.headers)
            ) from exc
        except HTTPError as exc:
            raise InfluxUnavailable(f"InfluxDB at {self._target.url}: {exc}") from exc

    def query_sums(self, poll: str, by: str, since_ns: int, until_ns: int) -> list[ExportRow]:
        # Not run by the tests here: there is no InfluxDB 2 to run it on (docs/analytics.md).
        flux = (
            f'from(bucket: "{self._target.bucket}") '
            f"|> range(start: time(v: {since_ns}), stop: time(v: {until_ns})) "
            f'|> filter(fn: (r) => r._measurement == "{MEASUREMENT}" and r.poll == "{poll}" '
            'and r._field == "value") '
        )
        if by in EXPORT_BUCKETS:
            flux += (
                '|> group(columns: ["option", "label"]) '
                f"|> aggregateWindow(every: {EXPORT_BUCKETS[by]}, fn: sum, createEmpty: false)"
            )
        else:
            tag = (by,) if by in EXPORT_TAGS else ()
            columns = ", ".join(f'"{c}"' for c in ("option", "label", *tag))
            flux += f"|> group(columns: [{columns}]) |> sum()"
        rows = []
        for table in self._client.query_api().query(flux, org=self._org):
            for record in table.records:
                values = record.values
                if by in EXPORT_BUCKETS:
                    key = _rfc3339(int(values["_time"].timestamp() * 1_000_000_000))
                else:
                    key = str(values.get(by, "")) if by in EXPORT_TAGS else ""
                total = int(record.get_value())  # type: ignore[no-untyped-call]
                rows.append(ExportRow(key, int(values["option"]), str(values["label"]), total))
        return rows

    def query_points(self, poll: str) -> Iterator[QueuedPoint]:
        # Not run by the tests here: there is no InfluxDB 2 to run it on (docs/analytics.md).
        flux = (
            f'from(bucket: "{self._target.bucket}") |> range(start: 0) '
            f'|> filter(fn: (r) => r._measurement == "{MEASUREMENT}" and r.poll == "{poll}") '
            '|> pivot(rowKey: ["_time", "device", "option", "withdrawn", "site", "epoch"], '
            'columnKey: ["_field"], valueColumn: "_value") '
            "|> filter(fn: (r) => exists r.entry)"
        )
        for record in self._client.query_api().query_stream(flux, org=self._org):
            v = record.values
            time_ns = int(v["_time"].timestamp()) * _NS_PER_S
            yield _point(poll, time_ns, [v.get(c) for c in (*_POINT_TAGS, *_POINT_FIELDS)])

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]


def _rfc3339(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_writer(target: InfluxTarget, *, timeout_s: float = 10.0) -> PointWriter:
    """The writer for the target's API."""
    return (
        V1Writer(target, timeout_s=timeout_s)
        if target.api == "v1"
        else V2Writer(target, timeout_s=timeout_s)
    )
