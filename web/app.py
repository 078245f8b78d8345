"""The web application: ``create_app(settings)`` builds it; gunicorn serves ``web.wsgi:app``.

Why APIFlask (over flask-smorest): one Flask subclass gives the OpenAPI 3.1 document, the interactive docs and
one error processor through which every error (ours, werkzeug's, validation) becomes a problem document.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import redis
from apiflask import APIFlask
from apiflask.types import SpecCallbackType
from flask_cors import CORS
from flask_limiter import Limiter
from sqlalchemy import Engine

from pipeline import users
from pipeline.collect import store
from pipeline.errors import ConfigError
from pipeline.queue import connect
from pipeline.redaction import register_secret
from pipeline.settings import Settings, load_settings

from . import api, auth, health, observe, pages
from .actions import Services
from .problems import PROBLEM_SCHEMA, problem_content_types, problem_response
from .uploads import UploadRequest

MIN_SECRET_KEY = 32


def create_app(
    settings: Settings | None = None, *, connection: redis.Redis | None = None, engine: Engine | None = None
) -> APIFlask:
    settings = settings or load_settings()
    secret = _secret_key(settings)
    connection = connection or connect(settings)
    engine = engine or store.make_engine(settings.resolved_database_url)
    users.prepare(engine)
    services = Services(settings, connection, engine)
    _check_upload_dir(settings, services)

    app = APIFlask("web", title="Batch LLM pipeline API", version="1", spec_path="/openapi.json", docs_path="/docs")
    app.request_class = UploadRequest
    app.config.update(_flask_config(settings, secret))
    app.config["UPLOAD_DIR"] = services.upload_dir
    app.config["PIPELINE_SETTINGS"] = settings
    app.security_schemes = {auth.API_SECURITY: {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
    app.error_processor(problem_response)
    # APIFlask calls it with the spec as a dict (SPEC_PROCESSOR_PASS_OBJECT is off); SpecCallbackType says dict or str
    app.spec_processor(cast(SpecCallbackType, problem_content_types))

    CORS(app, resources={r"/api/*": {"origins": settings.web_cors_origins}}, supports_credentials=False)
    # limits hands storage_options to the redis client, which takes a pool; Flask-Limiter types them as str | int
    storage_options = cast("dict[str, str | int]", {"connection_pool": connection.connection_pool})
    limiter = Limiter(
        auth.caller_key,
        app=app,
        storage_uri="redis://",
        key_prefix="web-limits",
        storage_options=storage_options,
        headers_enabled=True,
    )
    auth.setup_jwt(app, connection, engine)
    observe.install(app, settings)
    app.register_blueprint(health.build_blueprint(_probe_client(settings, connection), engine))
    app.register_blueprint(auth.build_blueprint(connection, engine, limiter, settings.web_login_limit))
    app.register_blueprint(api.build_blueprint(services, limiter, settings.web_submit_limit))
    app.register_blueprint(
        pages.build_blueprint(services, connection, limiter, settings.web_login_limit, settings.web_submit_limit)
    )
    app.extensions["pipeline_services"] = services
    return app


def _secret_key(settings: Settings) -> str:
    if settings.web_secret_key is None or len(settings.web_secret_key.get_secret_value()) < MIN_SECRET_KEY:
        raise ConfigError(
            f"WEB_SECRET_KEY must be set to a random value of at least {MIN_SECRET_KEY} characters "
            "(it signs the API's tokens), e.g. python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    secret = settings.web_secret_key.get_secret_value()
    register_secret(secret)
    return secret


def _flask_config(settings: Settings, secret: str) -> dict[str, Any]:
    return {
        "SECRET_KEY": secret,  # flashed messages
        "JWT_SECRET_KEY": secret,
        "JWT_ACCESS_TOKEN_EXPIRES": timedelta(seconds=settings.web_access_token_seconds),
        "JWT_REFRESH_TOKEN_EXPIRES": timedelta(seconds=settings.web_refresh_token_seconds),
        "JWT_TOKEN_LOCATION": ["headers", "cookies"],  # each view says which one it takes
        "JWT_COOKIE_SECURE": settings.web_cookie_secure,
        "JWT_COOKIE_SAMESITE": "Lax",
        "JWT_COOKIE_CSRF_PROTECT": True,
        "JWT_CSRF_CHECK_FORM": True,
        "JWT_SESSION_COOKIE": True,
        "SESSION_COOKIE_SECURE": settings.web_cookie_secure,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "MAX_CONTENT_LENGTH": settings.web_max_upload_bytes,
        "SYNC_LOCAL_SPEC": False,
        "HTTP_ERROR_SCHEMA": PROBLEM_SCHEMA,
        "VALIDATION_ERROR_SCHEMA": PROBLEM_SCHEMA,
        "VALIDATION_ERROR_STATUS_CODE": 422,
        "DOCS_FAVICON": None,
        "INFO": {
            "description": "Upload a dataset, follow the run, download the results. Log in at "
            "POST /api/v1/auth/login and send the access token as `Authorization: Bearer TOKEN`."
        },
    }


def _check_upload_dir(settings: Settings, services: Services) -> None:
    allowed = settings.allowed_data_dir
    if allowed is not None and not services.upload_dir.is_relative_to(allowed.expanduser().resolve()):
        raise ConfigError(
            f"uploads go to {services.upload_dir}, outside ALLOWED_DATA_DIR {allowed}: set DATA_DIR under it"
        )


def _probe_client(settings: Settings, connection: redis.Redis) -> redis.Redis:
    """Readiness must answer fast when Redis is down: a client without the minute of reconnect retries."""
    if settings.redis_url:
        return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    return connection
