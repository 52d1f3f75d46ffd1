"""Settings: one frozen object built from the environment, then overridden by CLI flags.

Rule: nothing reads os.environ except `Settings.from_env`, and only when the CLI calls it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import unquote, urlsplit

from processor.errors import ConfigError

__all__ = [
    "DEFAULT_MQTT_URL",
    "DEFAULT_REDIS_URL",
    "ENV_VARS",
    "InfluxTarget",
    "MqttUrl",
    "RedisTarget",
    "SETTING_NAMES",
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


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is, and what a write must reach before it is acknowledged.

    ``url`` is the one node, or with ``cluster`` any node of a Redis Cluster, or, with
    ``sentinels``, where the password and db come from; the primary is then the one the
    Sentinels name for ``service``, found again after a failover.
    ``replicas`` > 0: writes are acknowledged once WAIT says that many replicas have them.
    """

    url: str
    cluster: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    replicas: int = 0
    replica_timeout_ms: int = 500

    def __repr__(self) -> str:
        where = (
            f"sentinels={','.join(f'{h}:{p}' for h, p in self.sentinels)} service={self.service}"
            if self.sentinels
            else f"cluster {_mask(self.url)}"
            if self.cluster
            else _mask(self.url)
        )
        return f"RedisTarget({where} replicas={self.replicas})"


