"""Start, probe and stop real servers. Rule: only 127.0.0.1, only free ports, only our own PIDs.

Every server is a child process that this module started; it is stopped by its PID (SIGTERM,
then SIGKILL after a deadline), never by name. Readiness is probed against a deadline with the
server's own protocol (Redis PING, MQTT CONNACK, InfluxDB /ping), never with a fixed sleep.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import getpass
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

__all__ = [
    "HOST",
    "ManagedProcess",
    "ServiceError",
    "amqtt_broker",
    "free_port",
    "influxdb",
    "mosquitto",
    "end_session",
    "mqtt_ready",
    "port_open",
    "prometheus",
    "rss_mb",
    "processor",
    "redis_cluster",
    "redis_sentinels",
    "redis_server",
    "require_binaries",
]

HOST: Final = "127.0.0.1"

# Mosquitto limits, kept equal to the production mosquitto.conf (tests/test_configs.py checks).
MOSQUITTO_MAX_QUEUED_MESSAGES: Final = 1_000_000
MOSQUITTO_MAX_INFLIGHT_MESSAGES: Final = 1000


class ServiceError(RuntimeError):
    """A server could not be started or did not become ready; the message says what to do."""


def require_binaries(*names: str) -> None:
    """Raise a `ServiceError` naming the Debian packages to install when a binary is missing."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise ServiceError(
            f"{', '.join(missing)} not found: run scripts/setup (as root it installs the Debian "
            "packages mosquitto, mosquitto-clients, redis-server and influxdb)"
        )


