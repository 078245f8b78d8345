"""The page set for people: log in, upload a dataset with the run's settings, a runs table with live progress
(a meta refresh while a run is going), download links, cancel / resume / retry-failed buttons.

Server-rendered (Jinja2), no JavaScript. The session is an access JWT like the API's, in an HttpOnly cookie; every
form carries Flask-JWT-Extended's CSRF token (double submit), checked before the view runs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis
from apiflask import HTTPError
from flask import Blueprint, Response, flash, g, make_response, redirect, render_template, request, url_for
from flask_jwt_extended import (
    create_access_token,
    current_user,
    get_csrf_token,
    get_jwt,
    jwt_required,
    set_access_cookies,
    unset_jwt_cookies,
    verify_jwt_in_request,
)
from flask_limiter import Limiter
from marshmallow import ValidationError
from werkzeug.wrappers import Response as WerkzeugResponse

from pipeline import users
from pipeline.collect import store

from . import actions
from .auth import caller_key, issue_tokens, login_address_key, login_key, revoke
from .schemas import EXPORT_FORMATS, PROVIDERS, SubmitIn

REFRESH_SECONDS = 2  # the runs page reloads itself this often while a run is going


def build_blueprint(
    services: actions.Services, connection: redis.Redis, limiter: Limiter, login_limit: str, submit_limit: str
) -> Blueprint:
    bp = Blueprint("pages", __name__, template_folder="templates")

    @bp.get("/login")
    def login_form() -> str:
        return render_template("login.html", next=_safe_next(request.args.get("next")))

    @bp.post("/login")
    @limiter.limit(login_limit, key_func=login_key)
    @limiter.limit(login_limit, key_func=login_address_key)
    def login() -> Response | tuple[str, int]:
        user = users.authenticate(services.engine, request.form.get("username", ""), request.form.get("password", ""))
        if user is None:
            return render_template(
                "login.html", error="Wrong user name or password.", next=_safe_next(request.form.get("next"))
            ), 401
        tokens = issue_tokens(user)
        # make_response gives the same object typed as the app's Response, which the cookie setters take
        response = make_response(redirect(_safe_next(request.form.get("next")) or url_for("pages.runs_page")))
        set_access_cookies(response, tokens["access_token"])  # no refresh cookie: an idle page's session ends
        return response

    @bp.post("/logout")
    @jwt_required(locations=["cookies"])
    def logout() -> Response:
        revoke(connection, get_jwt())
        response = make_response(redirect(url_for("pages.login_form")))
        unset_jwt_cookies(response)
        return response

    @bp.get("/")
    @jwt_required(locations=["cookies"])
    def runs_page() -> str:
        page = max(1, request.args.get("page", 1, type=int) or 1)
        listing = actions.runs_page(services, current_user, page, 20)
        going = any(r["status"] not in store.FINAL_STATUSES for r in listing["items"])
        return render_template(
            "runs.html",
            listing=listing,
            user=current_user,
            formats=EXPORT_FORMATS,
            providers=PROVIDERS,
            csrf_token=_csrf_token(),
            refresh=REFRESH_SECONDS if going else None,
            final=store.FINAL_STATUSES,
            when=_when,
            submitted=request.args.get("submitted"),
        )

    @bp.post("/runs")
    @limiter.limit(submit_limit, key_func=caller_key)
    @jwt_required(locations=["cookies"])
    def submit() -> WerkzeugResponse:
        try:
            fields = SubmitIn().load({**_form_fields(), "file": request.files.get("file")})
        except ValidationError as exc:
            flash(
                "Not submitted: "
                + "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in exc.normalized_messages().items()),
                "error",
            )
            return redirect(url_for("pages.runs_page"))
        try:
            report = actions.submit_upload(services, current_user, fields["file"], fields)
        except HTTPError as exc:  # a problem is shown on the page, not as JSON
            flash(f"Not submitted: {exc.detail}", "error")
            return redirect(url_for("pages.runs_page"))
        flash(
            f"{'Existing run' if report.existing else 'Run'} {report.run_id}: {report.rows} rows, "
            f"{report.jobs_enqueued} jobs enqueued.",
            "info",
        )
        return redirect(url_for("pages.runs_page", submitted=report.run_id))  # its row stays marked on reloads

    @bp.get("/runs/<run_id>/results")
    @jwt_required(locations=["cookies"])
    def download(run_id: str) -> Response:
        fmt = request.args.get("format", "csv")
        if fmt not in EXPORT_FORMATS:
            fmt = "csv"
        return actions.download(services, current_user, run_id, fmt, raw=False)

    @bp.post("/runs/<run_id>/<any(cancel, resume, 'retry-failed'):action>")
    @jwt_required(locations=["cookies"])
    def run_action(run_id: str, action: str) -> WerkzeugResponse:
        try:
            if action == "cancel":
                n = actions.cancel(services, current_user, run_id)
            elif action == "resume":
                n = actions.resume(services, current_user, run_id, None)
            else:
                n = actions.retry_failed(services, current_user, run_id)
        except HTTPError as exc:
            flash(f"{action}: {exc.detail}", "error")
            return redirect(url_for("pages.runs_page"))
        flash(f"{action} {run_id}: {n} jobs.", "info")
        return redirect(url_for("pages.runs_page"))

    @bp.before_app_request
    def refresh_page_session() -> None:
        """A page view with less than half of its access token's life left gets a new token (an open runs page
        reloads itself, so watching a run keeps the session). Done before rendering, so that the page's forms
        carry the new token's CSRF value."""
        if request.blueprint != "pages" or request.method != "GET" or request.endpoint == "pages.login_form":
            return
        try:
            verify_jwt_in_request(optional=True, locations=["cookies"])
            claims = get_jwt()
        except Exception:  # the view's own check answers
            return
        if claims and claims["exp"] - datetime.now(UTC).timestamp() < (claims["exp"] - claims["iat"]) / 2:
            g.new_access_token = create_access_token(identity=claims["sub"])

    @bp.after_app_request
    def set_refreshed_cookie(response: Response) -> Response:
        if g.get("new_access_token") and response.status_code < 400:
            set_access_cookies(response, g.new_access_token)
        return response

    return bp


def _csrf_token() -> str:
    fresh = g.get("new_access_token")
    return get_csrf_token(fresh) if fresh else get_jwt().get("csrf", "")


def _form_fields() -> dict[str, Any]:
    """Form fields, empty ones left out (an empty input means 'not given'), ``fallback`` as a list."""
    fields: dict[str, Any] = {
        k: v for k, v in request.form.items() if v.strip() and k not in ("csrf_token", "fallback")
    }
    fallbacks = [f for f in request.form.getlist("fallback") if f.strip()]
    if fallbacks:
        fields["fallback"] = fallbacks
    return fields


def _safe_next(target: str | None) -> str | None:
    """Only a path on this site (never //host or a scheme) may follow the login."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return None


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
