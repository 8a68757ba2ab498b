"""Job kinds: one module (or package) each. Nothing here imports ``http``."""
