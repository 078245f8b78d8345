"""Runs: submit, cancel, resume, retry-failed, status and schedules; a run's state in Redis and its rebuild
from SQL."""
