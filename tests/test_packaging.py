"""What the wheel (and so the Docker image, which installs it) carries: the page and its build."""

from __future__ import annotations

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


def test_the_installed_package_serves_the_dashboard_without_the_checkout(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "wheel"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("votebox-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    # Run from elsewhere with the unpacked wheel first on the path, as an installed copy runs.
    served = subprocess.run(
        [sys.executable, "-c", _SERVE_ONE_PAGE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert served.returncode == 0, served.stderr
    assert Path(served.stdout.strip()).is_relative_to(site)