def _mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def _setting(
    default: Any = None,
    *,
    env: str,
    help: str,
    default_help: str | None = None,
    processor: bool = True,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A field of `Settings` that the operator sets: its variable, its help, its scope.

    Args:
        default: its value when unset.
        env: the ``VOTEBOX_*`` variable that sets it (and names it in errors).
        help: what it is, for ``--help``; the default is appended unless ``default_help`` says
            it better, or the default is None.
        default_help: the default as ``--help`` shows it, when the value alone says too little.
        processor: a setting of ``votebox processor`` (a flag of its own); False for what only
            the other commands read (the passwords of the dashboard and of a device).
        factory: builds the default, for a default that is not a plain value.
    """
    metadata = {
        "env": env,
        "help": help,
        "default_help": default_help,
        "processor": processor,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the processor needs to run, and the little the other commands read.

    Rule: this class is the one table of settings. A field made with `_setting` has a
    ``VOTEBOX_*`` variable and, for the processor, a flag; ``ENV_VARS``, ``--help``, the
    conversion of strings and the names in error messages are all derived from it. Fields
    without one are tuning that only code and tests set.
    """

    mqtt_url: MqttUrl = _setting(
        env="VOTEBOX_MQTT_URL",
        help="broker URL",
        default_help=DEFAULT_MQTT_URL,
        factory=lambda: MqttUrl.parse(DEFAULT_MQTT_URL),
    )
    mqtt_protocol: MqttProtocol = _setting(
        "5", env="VOTEBOX_MQTT_PROTOCOL", help="5 or 3.1.1 (the embedded amqtt broker)"
    )
    mqtt_client_id: str = _setting(
        "votebox-processor",
        env="VOTEBOX_MQTT_CLIENT_ID",
        help="fixed client id of the persistent session",
    )
    mqtt_share_group: str | None = _setting(
        env="VOTEBOX_MQTT_SHARE_GROUP", help="MQTT 5 shared-subscription group"
    )
    # MQTT 5 Receive Maximum: how many un-acked votes the broker may push at us. It bounds the
    # intake's memory and, divided by the commit time, its throughput.
    mqtt_receive_max: int = _setting(
        1000, env="VOTEBOX_MQTT_RECEIVE_MAX", help="un-acked votes in flight"
    )
    mqtt_keepalive_s: int = _setting(
        30,
        env="VOTEBOX_MQTT_KEEPALIVE_S",
        help="MQTT keepalive; a silent link is found within it",
    )
    mqtt_ca_file: str | None = _setting(
        env="VOTEBOX_MQTT_CA_FILE",
        help="CA certificate(s) for mqtts://",
        default_help="the system's",
    )
    # MQTT 5: 0 would end the session on disconnect, so votes sent while we are down would be
    # lost. In a share group the broker goes on handing a stopped member its share of new votes
    # until its session expires; past that they go to the others, and what it held is re-sent
    # by the devices (docs/operations.md, Scale).
    mqtt_session_expiry_s: int | None = _setting(
        env="VOTEBOX_MQTT_SESSION_EXPIRY_S",
        help="how long the broker keeps our session and its votes while we are away",
        default_help="604800 (7 days); 60 in a share group",
    )
    mqtt_connect_timeout_s: float = 10.0
    redis_url: str = _setting(
        DEFAULT_REDIS_URL,
        env="VOTEBOX_REDIS_URL",
        help="Redis URL (with Sentinel: its password and db)",
    )
    redis_cluster: bool = _setting(
        False,
        env="VOTEBOX_REDIS_CLUSTER",
        help="1: VOTEBOX_REDIS_URL is any node of a Redis Cluster",
        default_help="0",
    )
    redis_sentinels: str | None = _setting(
        env="VOTEBOX_REDIS_SENTINELS",
        help="host:port,host:port: find the primary through these Sentinels",
    )
    redis_service: str | None = _setting(
        env="VOTEBOX_REDIS_SERVICE", help="the primary's service name at the Sentinels"
    )
    # docs/operations.md, Redis replicas: Redis replicates asynchronously, so a write that only
    # the primary has is lost when a replica is promoted. WAIT makes the ack wait for it.
    redis_replicas: int = _setting(
        0,
        env="VOTEBOX_REDIS_REPLICAS",
        help="ack a batch only once WAIT says this many replicas have it",
    )
    redis_replica_timeout_ms: int = _setting(
        500,
        env="VOTEBOX_REDIS_REPLICA_TIMEOUT_MS",
        help="how long WAIT waits for them; fewer: nothing acked, retried",
    )
    redis_timeout_s: float = 5.0
    influx_url: str | None = _setting(
        env="VOTEBOX_INFLUX_URL", help="InfluxDB URL, http://host:8086; unset: Redis only"
    )
    influx_api: str | None = _setting(
        env="VOTEBOX_INFLUX_API",
        help="v2 (token, org, bucket) or v1 (/write)",
        default_help="v2 when a token is set",
    )
    influx_token: str | None = _setting(env="VOTEBOX_INFLUX_TOKEN", help="InfluxDB 2 API token")
    influx_org: str | None = _setting(env="VOTEBOX_INFLUX_ORG", help="InfluxDB 2 organization")
    influx_bucket: str | None = _setting(env="VOTEBOX_INFLUX_BUCKET", help="InfluxDB 2 bucket")
    influx_db: str = _setting("votebox", env="VOTEBOX_INFLUX_DB", help="InfluxDB 1.x database")
    influx_rp: str | None = _setting(
        env="VOTEBOX_INFLUX_RP",
        help="InfluxDB 1.x retention policy",
        default_help="the database's",
    )
    influx_user: str | None = _setting(env="VOTEBOX_INFLUX_USER", help="InfluxDB 1.x user")
    influx_password: str | None = _setting(
        env="VOTEBOX_INFLUX_PASSWORD", help="InfluxDB 1.x password"
    )
    # 1,000,000 points of about 150 bytes: some 150 MB of Redis per poll when InfluxDB is away
    # for long (docs/analytics.md, When InfluxDB is down).
    influx_queue_max: int = _setting(
        1_000_000, env="VOTEBOX_INFLUX_QUEUE_MAX", help="points queued per poll at most"
    )
    influx_batch_max: int = _setting(
        5000, env="VOTEBOX_INFLUX_BATCH_MAX", help="points per InfluxDB write"
    )
    influx_flush_s: float = _setting(
        1.0, env="VOTEBOX_INFLUX_FLUSH_S", help="InfluxDB write interval"
    )
    clock_skew_s: int = _setting(
        300, env="VOTEBOX_CLOCK_SKEW_S", help="device clock error tolerated"
    )
    results_interval_s: float = _setting(
        0.1, env="VOTEBOX_RESULTS_INTERVAL_S", help="results publish interval"
    )
    # How often the results lease is renewed, or taken when free (its time is 3 times this).
    polls_rescan_s: float = 2.0
    batch_max: int = _setting(
        500, env="VOTEBOX_BATCH_MAX", help="votes per Redis round trip at most"
    )
    # docs/security.md, Floods: off unless set, because tests and benchmarks flood on purpose.
    device_rate: float = _setting(
        0.0,
        env="VOTEBOX_DEVICE_RATE",
        help="messages/s per device, beyond: rate_limited",
        default_help="0 (off)",
    )
    device_burst: float = _setting(
        300.0, env="VOTEBOX_DEVICE_BURST", help="messages a device may send at once"
    )
    shutdown_timeout_s: float = 10.0
    log_level: str = _setting("INFO", env="VOTEBOX_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR")
    log_format: str = _setting(
        "logfmt", env="VOTEBOX_LOG_FORMAT", help="logfmt (key=value) or json"
    )
    # Loopback by default: metrics name polls, and /readyz probes Redis on every request.
    metrics_host: str = _setting(
        "127.0.0.1", env="VOTEBOX_METRICS_HOST", help="address of /metrics /healthz /readyz"
    )
    metrics_port: int = _setting(
        9100, env="VOTEBOX_METRICS_PORT", help="port of /metrics /healthz /readyz"
    )
    stats_interval_s: float = _setting(
        5.0, env="VOTEBOX_STATS_INTERVAL_S", help="retained votebox/stats every"
    )
    silent_after_s: float = _setting(
        300.0,
        env="VOTEBOX_SILENT_AFTER_S",
        help="a device that says it is online and sent nothing this long is silent",
    )
    stall_s: float = _setting(
        30.0,
        env="VOTEBOX_STALL_S",
        help="not ready when votes wait this long uncommitted",
    )
    dashboard_password: str | None = _setting(
        env="VOTEBOX_DASHBOARD_PASSWORD",
        help="the dashboard account's password (votebox dashboard, simulate)",
        processor=False,
    )
    device_password: str | None = _setting(
        env="VOTEBOX_DEVICE_PASSWORD",
        help="a device's password (votebox kiosk, button)",
        processor=False,
    )
    # Which of the fields above were set, by the environment or by flags; the rest are defaults.
    given: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

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
        if (self.redis_sentinels is None) != (self.redis_service is None):
            raise ConfigError(
                "VOTEBOX_REDIS_SENTINELS and VOTEBOX_REDIS_SERVICE go together: the Sentinels "
                "and the name they know the primary by"
            )
        if self.mqtt_session_expiry_s is not None and not (1 <= self.mqtt_session_expiry_s < 2**32):
            # 0 ends the session at every disconnect: the votes queued for us would be lost.
            raise ConfigError("VOTEBOX_MQTT_SESSION_EXPIRY_S must be 1 to 4294967295 seconds")
        if self.redis_cluster and self.redis_sentinels is not None:
            raise ConfigError(
                "VOTEBOX_REDIS_CLUSTER and VOTEBOX_REDIS_SENTINELS exclude each other: a Redis "
                "Cluster fails over by itself"
            )
        if self.redis_replicas < 0:
            raise ConfigError("VOTEBOX_REDIS_REPLICAS must be 0 (no WAIT) or more")
        # WAIT with timeout 0 waits forever: the processor would freeze with its replica gone.
        if not 1 <= self.redis_replica_timeout_ms < self.redis_timeout_s * 1000:
            raise ConfigError(
                "VOTEBOX_REDIS_REPLICA_TIMEOUT_MS must be at least 1 and below the Redis "
                f"timeout ({self.redis_timeout_s * 1000:g} ms)"
            )
        self.influx_target()  # validates the InfluxDB settings as a whole
        self.redis_target()  # and the Redis ones

    def session_expiry_s(self) -> int:
        """The MQTT 5 session expiry to ask for: the setting, or its default for the mode."""
        if self.mqtt_session_expiry_s is not None:
            return self.mqtt_session_expiry_s
        return 60 if self.mqtt_share_group else 7 * 24 * 3600

    def redis_target(self) -> RedisTarget:
        """Where Redis is: one node by URL, or the primary the Sentinels name.

        Raises:
            ConfigError: a Sentinel address is not host:port.
        """
        sentinels: list[tuple[str, int]] = []
        for address in (self.redis_sentinels or "").split(","):
            if not address.strip():
                continue
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(
                    f"VOTEBOX_REDIS_SENTINELS is host:port,host:port (got {address.strip()!r})"
                )
            sentinels.append((host.strip("[]"), int(port)))
        if self.redis_sentinels is not None and not sentinels:
            raise ConfigError("VOTEBOX_REDIS_SENTINELS names no Sentinel")
        return RedisTarget(
            url=self.redis_url,
            cluster=self.redis_cluster,
            sentinels=tuple(sentinels),
            service=self.redis_service,
            replicas=self.redis_replicas,
            replica_timeout_ms=self.redis_replica_timeout_ms,
        )

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
        return cls().with_overrides({name: env.get(var) for name, var in _VAR_OF.items()})

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
            changes[name] = _from_text(_TYPES[name], value, _VAR_OF.get(name, name))
        if changes:
            changes["given"] = self.given | changes.keys()
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"Settings(mqtt_url={self.mqtt_url}, mqtt_protocol={self.mqtt_protocol}, "
            f"client_id={self.mqtt_client_id}, redis_url={_mask(self.redis_url)}, "
            f"influx={self.influx_target()!r})"
        )


