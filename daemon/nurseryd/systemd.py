"""sd_notify over ``NOTIFY_SOCKET``, written by hand.

Why not the ``sdnotify`` package: it swallows every error (a misconfigured unit
then fails silently at the watchdog) and has no watchdog support. The protocol
is one datagram of ``KEY=VALUE`` lines to a unix socket; an address starting
with ``@`` is in the abstract namespace.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

import trio

log = logging.getLogger(__name__)


def _socket_address(raw: str) -> str:
    return "\0" + raw[1:] if raw.startswith("@") else raw


class Notifier:
    """Sends state changes to systemd; does nothing when not run by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        raw = environ.get("NOTIFY_SOCKET", "")
        self.address = _socket_address(raw) if raw else None
        self.watchdog_interval_s: float | None = None
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                self.watchdog_interval_s = int(usec) / 1_000_000 / 2
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines; logs (never raises) when the send fails."""
        if self._sock is None or self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._sock.sendto(message, self.address)
        except OSError as error:
            log.warning("sd_notify %s to %r failed: %s", list(fields), self.address, error)
            return False
        return True

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def stopping(self, status: str) -> None:
        self.notify(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def keep_watchdog_fed(self) -> None:
        """``WATCHDOG=1`` every half interval; a stalled event loop stops feeding it."""
        if self.watchdog_interval_s is None or not self.enabled:
            return
        while True:
            self.notify(WATCHDOG=1)
            await trio.sleep(self.watchdog_interval_s)

    async def report_status(self, describe: Callable[[], str], every_s: float = 2.0) -> None:
        if not self.enabled:
            return
        last = None
        while True:
            status = describe()
            if status != last:
                self.notify(STATUS=status)
                last = status
            await trio.sleep(every_s)

    async def extend_while_draining(self, every_s: float = 1.0, extend_s: float = 5.0) -> None:
        """Keep systemd's stop timeout from firing while jobs use their grace period."""
        while True:
            self.notify(EXTEND_TIMEOUT_USEC=int(extend_s * 1_000_000))
            await trio.sleep(every_s)
