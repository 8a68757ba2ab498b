"""The command-line client: the daemon's HTTP API from a terminal (``nurseryd jobs`` ...)."""
