"""The Excel parser child reads untrusted files: it gets no secrets, no core dumps,
no files to write, few descriptors, no new privileges and, where the platform
allows, no network (issue 10)."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nurseryd.kinds.migrate.sources.excel import child_env

PROBE = r"""
import json, os, resource, socket, sys
from nurseryd.kinds.migrate.sources.excel_child import confine
applied = confine()
report = {"applied": applied, "env": sorted(os.environ)}
report["limits"] = {name: resource.getrlimit(getattr(resource, name))[1]
                    for name in ("RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NOFILE")}
try:
    with open(sys.argv[1], "wb") as file:
        file.write(b"x")
    report["wrote"] = True
except OSError:
    report["wrote"] = False
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=2).close()
    report["connected"] = True
except OSError:
    report["connected"] = False
print(json.dumps(report))
"""


def test_the_child_environment_holds_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NURSERYD_API_TOKEN", "admin-token-0123456789abcdef")
    monkeypatch.setenv("LEGACY_DATABASE_URL", "postgresql://u:pw@db/x")
    monkeypatch.setenv("GOOGLE_API_KEY", "AIza-secret")
    env = child_env()
    assert not {"NURSERYD_API_TOKEN", "LEGACY_DATABASE_URL", "GOOGLE_API_KEY"} & set(env)
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH",
                        "OPENPYXL_DEFUSEDXML", "ARROW_DEFAULT_MEMORY_POOL"}


def test_a_confined_child_cannot_write_files_dump_core_or_reach_the_network(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NURSERYD_API_TOKEN", "admin-token-0123456789abcdef")
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-c", PROBE, str(tmp_path / "out.bin"), str(port)],
            env=child_env(), capture_output=True, text=True, timeout=60, check=True)
    finally:
        listener.close()
    report = json.loads(result.stdout)
    assert "NURSERYD_API_TOKEN" not in report["env"]
    assert report["limits"] == {"RLIMIT_CORE": 0, "RLIMIT_FSIZE": 0, "RLIMIT_NOFILE": 64}
    assert report["wrote"] is False
    assert "no_new_privs" in report["applied"]
    if "no_network" in report["applied"]:
        assert report["connected"] is False
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] != 0  # the test process is untouched
