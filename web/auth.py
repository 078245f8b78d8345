"""Who is calling: JWT access and refresh tokens (Flask-JWT-Extended), revoked through a list in Redis.

The API takes tokens in the Authorization header only; the pages take them from cookies (with
Flask-JWT-Extended's double-submit CSRF check on every form). A token names its user; the user is read from
the database on every request, so a disabled user's tokens stop working at once.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import redis
from apiflask import APIBlueprint
from flask import Flask, current_app, g, redirect, request, url_for
from flask_jwt_extended import (
    JWTManager,
    create_access_token,
    create_refresh_token,
    current_user,
    decode_token,
    get_jwt,
    get_jwt_identity,
    jwt_required,
    verify_jwt_in_request,
)
from flask_limiter import Limiter
from sqlalchemy import Engine
from werkzeug.wrappers import Response as WerkzeugResponse

from pipeline import users

from .problems import problem, problem_response
from .schemas import LoginIn, LogoutIn, RefreshOut, TokensOut

API_SECURITY = "BearerAuth"  # the security scheme of every view that takes an access token
REVOKED_PREFIX = "web:revoked:"


def revoke(connection: redis.Redis, payload: dict[str, Any]) -> None:
    """Put a token on the revocation list until it would have expired anyway."""
    ttl = max(1, int(payload["exp"] - time.time()) + 1)
    connection.set(REVOKED_PREFIX + payload["jti"], "1", ex=ttl)


def setup_jwt(app: Flask, connection: redis.Redis, engine: Engine) -> JWTManager:
    jwt = JWTManager(app)

    @jwt.token_in_blocklist_loader
    def is_revoked(_header: dict[str, Any], payload: dict[str, Any]) -> bool:
        return bool(connection.exists(REVOKED_PREFIX + payload["jti"]))

    @jwt.user_lookup_loader
    def load_user(_header: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any] | None:
        user = users.find_user(engine, payload["sub"])
        g.user_name = payload["sub"]  # for the access log
        return None if user is None or user["disabled"] else user

    def refused(reason: str) -> WerkzeugResponse:
        if request.blueprint == "pages":
            return redirect(url_for("pages.login_form", next=request.path))
        # a response, not a raise: this runs inside Flask-JWT-Extended's error handler
        return problem_response(problem(401, reason, "Unauthorized", headers={"WWW-Authenticate": "Bearer"}))

    jwt.unauthorized_loader(lambda reason: refused("missing token: " + reason))
    jwt.invalid_token_loader(lambda reason: refused("invalid token: " + reason))
    jwt.expired_token_loader(lambda _h, _p: refused("the token has expired"))
    jwt.revoked_token_loader(lambda _h, _p: refused("the token has been revoked"))
    jwt.user_lookup_error_loader(lambda _h, _p: refused("no such user, or the user is disabled"))
    jwt.token_verification_failed_loader(lambda _h, _p: refused("the token was refused"))
    return jwt


def caller_key() -> str:
    """Rate-limit key of a request: its user when it carries a valid token, else its address."""
    try:
        verify_jwt_in_request(optional=True)
        identity = get_jwt_identity()
    except Exception:  # an invalid token is refused later by the view itself
        identity = None
    return f"user:{identity}" if identity else f"addr:{request.remote_addr}"


def login_key() -> str:
    """Login attempts are limited per user name asked for (so guessing one account's password is slow from
    anywhere); ``login_address_key`` limits each address as well."""
    name = _login_name()
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest() if isinstance(name, str) else ""
    return f"login:{digest}"  # any text the client sent, as a fixed-size key Redis can take


def _login_name() -> object:
    """The user name a login request asks for, as sent (any JSON value), None when there is none."""
    if request.is_json:
        data = request.get_json(silent=True)
        return data.get("username") if isinstance(data, dict) else None
    return request.form.get("username")


def login_address_key() -> str:
    return f"login-addr:{request.remote_addr}"


def issue_tokens(user: dict[str, Any]) -> dict[str, Any]:
    settings = current_app.config["PIPELINE_SETTINGS"]
    return {
        "access_token": create_access_token(identity=user["name"]),
        "refresh_token": create_refresh_token(identity=user["name"]),
        "token_type": "Bearer",
        "expires_in": settings.web_access_token_seconds,
    }


def build_blueprint(connection: redis.Redis, engine: Engine, limiter: Limiter, login_limit: str) -> APIBlueprint:
    bp = APIBlueprint("auth", __name__, url_prefix="/api/v1/auth", tag="Auth")

    @bp.post("/login")
    @limiter.limit(login_limit, key_func=login_key)
    @limiter.limit(login_limit, key_func=login_address_key)
    @bp.input(LoginIn, location="json")
    @bp.output(TokensOut)
    @bp.doc(
        summary="Log in",
        description="A user's (or API client's) name and secret give an access token and a refresh token.",
        responses=[401, 429],
    )
    def login(json_data: dict[str, Any]) -> dict[str, Any]:
        user = users.authenticate(engine, json_data["username"], json_data["password"])
        if user is None:
            raise problem(401, "wrong user name or password", "Unauthorized")
        return issue_tokens(user)

    @bp.post("/refresh")
    @jwt_required(refresh=True, locations=["headers"])
    @bp.output(RefreshOut)
    @bp.doc(
        summary="New access token",
        description="Send the refresh token as the bearer token.",
        responses=[401],
        security=API_SECURITY,
    )
    def refresh() -> dict[str, Any]:
        settings = current_app.config["PIPELINE_SETTINGS"]
        return {
            "access_token": create_access_token(identity=current_user["name"]),
            "token_type": "Bearer",
            "expires_in": settings.web_access_token_seconds,
        }

    @bp.post("/logout")
    @jwt_required(locations=["headers"])
    @bp.input(LogoutIn, location="json")
    @bp.output({}, status_code=204)
    @bp.doc(
        summary="Revoke tokens",
        description="Revokes the access token sent, and the refresh token given in the body if any.",
        responses=[401, 422],
        security=API_SECURITY,
    )
    def logout(json_data: dict[str, Any]) -> tuple[str, int]:
        revoke(connection, get_jwt())
        if json_data.get("refresh_token"):
            try:
                payload = decode_token(json_data["refresh_token"])
            except Exception:
                raise problem(422, "refresh_token is not a valid token", "Unprocessable Content") from None
            if payload.get("sub") != current_user["name"]:
                raise problem(422, "refresh_token belongs to another user", "Unprocessable Content")
            revoke(connection, payload)
        return "", 204

    return bp
