"""Results -> SQL + metrics: the collector (the only SQL writer), the tables and queries, the Prometheus metrics."""
