"""Prefect flows: wiring, caching keys, retries, concurrency tags and artifacts. No stage logic."""
