"""Batch LLM pipeline: dataset -> chunks -> RQ jobs -> provider calls -> results -> SQL + metrics.

Modules follow the data flow: ``datasets`` reads files, ``templates`` renders prompts, ``runs`` creates and
enqueues runs through ``queue``, ``jobs.process_chunk`` calls ``providers`` under ``ratelimit`` and ``retry``,
hands ``records`` to the ``handoff`` stream, and ``collector`` writes them to ``store`` and ``metrics``.
"""
