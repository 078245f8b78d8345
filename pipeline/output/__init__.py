"""SQL -> files: a run's results exported to CSV, JSONL or Parquet."""
