"""A bounded schemathesis run against a real daemon, with and without a token
(issue 10): every documented operation, multipart uploads included; no answer is
a 5xx, and every answer conforms to /openapi.json (status, content type, schema,
headers).

Bounded (a few examples per operation, a fixed seed) so that it fits in CI; run
``st run`` by hand for a deeper search. Skipped where schemathesis is not
installed (requirements.lock has it). The daemon is a plain child process with
its log in a file, and schemathesis another: neither waits on this test's loop.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nurseryd.http.openapi import document

TOKEN = "fuzz-token-for-tests-0123456789"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_ready(base_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2):  # noqa: S310
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{base_url} did not get ready")


def st_command(schema: Path, base_url: str, *headers: str) -> list[str]:
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    command = [st, "run", str(schema), "--url", base_url, "--checks", CHECKS,
               "--max-examples", "5", "--phases", "examples,fuzzing", "--seed", "10",
               "--request-timeout", "30", "--no-color"]
    for header in headers:
        command += ["-H", header]
    return command


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
def test_every_answer_conforms_and_none_is_a_5xx(
        database_url: str, state_dir: Path, tmp_path: Path, with_token: bool) -> None:
    pytest.importorskip("schemathesis")
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(document()))
    base_url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "NURSERYD_DATABASE_URL": database_url,
           "NURSERYD_STATE_DIR": str(state_dir), "NURSERYD_API_TOKEN": TOKEN,
           "NURSERYD_BIND": base_url.removeprefix("http://")}
    log = tmp_path / "daemon.log"
    with open(log, "wb") as log_file:
        daemon = subprocess.Popen([sys.executable, "-m", "nurseryd.cli", "serve"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            wait_ready(base_url)
            headers = [f"Authorization: Bearer {TOKEN}"] if with_token else []
            # cwd: schemathesis keeps a cache directory where it runs, not in the repo.
            result = subprocess.run(st_command(schema, base_url, *headers), cwd=tmp_path,
                                    capture_output=True, text=True, timeout=600)
        finally:
            daemon.terminate()
            daemon.wait(30)
    assert result.returncode == 0, (result.stdout[-6000:] + result.stderr[-2000:]
                                    + log.read_text()[-3000:])
