"""What the wheel (and so the Docker image, which installs it) carries: the page and its build."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SERVE_ONE_PAGE = """
import sys, urllib.request
from processor.commands.dashboard import DASHBOARD_DIR, serve_dashboard
with serve_dashboard(port=0, ws_url="ws://127.0.0.1:9") as url:
    for path in ("", "app.js", "style.css", "vendor/mqtt.min.js"):
        with urllib.request.urlopen(url + path, timeout=10) as answer:
            assert answer.status == 200 and answer.read(), path
print(DASHBOARD_DIR)
"""


# Run as an installed copy runs: the unpacked wheel first on the path, and the checkout (which
# the virtualenv's editable install puts on it) taken off.
_INSTALLED_ONLY = f"import sys; sys.path = [p for p in sys.path if p != {str(REPO)!r}]\n"


def _wheel(source: Path, out: Path) -> tuple[Path, str]:
    """The wheel built from ``source`` as pip builds it, and what the build said."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v"]
        + ["-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("votebox-*.whl")
    return wheel, built.stdout + built.stderr


def _run_installed(site: Path, script: str) -> subprocess.CompletedProcess[str]:
    """``script`` run from beside the unpacked wheel ``site``, as an installed copy runs."""
    return subprocess.run(
        [sys.executable, "-c", _INSTALLED_ONLY + script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=site.parent,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )


def test_the_installed_package_serves_the_dashboard_without_the_checkout(tmp_path: Path) -> None:
    wheel, _ = _wheel(REPO, tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    assert {"processor", "broker", "devices"} <= tops
    assert not tops & {"harness", "bench", "tests"}, "the wheel carries what only a checkout needs"
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    served = _run_installed(site, _SERVE_ONE_PAGE)
    assert served.returncode == 0, served.stderr
    assert Path(served.stdout.strip()).is_relative_to(site)


_FROM_THE_PACKAGE = """
from processor.cli import main
from processor.commands.dashboard import serve_dashboard
from processor.errors import ConfigError
try:
    with serve_dashboard(port=0, ws_url="ws://127.0.0.1:9"):
        raise SystemExit("served without its mqtt build")
except ConfigError as exc:
    print("dashboard:", exc)
print("demo exit", main(["demo", "--duration", "1"]))
"""


def test_a_checkout_without_npm_installs_and_says_what_each_missing_part_stops(
    tmp_path: Path,
) -> None:
    """``pip install .`` needs no dashboard/node_modules: only the dashboard then says it needs
    ``npm ci``; ``votebox demo`` from the installed package says it runs from a checkout."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "hatch_build.py"):
        shutil.copy(REPO / name, source / name)
    for package in ("processor", "broker", "devices", "dashboard"):
        shutil.copytree(
            REPO / package,
            source / package,
            ignore=shutil.ignore_patterns("node_modules", "__pycache__"),
        )
    wheel, said = _wheel(source, tmp_path / "wheel")
    assert "dashboard/node_modules/mqtt/dist/mqtt.min.js is missing" in said
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if n.endswith("mqtt.min.js")]
        archive.extractall(site)
    ran = _run_installed(site, _FROM_THE_PACKAGE)
    assert ran.returncode == 0, ran.stderr
    assert "for an installed package, run npm ci in dashboard/ before building" in ran.stdout
    assert "demo exit 2" in ran.stdout
    assert "votebox demo runs from a checkout of the repository" in ran.stderr