# The ports this process handed out lately: two servers started together must not get one.
_GIVEN: Final[collections.deque[int]] = collections.deque(maxlen=2000)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral range.

    A port the kernel hands out for bind(0) comes from the same range as the source ports of
    outgoing connections, so one of the many clients a test run opens could take it between
    this call and the server's bind (seen: amqtt failing with EADDRINUSE). Below that range
    only listeners take ports.
    """
    low = min(_ephemeral_low(), 65536) - 1
    for _ in range(200):
        port = random.randint(10_000, max(10_001, low))
        if port in _GIVEN:  # handed out, maybe not bound yet
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        _GIVEN.append(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded machine
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    proc: subprocess.Popen[bytes],
    log: Path | None,
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise ServiceError(f"{what} exited with {proc.returncode} while starting:\n{tail}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise ServiceError(f"{what} not ready within {timeout_s} s (log: {log})")


class ManagedProcess:
    """A server process we started: stop it, kill it, or start it again with the same command."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        ready: Callable[[], bool],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 20.0,
        port: int = 0,
        url: str = "",
        ws_url: str = "",
        tls_port: int = 0,
    ) -> None:
        self.name = name
        self.port = port
        self.url = url
        # A broker's WebSockets listener, for browser dashboards, and its TLS listener.
        self.ws_url = ws_url
        self.tls_port = tls_port
        self.log_offset = 0
        self.argv = argv
        self.log_path = log_path
        self._ready = ready
        self._env = dict(env) if env is not None else None
        self._timeout_s = timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self, *, wait: bool = True) -> None:
        """Start the process and, unless ``wait`` is false, wait until it is ready."""
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        try:
            # A session of its own: Ctrl-C in a terminal signals the whole foreground process
            # group, and the servers must outlive it until their owner stops them, in order.
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env,
                start_new_session=True,
            )
        finally:
            log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        assert self.proc is not None
        _wait_until(
            self._ready,
            what=self.name,
            proc=self.proc,
            log=self.log_path,
            timeout_s=self._timeout_s,
        )

    def stop(self, *, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: the fault a power cut or the OOM killer causes."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def log_text(self, *, since_start: bool = False) -> str:
        """The process's output; with ``since_start``, only what its latest run wrote."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self.log_offset if since_start else 0)
            return log.read().decode(errors="replace")


def _redis_ping(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


def rss_mb(pid: int, *, peak: bool = False) -> float:
    """A running process's resident memory in MB, or its peak so far (VmHWM)."""
    field = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def end_session(broker: ManagedProcess, client_id: str) -> None:
    """End a stopped client's persistent session on ``broker`` (connect with a clean session,
    disconnect). A stopped processor's session subscribed to votes/# makes the broker queue
    every later vote for it: on amqtt without bound, on Mosquitto up to its queue limit."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    connected = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.username_pw_set("cleanup")  # amqtt here refuses anonymous clients
    client.on_connect = lambda *_: connected.set()
    try:
        client.connect(HOST, broker.port)
    except OSError:
        return  # the broker is down: nothing queues for the session meanwhile either
    client.loop_start()
    try:
        connected.wait(5)  # the CONNACK: the broker has dropped the old session
    finally:
        client.disconnect()
        client.loop_stop()


def mqtt_ready(port: int, *, host: str = HOST, refused_is_ready: bool = False) -> bool:
    """Whether an MQTT 3.1.1 CONNECT (user "probe") gets an accepting CONNACK (or any CONNACK,
    with ``refused_is_ready``: a broker with accounts refuses the probe)."""
    client_id = f"probe-{os.getpid()}".encode()
    username = b"probe"
    variable = b"\x00\x04MQTT\x04\x82\x00\x05"  # protocol 3.1.1, username + clean session, 5 s
    payload = (
        len(client_id).to_bytes(2, "big") + client_id + len(username).to_bytes(2, "big") + username
    )
    body = variable + payload
    with socket.create_connection((host, port), timeout=1) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        reply = sock.recv(4)
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        return reply[:2] == b"\x20\x02" and (refused_is_ready or reply[3:4] == b"\x00")


def _influx_ping(port: int) -> bool:
    with urllib.request.urlopen(f"http://{HOST}:{port}/ping", timeout=1) as reply:
        return int(reply.status) == 204


@contextlib.contextmanager
def _running(process: ManagedProcess) -> Iterator[ManagedProcess]:
    process.start()
    try:
        yield process
    finally:
        process.stop()


def _redis_argv(port: int, data_dir: Path, *extra: str) -> list[str]:
    """redis-server on 127.0.0.1 with AOF fsynced always, as production runs it."""
    return [
        "redis-server",
        "--bind",
        HOST,
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--daemonize",
        "no",
        # A replica syncs at once, not after the 5 s Redis waits for more replicas to join.
        "--repl-diskless-sync-delay",
        "0",
        *extra,
    ]


@contextlib.contextmanager
def redis_server(
    data_dir: Path, *, port: int | None = None, replica_of: int | None = None
) -> Iterator[ManagedProcess]:
    """redis-server on 127.0.0.1 with AOF on (as production runs it); ``.url`` is set on it.
    With ``replica_of``, it starts as a replica of the primary on that port."""
    require_binaries("redis-server")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = _redis_argv(
        port,
        data_dir,
        "--protected-mode",
        "yes",
        *(["--replicaof", HOST, str(replica_of)] if replica_of else []),
    )
    process = ManagedProcess(
        "redis-server",
        argv,
        ready=lambda: _redis_ping(port),
        log_path=data_dir / "redis.log",
        port=port,
        url=f"redis://{HOST}:{port}/0",
    )
    with _running(process):
        yield process


@contextlib.contextmanager
def redis_sentinels(
    data_dir: Path,
    *,
    primary_port: int,
    service: str = "votebox",
    count: int = 3,
    down_after_ms: int = 1000,
) -> Iterator[list[ManagedProcess]]:
    """``count`` Redis Sentinels on 127.0.0.1 watching the primary at ``primary_port`` as
    ``service``, with a quorum of a majority; ``.port`` of each is its own. Sentinel rewrites
    its config file, so each gets one of its own in ``data_dir``."""
    require_binaries("redis-server")
    started: list[ManagedProcess] = []
    with contextlib.ExitStack() as stack:
        for i in range(count):
            port = free_port()
            folder = data_dir / f"sentinel-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                "\n".join(
                    [
                        f"bind {HOST}",
                        f"port {port}",
                        f"dir {folder}",
                        "protected-mode yes",
                        "daemonize no",
                        f"sentinel monitor {service} {HOST} {primary_port} {count // 2 + 1}",
                        f"sentinel down-after-milliseconds {service} {down_after_ms}",
                        f"sentinel failover-timeout {service} {max(3 * down_after_ms, 3000)}",
                        f"sentinel parallel-syncs {service} 1",
                        "",
                    ]
                )
            )
            process = ManagedProcess(
                f"redis-sentinel-{i}",
                ["redis-server", str(conf), "--sentinel"],
                ready=functools.partial(_redis_ping, port),
                log_path=folder / "sentinel.log",
                port=port,
                url=f"redis://{HOST}:{port}",
            )
            started.append(stack.enter_context(_running(process)))
        yield started


@contextlib.contextmanager
def redis_cluster(
    data_dir: Path, *, masters: int = 3, replicas: int = 1
) -> Iterator[list[ManagedProcess]]:
    """A Redis Cluster on 127.0.0.1: ``masters`` primaries with ``replicas`` replicas each,
    made by ``redis-cli --cluster create``, yielded once every node says the cluster is ok;
    ``.url`` of each node is its own (any of them reaches the cluster)."""
    require_binaries("redis-server", "redis-cli")
    nodes: list[ManagedProcess] = []
    with contextlib.ExitStack() as stack:
        for i in range(masters * (1 + replicas)):
            port = free_port()
            folder = data_dir / f"node-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            argv = _redis_argv(
                port,
                folder,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(folder / "nodes.conf"),
                # The bus port: by default the port plus 10,000, which may be taken or too high.
                "--cluster-port",
                str(free_port()),
                # A primary SIGKILLed is replaced by its replica within seconds, not 15.
                "--cluster-node-timeout",
                "2000",
            )
            process = ManagedProcess(
                f"redis-cluster-{i}",
                argv,
                ready=functools.partial(_redis_ping, port),
                log_path=folder / "redis.log",
                port=port,
                url=f"redis://{HOST}:{port}/0",
            )
            nodes.append(stack.enter_context(_running(process)))
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"{HOST}:{n.port}" for n in nodes)]
            + ["--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for node in nodes:
            _wait_until(
                functools.partial(_cluster_ok, node.port),
                what=f"{node.name} (cluster state)",
                proc=node.proc,  # type: ignore[arg-type]
                log=node.log_path,
                timeout_s=30,
            )
        yield nodes


def _cluster_ok(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1) as sock:
        sock.sendall(b"CLUSTER INFO\r\n")
        return b"cluster_state:ok" in sock.recv(4096)


def mosquitto_config(*, port: int, data_dir: Path, ws_port: int | None = None) -> str:
    """A mosquitto.conf for a local test or demo broker, with production's queue limits."""
    websockets = [f"listener {ws_port} {HOST}", "protocol websockets"] if ws_port else []
    return "\n".join(
        [
            "per_listener_settings false",
            *websockets,
            f"listener {port} {HOST}",
            # Foundation: anonymous access on; the security issue provisions accounts and ACLs.
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {data_dir}/",
            "autosave_interval 60",
            f"max_queued_messages {MOSQUITTO_MAX_QUEUED_MESSAGES}",
            "max_queued_bytes 0",
            f"max_inflight_messages {MOSQUITTO_MAX_INFLIGHT_MESSAGES}",
            "persistent_client_expiration 7d",
            "set_tcp_nodelay true",
            f"user {getpass.getuser()}",
            f"log_dest file {data_dir}/mosquitto.log",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "",
        ]
    )


@contextlib.contextmanager
def mosquitto(data_dir: Path, *, port: int | None = None) -> Iterator[ManagedProcess]:
    """mosquitto on 127.0.0.1 with persistence in ``data_dir``; ``.port`` is set on it."""
    require_binaries("mosquitto")
    port = port or free_port()
    ws_port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "mosquitto.conf"
    conf.write_text(mosquitto_config(port=port, data_dir=data_dir, ws_port=ws_port))
    process = ManagedProcess(
        "mosquitto",
        ["mosquitto", "-c", str(conf)],
        ready=lambda: mqtt_ready(port),
        log_path=data_dir / "stdout.log",
        port=port,
        url=f"mqtt://{HOST}:{port}",
        ws_url=f"ws://{HOST}:{ws_port}",
    )
    with _running(process):
        yield process


@contextlib.contextmanager
def amqtt_broker(
    data_dir: Path,
    *,
    port: int | None = None,
    accounts: Path | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[ManagedProcess]:
    """The embedded amqtt broker (``votebox broker``) in its own process; ``.port`` is set.

    Open to any username unless ``accounts`` (an accounts file) is given; with ``tls`` (a
    certificate and key), also a TLS listener, whose port is ``.tls_port``.

    Its own process rather than in-process: it gets a core of its own, and tests can kill and
    restart it the way they do mosquitto.
    """
    port = port or free_port()
    ws_port = free_port()
    tls_port = free_port() if tls else 0
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "processor.cli", "broker", "--host", HOST, "--port", str(port)]
    argv += ["--ws-port", str(ws_port)]
    argv += ["--accounts", str(accounts)] if accounts else ["--open"]
    if tls:
        argv += ["--tls-port", str(tls_port), "--certfile", str(tls[0]), "--keyfile", str(tls[1])]
    process = ManagedProcess(
        "amqtt",
        argv,
        # With accounts, the probe's CONNECT is refused: an answer at all means ready.
        ready=lambda: (
            mqtt_ready(port, refused_is_ready=accounts is not None)
            and port_open(ws_port)
            and (not tls or port_open(tls_port))
        ),
        log_path=data_dir / "amqtt.log",
        port=port,
        url=f"mqtt://{HOST}:{port}",
        ws_url=f"ws://{HOST}:{ws_port}",
        tls_port=tls_port,
    )
    with _running(process):
        yield process


@contextlib.contextmanager
def influxdb(
    data_dir: Path, *, port: int | None = None, max_body_size: int = 25_000_000
) -> Iterator[ManagedProcess]:
    """influxd (1.x) on 127.0.0.1, its HTTP API on ``.port`` and data in ``data_dir``.

    ``max_body_size`` is the largest write it accepts; beyond it InfluxDB answers 413.
    """
    require_binaries("influxd")
    port = port or free_port()
    rpc_port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "influxdb.conf"
    conf.write_text(
        "reporting-disabled = true\n"
        f'bind-address = "{HOST}:{rpc_port}"\n'
        f'[meta]\n  dir = "{data_dir}/meta"\n'
        f'[data]\n  dir = "{data_dir}/data"\n  wal-dir = "{data_dir}/wal"\n'
        "  query-log-enabled = false\n"
        f'[http]\n  bind-address = "{HOST}:{port}"\n  log-enabled = false\n'
        f"  max-body-size = {max_body_size}\n"
        "[monitor]\n  store-enabled = false\n"
        "[continuous_queries]\n  enabled = false\n"
    )
    process = ManagedProcess(
        "influxd",
        ["influxd", "run", "-config", str(conf)],
        ready=lambda: _influx_ping(port),
        log_path=data_dir / "influxd.log",
        timeout_s=60,
        port=port,
        url=f"http://{HOST}:{port}",
    )
    with _running(process):
        yield process


def _prometheus_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/-/ready", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def prometheus(
    data_dir: Path, *, targets: Sequence[str], rule_files: Sequence[Path] = ()
) -> Iterator[ManagedProcess]:
    """Debian's prometheus on 127.0.0.1, scraping ``targets`` (host:port of processors'
    /metrics) every second as job ``votebox``, evaluating ``rule_files``; its HTTP API on
    ``.url``, data in ``data_dir``."""
    require_binaries("prometheus")
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(path) for path in rule_files],
                "scrape_configs": [
                    {"job_name": "votebox", "static_configs": [{"targets": list(targets)}]}
                ],
            }
        )  # JSON is YAML
    )
    process = ManagedProcess(
        "prometheus",
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={data_dir / 'data'}",
            f"--web.listen-address={HOST}:{port}",
        ],
        ready=lambda: _prometheus_ready(port),
        log_path=data_dir / "prometheus.log",
        timeout_s=60,
        port=port,
        url=f"http://{HOST}:{port}",
    )
    with _running(process):
        yield process


def processor(data_dir: Path, *, env: Mapping[str, str], name: str = "processor") -> ManagedProcess:
    """A `votebox processor` child process (not started); ready once it logs "ready:".

    Its metrics endpoint gets a free port unless ``env`` names one; ``url`` and ``port`` of the
    result are the endpoint's.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"{name}.log"
    argv = [sys.executable, "-m", "processor.cli", "processor"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VOTEBOX_")} | dict(env)
    full_env.setdefault("VOTEBOX_METRICS_PORT", str(free_port()))
    metrics_port = int(full_env["VOTEBOX_METRICS_PORT"])

    def ready() -> bool:
        return "ready: consuming" in process.log_text(since_start=True)

    process = ManagedProcess(
        name,
        argv,
        ready=ready,
        log_path=log_path,
        env=full_env,
        port=metrics_port,
        url=f"http://{HOST}:{metrics_port}",
    )
    return process
