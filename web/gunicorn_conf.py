"""Gunicorn settings for the web process, from the pipeline's settings (WEB_HOST, WEB_PORT).

One worker process with threads: the request metrics live in that process's registry (no multiprocess files),
uploads and downloads wait on I/O, and submits validate in C libraries (pyarrow) that release the GIL. Run
more web processes behind the proxy for more capacity.
"""

from pipeline.settings import load_settings

_settings = load_settings()
bind = f"{_settings.web_host}:{_settings.web_port}"
workers = 1
worker_class = "gthread"
threads = _settings.web_threads
timeout = 300  # a large upload is validated within its request
graceful_timeout = 30
accesslog = None  # web.observe writes one JSON access line per request
errorlog = "-"
