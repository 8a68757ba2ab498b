"""How a handler reaches the daemon's shared objects."""

from __future__ import annotations

from quart import current_app

from ..services import Services

EXTENSION_KEY = "nurseryd"


def get_services() -> Services:
    """The :class:`Services` of the app serving the current request."""
    return current_app.extensions[EXTENSION_KEY]
