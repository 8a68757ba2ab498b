"""Command-line entry points: ``nurseryd serve`` and ``nurseryd check-config`` run or
check the daemon here; every other command is the client (:mod:`.console`), which
talks to a running daemon over HTTP and needs no configuration file."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from functools import partial
from pathlib import Path

import trio

from .config import Settings, load_settings
from .console import commands as console
from .errors import ConfigError, StartupError
from .features import FEATURES
from .observe.logs import configure_logging


def _load(path: str | None) -> Settings:
    return load_settings(Path(path) if path else None, features=FEATURES)


def _configure_logging(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format, access_log=settings.access_log)
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nurseryd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the daemon until SIGTERM/SIGINT"),
        ("check-config", "validate the configuration and print the effective settings"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", metavar="FILE", help="TOML configuration file "
                             "(default: $NURSERYD_CONFIG, else built-in defaults)")
    console.add_parsers(commands)
    args = parser.parse_args(argv)
    if args.command in console.COMMANDS:
        return console.run(args)

    try:
        settings = _load(args.config)
    except ConfigError as error:
        print(f"nurseryd: {error}", file=sys.stderr)
        return 2

    if args.command == "check-config":
        print(f"configuration OK: bind {settings.bind}, state_dir {settings.state_dir}, "
              f"database {'embedded' if not settings.database_url else 'external'}, "
              f"shutdown_grace {settings.shutdown_grace:g}s, queue_size {settings.queue_size}")
        access = settings.access
        tokens = ", ".join(f"{token.name} ({token.role.value})" for token in access.tokens)
        print("  access: " + (f"tokens {tokens}" if tokens else
                              "protected mode (no token: loopback callers only)")
              + f"; allowed hosts: {', '.join(sorted(access.allowed_hosts)) or 'loopback'}")
        print(f"  logs: {settings.log_level} as {settings.log_format}, access log "
              f"{'on' if settings.access_log else 'off'}; /metrics "
              f"{'needs the bearer token' if settings.metrics_token else 'open'}")
        for kind, limits in sorted(settings.kinds.items()):
            print(f"  kind {kind}: timeout {limits.default_timeout_s:g}s "
                  f"(max {limits.max_timeout_s:g}s), concurrency {limits.concurrency}")
        return 0

    _configure_logging(settings)
    # Files the daemon creates (uploads, the embedded database, logs it may write)
    # are its own: nobody else on the machine reads customer data from them.
    os.umask(0o077)
    from .root import serve

    try:
        trio.run(partial(serve, settings, features=FEATURES))
    except BaseException as error:  # noqa: BLE001 - inspected, and re-raised unless known
        startup = _find(error, StartupError)
        if startup is not None:
            print(f"nurseryd: cannot start: {startup}", file=sys.stderr)
            return 1
        if _find(error, KeyboardInterrupt) is not None:
            return 130
        raise
    return 0


def _find(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``error`` itself or the first ``kind`` inside the exception groups that the
    nurseries between here and the raise wrapped it in."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _find(inner, kind)) is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
