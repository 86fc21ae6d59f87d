"""Formats and places: run layout, fingerprints, Parquet schemas, shards, features, checkpoints, locks.

This package imports only pyarrow, safetensors, numpy and the standard library (never torch: a
test checks that `import storage` leaves it out).
"""
