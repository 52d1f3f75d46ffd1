"""``votebox dashboard``: serves the live results page and the touch kiosk page (dashboard/) to
browsers.

Rule: the page talks to the broker, not to us: we serve four static files and a config.json
saying where the broker's WebSockets listener is. No vote or result passes through here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Final

from processor.commands import Commands, add_command
from processor.config import Settings
from processor.errors import ConfigError

__all__ = ["DASHBOARD_DIR", "MQTT_BROWSER_BUILD", "register", "serve_dashboard"]

log = logging.getLogger(__name__)

# An installed wheel or the Docker image carries the page beside this module (pyproject.toml,
# force-include); a checkout serves dashboard/ at the top of the repository.
_INSTALLED: Final = Path(__file__).resolve().parent / "dashboard_files"
DASHBOARD_DIR: Final = (
    _INSTALLED if _INSTALLED.is_dir() else Path(__file__).resolve().parents[2] / "dashboard"
)
# Installed by scripts/setup (npm ci in dashboard/), never copied into the repository.
MQTT_BROWSER_BUILD: Final = DASHBOARD_DIR / "node_modules" / "mqtt" / "dist" / "mqtt.min.js"

_FILES: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    # The touch kiosk for tablets: a device in a browser (docs/operations.md, Tablet kiosks).
    "/kiosk.html": ("kiosk.html", "text/html; charset=utf-8"),
    "/kiosk.js": ("kiosk.js", "text/javascript; charset=utf-8"),
}


def _handler(config: bytes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/config.json":
                self._send(200, "application/json", config)
            elif path == "/vendor/mqtt.min.js":
                self._send(200, "text/javascript", MQTT_BROWSER_BUILD.read_bytes())
            elif path in _FILES:
                name, ctype = _FILES[path]
                self._send(200, ctype, (DASHBOARD_DIR / name).read_bytes())
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, status: int, ctype: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("dashboard: %s", format % args)

    return Handler


@contextlib.contextmanager
def serve_dashboard(
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    ws_url: str,
    username: str = "dashboard",
    password: str | None = None,
) -> Iterator[str]:
    """Serve the dashboard in a thread for the duration of the block; yields its URL.

    Args:
        host: address to listen on.
        port: port to listen on; 0 picks a free one.
        ws_url: the broker's WebSockets listener as the browser reaches it, ws:// or wss://.
        username: the MQTT account the page logs in with (read-only by broker/mosquitto.acl).
        password: its password; it is handed to every browser that loads the page, so give
            this account nothing but read access.

    Raises:
        ConfigError: the mqtt browser build is not installed, the URL is not ws(s)://, or the
            port cannot be bound.
    """
    if not MQTT_BROWSER_BUILD.is_file():
        raise ConfigError(
            f"{MQTT_BROWSER_BUILD} is missing: in a checkout, run scripts/setup (it runs npm "
            "ci in dashboard/); for an installed package, run npm ci in dashboard/ before "
            "building it"
        )
    if not ws_url.startswith(("ws://", "wss://")):
        raise ConfigError(f"--ws-url must start with ws:// or wss:// (got {ws_url!r})")
    config = json.dumps({"ws_url": ws_url, "username": username, "password": password}).encode()
    try:
        server = ThreadingHTTPServer((host, port), _handler(config))
    except OSError as exc:
        raise ConfigError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror}") from None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="votebox.dashboard", daemon=True)
    thread.start()
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{shown}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def register(commands: Commands) -> None:
    """Add ``votebox dashboard``."""
    p = add_command(
        commands,
        "dashboard",
        _run,
        help="serve the live results web page (it reads the broker's WebSockets listener)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    p.add_argument(
        "--ws-url",
        default="ws://127.0.0.1:9001",
        help="the broker's WebSockets listener as browsers reach it (default ws://127.0.0.1:9001)",
    )
    p.add_argument("--username", default="dashboard", help="MQTT account of the page")
    p.add_argument(
        "--password",
        dest="dashboard_password",
        metavar="PASSWORD",
        help="its password (env VOTEBOX_DASHBOARD_PASSWORD); every browser gets it, so give "
        "the account read access only",
    )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    with serve_dashboard(
        host=args.host,
        port=args.port,
        ws_url=args.ws_url,
        username=args.username,
        password=settings.dashboard_password,
    ) as url:
        print(f"votebox dashboard on {url} (broker {args.ws_url}); Ctrl-C stops", flush=True)
        threading.Event().wait()
    return 0  # pragma: no cover (Ctrl-C ends it)
