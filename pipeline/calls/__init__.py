"""Chunk jobs -> provider calls: the worker processes, their window of calls, and each row's cache, budget,
rate limit and retries (online and batch mode)."""
