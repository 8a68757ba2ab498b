"""The HTTP API: quart-trio handlers that validate, record and enqueue. They never run job work."""
