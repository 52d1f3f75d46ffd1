"""The wheel's build hook: the dashboard's mqtt browser build goes in when `npm ci` has made it.

A plain ``pip install .`` from a checkout without dashboard/node_modules still installs the
processor; only ``votebox dashboard`` then says what is missing. The Docker image and
scripts/setup run ``npm ci`` in dashboard/ first, so theirs carry it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

_BUILT = "dashboard/node_modules/mqtt/dist/mqtt.min.js"
_INSTALLED = "processor/commands/dashboard_files/node_modules/mqtt/dist/mqtt.min.js"


class DashboardBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        built = Path(self.root) / _BUILT
        if built.is_file():
            build_data["force_include"][str(built)] = _INSTALLED
        else:
            print(
                f"votebox: {_BUILT} is missing, so this package's `votebox dashboard` and "
                "kiosk page will not serve; run `npm ci` in dashboard/ before building to "
                "include it",
                file=sys.stderr,
            )
