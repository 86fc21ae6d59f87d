"""Formats and places: run layout, fingerprints, Parquet schemas, shards, features, checkpoints, locks.

This package imports only pyarrow, webdataset, safetensors, numpy and the standard library.
"""
