"""nurseryd: a Trio daemon whose background jobs belong to the daemon, never to a request."""

__version__ = "0.1.0"
