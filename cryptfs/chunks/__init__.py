"""Chunks: sealing, deduplication, staging, background upload, read-ahead and the disk cache."""
