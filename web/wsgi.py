"""Gunicorn's entry point (Procfile: ``gunicorn --config web/gunicorn_conf.py web.wsgi:app``)."""

from __future__ import annotations

from pipeline.logs import setup_logging
from pipeline.settings import load_settings

from .app import create_app

settings = load_settings()
setup_logging(settings, "web")
app = create_app(settings)
