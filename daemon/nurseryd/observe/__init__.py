"""What an operator can watch: Prometheus metrics and log lines.

- :mod:`.metrics`: every metric object of one daemon, in a registry of its own;
  the few calls kinds make (``ctx.metrics``) to count what they did.
- :mod:`.jobs`: the one subscriber of the job store's change feed; from each
  committed change it counts the job metrics and writes the job's log line.
- :mod:`.state`: gauges of state (running and queued jobs, pools, draining,
  rows per second), computed when ``/metrics`` is scraped.
- :mod:`.hub`: :class:`~.hub.Observability`, the one object ``root`` builds and
  hands to the app (``/metrics``) and the task tree (the event-loop lag task).
- :mod:`.logs`: the text and JSON log formats, and the redaction of secrets.

This area sits below ``kinds`` (a kind reports through ``ctx.metrics``) and above
``db`` and ``store``; it never imports ``http``, ``supervisor`` or ``root``: what it
reads of the supervisor it reads through small protocols.
"""
