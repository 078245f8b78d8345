"""The HTTP front end: a JSON API under /api/v1 and a few server-rendered pages, a thin layer over ``pipeline``.

``pipeline`` never imports this package; everything a request does goes through the same functions the CLI
calls (``pipeline.control.runs``, ``pipeline.output.export``).
"""
