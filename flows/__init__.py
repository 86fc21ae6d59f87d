"""Prefect flows: wiring, caching keys, retries, concurrency tags and artifacts. No stage logic."""

import logging

# The stages log at INFO; Prefect forwards these loggers to the dashboard when they are named in
# PREFECT_LOGGING_EXTRA_LOGGERS (set by prefect.yaml's work pool and the local stack), but only
# records that pass the logger's own level, which would otherwise be the root's WARNING.
for _name in ("pcm", "storage", "flows"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)
