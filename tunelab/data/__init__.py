"""Data: reading, checking, rendering, tokenising and batching training records."""
