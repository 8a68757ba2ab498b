"""sd_notify messages on a real unix datagram socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from nurseryd.systemd import Notifier


def test_disabled_without_notify_socket() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert notifier.notify(READY=1) is False


def test_sends_key_value_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        notifier = Notifier(environ={"NOTIFY_SOCKET": path})
        notifier.ready("serving: 0 running")
        assert server.recv(1024) == b"READY=1\nSTATUS=serving: 0 running"
        notifier.close()


def test_abstract_namespace_address() -> None:
    name = f"nurseryd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        notifier = Notifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert notifier.notify(WATCHDOG=1)
        assert server.recv(1024) == b"WATCHDOG=1"
        notifier.close()


def test_send_failure_is_reported_not_raised(tmp_path: Path, caplog) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.notify(READY=1) is False
    assert "sd_notify" in caplog.text
    notifier.close()


def test_watchdog_interval_is_half_and_only_for_our_pid() -> None:
    ours = Notifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000",
                             "WATCHDOG_PID": str(os.getpid())})
    assert ours.watchdog_interval_s == 2.0
    other = Notifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000",
                              "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None
    ours.close()
    other.close()
