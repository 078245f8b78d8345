"""RQ job entry points: thin functions that RQ imports by name in the worker."""