_SETTINGS: Final = tuple(f for f in dataclasses.fields(Settings) if "env" in f.metadata)
_VAR_OF: Final = {f.name: f.metadata["env"] for f in _SETTINGS}
# The fields a command's flag may set (its dest is the field's name).
SETTING_NAMES: Final = tuple(_VAR_OF)


def _help(f: dataclasses.Field[Any]) -> str:
    shown = f.metadata["default_help"]
    if shown is None and f.default is not None and f.default is not dataclasses.MISSING:
        shown = f"{f.default:g}" if isinstance(f.default, float) else f.default
    return str(f.metadata["help"]) + (f", default {shown}" if shown is not None else "")


# (variable, field, help) of each setting of the processor: `votebox --help` prints them, and
# `votebox processor` has a flag for each.
ENV_VARS: Final = tuple(
    (f.metadata["env"], f.name, _help(f)) for f in _SETTINGS if f.metadata["processor"]
)
_TYPES: Final = typing.get_type_hints(Settings)


def _from_text(kind: object, value: object, var: str) -> object:
    """A setting's value from text (the environment, a flag), as the type it is declared."""
    optional = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    if len(optional) == 1:  # X | None: text is converted as an X (unset stays None)
        kind = optional[0]
    if kind is MqttUrl:
        return value if isinstance(value, MqttUrl) else MqttUrl.parse(str(value), variable=var)
    if kind is bool:
        text = str(value).strip().lower()
        if text not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"{var} must be 1 or 0 (got {value!r})")
        return text in ("1", "true", "yes")
    if kind is int or kind is float:
        try:
            return kind(str(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{var} must be a {kind.__name__} (got {value!r})") from None
    return str(value)
