"""Batch LLM pipeline: dataset -> chunks -> RQ jobs -> provider calls -> results -> SQL + metrics.

Subpackages follow the data flow: ``intake`` reads datasets and renders prompts, ``control`` creates and
enqueues runs through ``queue``, ``jobs.process_chunk`` runs ``calls`` (the window of provider calls under
rate limit, budget, cache and retries) against ``providers``, hands ``records`` to the ``handoff`` stream, and
``collect`` writes them to SQL and metrics; ``output`` exports a run's results.
"""

import os

# pyarrow reads datasets and writes Parquet exports in batches dropped one after another: its default pool
# (jemalloc) keeps what they freed, the system allocator gives it back (submit of 3,000,000 Parquet rows peaked
# at 286-311 MB, 259 MB with this, in the same time). Read by pyarrow at its import, so set before it.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
