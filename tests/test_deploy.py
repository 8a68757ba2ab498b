"""The systemd unit is valid and says what docs/operations.md promises."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "deploy" / "nurseryd.service"
INSTALLED_BINARY = "/opt/nurseryd/.venv/bin/nurseryd"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keep systemd's key case
    parser.read(UNIT)
    return parser


def test_unit_is_type_notify_with_watchdog_and_stop_timeout_above_grace() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) > 0
    assert service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure"
    grace = float(re.search(r"NURSERYD_SHUTDOWN_GRACE=(\d+)", UNIT.read_text()).group(1))
    assert int(service["TimeoutStopSec"]) > grace + 1
    for hardening in ("ProtectSystem", "NoNewPrivileges", "StateDirectory", "PrivateTmp"):
        assert hardening in service


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (Debian package systemd)")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this venv's entry point.
    unit = tmp_path / "nurseryd.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(Path(sys.prefix) / "bin" /
                                                                  "nurseryd")))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nurseryd.service" not in result.stderr, result.stderr
