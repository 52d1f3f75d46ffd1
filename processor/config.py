"""Settings: one frozen object built from the environment, then overridden by CLI flags.

Rule: nothing reads os.environ except `Settings.from_env`, and only when the CLI calls it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import unquote, urlsplit

from processor.errors import ConfigError

__all__ = [
    "DEFAULT_MQTT_URL",
    "DEFAULT_REDIS_URL",
    "ENV_VARS",
    "InfluxTarget",
    "MqttUrl",
    "Settings",
]

DEFAULT_MQTT_URL: Final = "mqtt://processor@127.0.0.1:1883"
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"

MqttProtocol = Literal["5", "3.1.1"]


@dataclass(frozen=True, slots=True)
class MqttUrl:
    """Where and as whom to connect: ``mqtt://user:pass@host:port`` (``mqtts://`` for TLS)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str, *, variable: str = "VOTEBOX_MQTT_URL") -> MqttUrl:
        """Parse a broker URL.

        Raises:
            ConfigError: naming ``variable`` when the URL is not ``mqtt://`` or ``mqtts://``.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(
                f"{variable} must start with mqtt:// or mqtts:// (got {_mask(url)!r})"
            )
        if not parts.hostname:
            raise ConfigError(f"{variable} needs a host, as in mqtt://127.0.0.1:1883")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError:
            raise ConfigError(f"{variable} has an invalid port (got {_mask(url)!r})") from None
        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "mqtts",
        )

    def __str__(self) -> str:
        user = (
            f"{self.username}:***@"
            if self.password
            else f"{self.username}@"
            if self.username
            else ""
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"

    def __repr__(self) -> str:
        return f"MqttUrl({str(self)!r})"


@dataclass(frozen=True, slots=True)
class InfluxTarget:
    """Where points go. ``api`` v1 is InfluxDB 1.x /write; v2 is influxdb-client."""

    url: str
    api: Literal["v1", "v2"]
    database: str = "votebox"
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = None
    token: str | None = None
    org: str | None = None
    bucket: str | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(
                f"VOTEBOX_INFLUX_URL must start with http:// or https:// (got {self.url!r})"
            )
        if self.api == "v2" and not (self.token and self.org and self.bucket):
            raise ConfigError(
                "InfluxDB 2 needs VOTEBOX_INFLUX_TOKEN, VOTEBOX_INFLUX_ORG and "
                "VOTEBOX_INFLUX_BUCKET (or VOTEBOX_INFLUX_API=v1 and VOTEBOX_INFLUX_DB for 1.x)"
            )

    def __repr__(self) -> str:
        where = (
            f"bucket={self.bucket} org={self.org}" if self.api == "v2" else f"db={self.database}"
        )
        return f"InfluxTarget({self.api} {self.url} {where})"


def _mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


# (variable, field, help). `votebox --help` prints this table, so it is the one list of them.
ENV_VARS: Final = (
    ("VOTEBOX_MQTT_URL", "mqtt_url", f"broker URL, default {DEFAULT_MQTT_URL}"),
    ("VOTEBOX_MQTT_PROTOCOL", "mqtt_protocol", "5 (default) or 3.1.1 (the embedded amqtt broker)"),
    ("VOTEBOX_MQTT_CLIENT_ID", "mqtt_client_id", "fixed client id of the persistent session"),
    ("VOTEBOX_MQTT_SHARE_GROUP", "mqtt_share_group", "MQTT 5 shared-subscription group"),
    ("VOTEBOX_MQTT_RECEIVE_MAX", "mqtt_receive_max", "un-acked votes in flight, default 1000"),
    (
        "VOTEBOX_MQTT_KEEPALIVE_S",
        "mqtt_keepalive_s",
        "MQTT keepalive; a silent link is found within it, default 30",
    ),
    (
        "VOTEBOX_MQTT_CA_FILE",
        "mqtt_ca_file",
        "CA certificate(s) for mqtts://, default the system's",
    ),
    ("VOTEBOX_REDIS_URL", "redis_url", f"Redis URL, default {DEFAULT_REDIS_URL}"),
    ("VOTEBOX_INFLUX_URL", "influx_url", "InfluxDB URL, http://host:8086; unset: Redis only"),
    (
        "VOTEBOX_INFLUX_API",
        "influx_api",
        "v2 (token, org, bucket) or v1 (/write); default v2 when a token is set",
    ),
    ("VOTEBOX_INFLUX_TOKEN", "influx_token", "InfluxDB 2 API token"),
    ("VOTEBOX_INFLUX_ORG", "influx_org", "InfluxDB 2 organization"),
    ("VOTEBOX_INFLUX_BUCKET", "influx_bucket", "InfluxDB 2 bucket"),
    ("VOTEBOX_INFLUX_DB", "influx_db", "InfluxDB 1.x database, default votebox"),
    ("VOTEBOX_INFLUX_RP", "influx_rp", "InfluxDB 1.x retention policy, default the database's"),
    ("VOTEBOX_INFLUX_USER", "influx_user", "InfluxDB 1.x user"),
    ("VOTEBOX_INFLUX_PASSWORD", "influx_password", "InfluxDB 1.x password"),
    (
        "VOTEBOX_INFLUX_QUEUE_MAX",
        "influx_queue_max",
        "points queued per poll at most, default 1000000",
    ),
    ("VOTEBOX_INFLUX_BATCH_MAX", "influx_batch_max", "points per InfluxDB write, default 5000"),
    ("VOTEBOX_INFLUX_FLUSH_S", "influx_flush_s", "InfluxDB write interval, default 1.0"),
    ("VOTEBOX_CLOCK_SKEW_S", "clock_skew_s", "device clock error tolerated, default 300"),
    ("VOTEBOX_RESULTS_INTERVAL_S", "results_interval_s", "results publish interval, default 0.1"),
    ("VOTEBOX_BATCH_MAX", "batch_max", "votes per Redis round trip at most, default 500"),
    (
        "VOTEBOX_DEVICE_RATE",
        "device_rate",
        "messages/s per device, beyond: rate_limited; 0 (default) off",
    ),
    ("VOTEBOX_DEVICE_BURST", "device_burst", "messages a device may send at once, default 300"),
    ("VOTEBOX_LOG_LEVEL", "log_level", "DEBUG, INFO (default), WARNING"),
    ("VOTEBOX_LOG_FORMAT", "log_format", "logfmt (key=value, default) or json"),
    (
        "VOTEBOX_METRICS_HOST",
        "metrics_host",
        "address of /metrics /healthz /readyz, default 127.0.0.1",
    ),
    ("VOTEBOX_METRICS_PORT", "metrics_port", "port of /metrics /healthz /readyz, default 9100"),
    ("VOTEBOX_STATS_INTERVAL_S", "stats_interval_s", "retained votebox/stats every, default 5"),
    ("VOTEBOX_SILENT_AFTER_S", "silent_after_s", "a device is silent after, default 300"),
    ("VOTEBOX_STALL_S", "stall_s", "not ready when votes wait this long uncommitted, default 30"),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the processor needs to run."""

    mqtt_url: MqttUrl = dataclasses.field(default_factory=lambda: MqttUrl.parse(DEFAULT_MQTT_URL))
    mqtt_protocol: MqttProtocol = "5"
    mqtt_client_id: str = "votebox-processor"
    mqtt_share_group: str | None = None
    # MQTT 5 Receive Maximum: how many un-acked votes the broker may push at us. It bounds the
    # intake's memory and, divided by the commit time, its throughput.
    mqtt_receive_max: int = 1000
    mqtt_keepalive_s: int = 30
    mqtt_ca_file: str | None = None
    # MQTT 5: 0 would end the session on disconnect, so votes sent while we are down would be lost.
    mqtt_session_expiry_s: int = 7 * 24 * 3600
    mqtt_connect_timeout_s: float = 10.0
    redis_url: str = DEFAULT_REDIS_URL
    redis_timeout_s: float = 5.0
    influx_url: str | None = None
    influx_api: str | None = None
    influx_token: str | None = None
    influx_org: str | None = None
    influx_bucket: str | None = None
    influx_db: str = "votebox"
    influx_rp: str | None = None
    influx_user: str | None = None
    influx_password: str | None = None
    # 1,000,000 points of about 150 bytes: some 150 MB of Redis per poll when InfluxDB is away
    # for long (docs/analytics.md, When InfluxDB is down).
    influx_queue_max: int = 1_000_000
    influx_batch_max: int = 5000
    influx_flush_s: float = 1.0
    clock_skew_s: int = 300
    results_interval_s: float = 0.1
    polls_rescan_s: float = 2.0
    batch_max: int = 500
    # docs/security.md, Floods: off unless set, because tests and benchmarks flood on purpose.
    device_rate: float = 0.0
    device_burst: float = 300.0
    shutdown_timeout_s: float = 10.0
    log_level: str = "INFO"
    log_format: str = "logfmt"
    # Loopback by default: metrics name polls, and /readyz probes Redis on every request.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9100
    stats_interval_s: float = 5.0
    silent_after_s: float = 300.0
    stall_s: float = 30.0

    def __post_init__(self) -> None:
        if self.mqtt_protocol not in ("5", "3.1.1"):
            raise ConfigError(
                f"VOTEBOX_MQTT_PROTOCOL must be 5 or 3.1.1 (got {self.mqtt_protocol!r})"
            )
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                "VOTEBOX_REDIS_URL must start with redis://, rediss:// or unix:// "
                f"(got {_mask(self.redis_url)!r})"
            )
        if not 1 <= self.mqtt_receive_max <= 65535:
            raise ConfigError("VOTEBOX_MQTT_RECEIVE_MAX must be 1 to 65535 (an MQTT limit)")
        if not 1 <= self.mqtt_keepalive_s <= 65535:
            raise ConfigError("VOTEBOX_MQTT_KEEPALIVE_S must be 1 to 65535 seconds (an MQTT limit)")
        if not 1 <= self.batch_max <= 10_000:
            raise ConfigError("VOTEBOX_BATCH_MAX must be 1 to 10000")
        if self.results_interval_s <= 0:
            raise ConfigError("VOTEBOX_RESULTS_INTERVAL_S must be above 0")
        if self.mqtt_share_group is not None and self.mqtt_protocol != "5":
            raise ConfigError("VOTEBOX_MQTT_SHARE_GROUP needs VOTEBOX_MQTT_PROTOCOL=5")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("VOTEBOX_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        if self.device_rate < 0 or self.device_burst < 1:
            raise ConfigError("VOTEBOX_DEVICE_RATE must be >= 0 and VOTEBOX_DEVICE_BURST >= 1")
        if self.log_format not in ("logfmt", "json"):
            raise ConfigError(
                f"VOTEBOX_LOG_FORMAT must be logfmt or json (got {self.log_format!r})"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("VOTEBOX_METRICS_PORT must be 0 (any free port) to 65535")
        if min(self.stats_interval_s, self.silent_after_s, self.stall_s) <= 0:
            raise ConfigError(
                "VOTEBOX_STATS_INTERVAL_S, VOTEBOX_SILENT_AFTER_S and VOTEBOX_STALL_S "
                "must be above 0"
            )
        if self.influx_api not in (None, "v1", "v2"):
            raise ConfigError(f"VOTEBOX_INFLUX_API must be v1 or v2 (got {self.influx_api!r})")
        if self.influx_queue_max < 1 or self.influx_batch_max < 1:
            raise ConfigError("VOTEBOX_INFLUX_QUEUE_MAX and VOTEBOX_INFLUX_BATCH_MAX must be >= 1")
        self.influx_target()  # validates the InfluxDB settings as a whole

    def influx_target(self) -> InfluxTarget | None:
        """Where points go, or None when InfluxDB is not configured.

        Raises:
            ConfigError: the InfluxDB settings are incomplete; the message says which to set.
        """
        if not self.influx_url:
            return None
        api = self.influx_api or ("v2" if self.influx_token else "v1")
        return InfluxTarget(
            url=self.influx_url,
            api="v2" if api == "v2" else "v1",
            database=self.influx_db,
            retention_policy=self.influx_rp,
            username=self.influx_user,
            password=self.influx_password,
            token=self.influx_token,
            org=self.influx_org,
            bucket=self.influx_bucket,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from ``VOTEBOX_*`` variables; unset ones keep their defaults.

        Raises:
            ConfigError: a variable is malformed; the message names it.
        """
        return cls().with_overrides({field: env.get(var) for var, field, _ in ENV_VARS})

    def with_overrides(self, values: Mapping[str, object]) -> Settings:
        """A copy with the given fields replaced; None and "" leave a field as it is.

        Strings are converted to the field's type, so the same call serves env vars and flags.

        Raises:
            ConfigError: a value cannot be converted; the message names the variable.
        """
        changes: dict[str, object] = {}
        for name, value in values.items():
            if value is None or value == "":
                continue
            var = _VAR_OF[name]
            if name == "mqtt_url":
                changes[name] = value if isinstance(value, MqttUrl) else MqttUrl.parse(str(value))
            elif name in _INT_FIELDS:
                changes[name] = _convert(int, value, var)
            elif name in _FLOAT_FIELDS:
                changes[name] = _convert(float, value, var)
            else:
                changes[name] = str(value)
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"Settings(mqtt_url={self.mqtt_url}, mqtt_protocol={self.mqtt_protocol}, "
            f"client_id={self.mqtt_client_id}, redis_url={_mask(self.redis_url)}, "
            f"influx={self.influx_target()!r})"
        )


_VAR_OF: Final = {field: var for var, field, _ in ENV_VARS} | {
    f.name: f.name for f in dataclasses.fields(Settings) if f.name not in {x[1] for x in ENV_VARS}
}
_INT_FIELDS: Final = frozenset(
    {"influx_queue_max", "influx_batch_max", "clock_skew_s", "metrics_port"}
    | {"mqtt_receive_max", "batch_max", "mqtt_keepalive_s", "mqtt_session_expiry_s"}
)
_FLOAT_FIELDS: Final = frozenset(
    {"influx_flush_s", "stats_interval_s", "silent_after_s", "stall_s", "device_rate"}
    | {"device_burst"}
    | {
        "results_interval_s",
        "redis_timeout_s",
        "polls_rescan_s",
        "shutdown_timeout_s",
        "mqtt_connect_timeout_s",
    }
)


def _convert(kind: type[int] | type[float], value: object, var: str) -> int | float:
    try:
        return kind(str(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{var} must be a {kind.__name__} (got {value!r})") from None
