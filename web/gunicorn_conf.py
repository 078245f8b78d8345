"""Gunicorn settings for the web process, from the pipeline's settings (WEB_HOST, WEB_PORT).

One worker process with threads: the request metrics live in that process's registry (no multiprocess files),
uploads and downloads wait on I/O, and submits validate in C libraries (pyarrow) that release the GIL. Run
more web processes behind the proxy for more capacity.
"""
import os

bind = f"{os.environ.get('WEB_HOST', '127.0.0.1')}:{os.environ.get('WEB_PORT', '8000')}"
workers = 1
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "8"))
timeout = 300          # a large upload is validated within its request
graceful_timeout = 30
accesslog = None       # web.observe writes one JSON access line per request
errorlog = "-"
