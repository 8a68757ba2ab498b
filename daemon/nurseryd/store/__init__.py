"""The job store interface and its in-memory implementation (see ``base``)."""
