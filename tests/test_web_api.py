"""The HTTP API over real HTTP (werkzeug on a loopback port), on real Redis and SQLite / PostgreSQL, with real
burst workers and collector: a whole run, ownership, bad uploads, token revocation, limits, health, metrics,
and Schemathesis against the app's own OpenAPI document."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import requests
from click.testing import CliRunner

from pipeline.control.runstate import load_config
from pipeline.logs import json_file_handler
from pipeline.output.export import export_run

from .datasets import write
from .webserver import PASSWORD, make_web_fixture, web_fixture  # noqa: F401  (fixtures)

TEMPLATE = "Classify: {{ text }}"
ROWS = [
    {"id": f"r{i}", "text": text}
    for i, text in enumerate(["=1+2", "plain, with a comma", "café 🙂", "line one\nline two", "@SUM(A1)", "ok"])
]


def upload(web, user: str, path: Path, name: str | None = None, **fields) -> requests.Response:
    with path.open("rb") as handle:
        return web.post(
            user,
            "/api/v1/runs",
            files={"file": (name or path.name, handle)},
            data={"template": TEMPLATE, "id_column": "id", **fields},
        )


def is_problem(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def nothing_enqueued(pipeline) -> bool:
    return not pipeline.redis.keys("rq:queue:*") and not pipeline.redis.keys("run:*")


def test_login_upload_poll_download_matches_the_cli_export(web, tmp_path):
    web.add_user("alice")
    web.add_user("bob")
    web.login("alice")
    web.login("bob")
    dataset = write(tmp_path / "reviews.csv", ROWS)

    first = upload(web, "alice", dataset, idempotency_key="nightly-1")
    assert first.status_code == 201, first.text
    run = first.json()
    assert run["rows"] == len(ROWS) and run["jobs_enqueued"] == 1 and not run["existing"]
    again = upload(web, "alice", dataset, idempotency_key="nightly-1")
    assert again.status_code == 200 and again.json()["run_id"] == run["run_id"] and again.json()["existing"]
    assert len(list((web.pipeline.settings.data_dir / "uploads").glob("*.csv"))) == 1  # the repeat's copy went

    web.finish(run["run_id"])
    status = web.get("alice", f"/api/v1/runs/{run['run_id']}").json()
    assert status["status"] == "completed" and status["rows_succeeded"] == len(ROWS) and status["mode"] == "online"
    assert status["input_tokens"] > 0 and status["cost_usd"] > 0 and status["eta_s"] == 0
    listing = web.get("alice", "/api/v1/runs", params={"per_page": 5}).json()
    assert [r["run_id"] for r in listing["items"]] == [run["run_id"]] and listing["total"] == 1
    assert listing["items"][0]["filename"] == "reviews.csv"

    for fmt in ("csv", "jsonl", "parquet"):
        download = web.get("alice", f"/api/v1/runs/{run['run_id']}/results", params={"format": fmt})
        assert download.status_code == 200, download.text
        assert "attachment" in download.headers["Content-Disposition"]
        cli_copy = tmp_path / f"cli.{fmt}"
        export_run(web.pipeline.engine, run["run_id"], fmt, cli_copy)
        if fmt == "parquet":
            assert pq.read_table(io.BytesIO(download.content)).equals(pq.read_table(cli_copy))
        else:
            assert download.content == cli_copy.read_bytes()
    assert b"'=1+2" in web.get("alice", f"/api/v1/runs/{run['run_id']}/results").content  # formula escaped

    # Bob sees nothing of Alice's run: the same 404 as a run that does not exist.
    for method, path in (
        ("get", ""),
        ("get", "/results"),
        ("post", "/cancel"),
        ("post", "/retry-failed"),
        ("post", "/resume"),
    ):
        response = getattr(web, method)("bob", f"/api/v1/runs/{run['run_id']}{path}")
        assert is_problem(response, 404)["detail"] == f"no run {run['run_id']!r}"
    assert web.get("bob", "/api/v1/runs").json()["total"] == 0
    bobs = upload(web, "bob", dataset, idempotency_key="nightly-1")  # his key, his own run
    assert bobs.status_code == 201 and bobs.json()["run_id"] != run["run_id"]


def test_tokens_expire_on_logout_and_refresh_works_until_revoked(web):
    web.add_user("alice")
    tokens = web.login("alice")
    refreshed = requests.post(
        f"{web.url}/api/v1/auth/refresh", timeout=10, headers={"Authorization": f"Bearer {tokens['refresh_token']}"}
    )
    assert refreshed.status_code == 200
    fresh = {"Authorization": f"Bearer {refreshed.json()['access_token']}"}
    assert requests.get(f"{web.url}/api/v1/runs", headers=fresh, timeout=10).status_code == 200

    out = web.post("alice", "/api/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert out.status_code == 204
    assert is_problem(web.get("alice", "/api/v1/runs"), 401)["detail"] == "the token has been revoked"
    again = requests.post(
        f"{web.url}/api/v1/auth/refresh", timeout=10, headers={"Authorization": f"Bearer {tokens['refresh_token']}"}
    )
    assert is_problem(again, 401)["detail"] == "the token has been revoked"
    assert requests.get(f"{web.url}/api/v1/runs", headers=fresh, timeout=10).status_code == 200  # not revoked
    assert is_problem(web.get(None, "/api/v1/runs"), 401)
    assert is_problem(
        requests.get(f"{web.url}/api/v1/runs", headers={"Authorization": "Bearer nonsense"}, timeout=10), 401
    )
    wrong = requests.post(
        f"{web.url}/api/v1/auth/login", json={"username": "alice", "password": "wrong one"}, timeout=10
    )
    assert is_problem(wrong, 401)["detail"] == "wrong user name or password"
    # Text PostgreSQL would refuse never reaches SQL (Schemathesis found a 500 from a NUL in a user name).
    nul = requests.post(f"{web.url}/api/v1/auth/login", json={"username": "a\u0000b", "password": "x"}, timeout=10)
    assert "NUL" in is_problem(nul, 422)["detail"]
    lone = requests.post(f"{web.url}/api/v1/auth/login", json={"username": "a\ud800", "password": "x"}, timeout=10)
    assert is_problem(lone, 422)
    web.login("alice")
    assert is_problem(web.get("alice", "/api/v1/runs/r%00x"), 404)


def test_bad_uploads_are_problems_naming_the_row_and_nothing_is_enqueued(web, tmp_path):
    web.add_user("alice")
    web.login("alice")
    duplicate = write(
        tmp_path / "dup.csv", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}]
    )
    body = is_problem(upload(web, "alice", duplicate), 422)
    assert "dup.csv" in body["detail"] and "row 3" in body["detail"] and "'a'" in body["detail"], body
    assert str(web.pipeline.settings.data_dir) not in body["detail"]  # the stored path is not shown
    missing = is_problem(upload(web, "alice", duplicate, template="{{ nope }}"), 422)
    assert "nope" in missing["detail"]
    bomb = is_problem(upload(web, "alice", duplicate, template='{{ "x" * 400000000 }}'), 422)
    assert "1,000,000" in bomb["detail"] or "1000000" in bomb["detail"], bomb  # the CLI's sandbox limit
    no_file = is_problem(web.post("alice", "/api/v1/runs", data={"template": "x"}), 422)
    assert "'file'" in no_file["detail"] and no_file["errors"]
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"id,text\n\x00\x01\x02")
    assert "binary" in is_problem(upload(web, "alice", binary), 415)["detail"]
    fake_parquet = tmp_path / "fake.parquet"
    fake_parquet.write_text("id,text\n1,x\n")
    assert "Parquet" in is_problem(upload(web, "alice", fake_parquet), 415)["detail"]
    assert ".csv" in is_problem(upload(web, "alice", duplicate, name="../../etc/passwd"), 415)["detail"]
    good = write(tmp_path / "good.csv", ROWS)
    assert "--mode batch" in is_problem(upload(web, "alice", good, mode="batch"), 422)["detail"]  # fake: no batch API
    assert nothing_enqueued(web.pipeline)
    uploads = web.pipeline.settings.data_dir / "uploads"
    assert not [p for p in uploads.rglob("*") if p.is_file()]  # refused uploads are not kept

    escaped = upload(web, "alice", good, name="../../etc/passwd.csv")
    assert escaped.status_code == 201, escaped.text
    stored = Path(load_config(web.pipeline.redis, escaped.json()["run_id"]).dataset)
    assert stored.parent == uploads.resolve() and re.fullmatch(r"[0-9a-f]{32}\.csv", stored.name)
    assert not (tmp_path / "etc").exists() and not (uploads.parent.parent / "etc").exists()
    listed = web.get("alice", "/api/v1/runs").json()["items"]
    assert listed[0]["filename"] == "passwd.csv"


def test_admins_see_every_run_and_users_only_their_own(web, tmp_path):
    web.add_user("alice")
    web.add_user("root", admin=True)
    web.login("alice")
    web.login("root")
    dataset = write(tmp_path / "d.csv", ROWS[:3])
    alices = upload(web, "alice", dataset).json()["run_id"]
    from_cli = web.pipeline.submit(dataset, TEMPLATE, id_column="id").run_id  # no owner
    web.pipeline.collect()  # the runs' rows in SQL
    assert from_cli != alices
    assert web.get("alice", f"/api/v1/runs/{from_cli}").status_code == 404
    assert [r["run_id"] for r in web.get("alice", "/api/v1/runs").json()["items"]] == [alices]
    assert web.get("root", f"/api/v1/runs/{from_cli}").status_code == 200
    assert web.get("root", f"/api/v1/runs/{alices}").status_code == 200
    assert {r["run_id"] for r in web.get("root", "/api/v1/runs").json()["items"]} == {alices, from_cli}
    assert web.post("root", f"/api/v1/runs/{alices}/cancel").status_code == 200


def test_body_size_rate_limits_and_cors(make_web, tmp_path):
    web = make_web(
        web_max_upload_bytes=2000,
        web_login_limit="3/minute",
        web_submit_limit="3/minute",
        web_cors_origins=["https://app.example"],
    )
    web.add_user("alice")
    web.login("alice")
    big = write(tmp_path / "big.csv", [{"id": f"r{i}", "text": "x" * 100} for i in range(40)])
    assert is_problem(upload(web, "alice", big), 413)  # counts as a submit too
    small = write(tmp_path / "small.csv", ROWS[:2])
    assert upload(web, "alice", small).status_code == 201
    assert upload(web, "alice", small).status_code == 200
    limited = is_problem(upload(web, "alice", small), 429)
    assert limited["title"] == "Too Many Requests"
    for _ in range(2):
        requests.post(f"{web.url}/api/v1/auth/login", json={"username": "alice", "password": "nope"}, timeout=10)
    assert is_problem(
        requests.post(f"{web.url}/api/v1/auth/login", timeout=10, json={"username": "alice", "password": PASSWORD}), 429
    )

    def preflight(origin: str) -> requests.Response:
        return requests.options(
            f"{web.url}/api/v1/runs", timeout=10, headers={"Origin": origin, "Access-Control-Request-Method": "GET"}
        )

    assert preflight("https://app.example").headers.get("Access-Control-Allow-Origin") == "https://app.example"
    assert "Access-Control-Allow-Origin" not in preflight("https://evil.example").headers


def test_health_metrics_access_log_and_create_user_command(web, tmp_path):
    assert web.get(None, "/healthz").json() == {"status": "ok"}
    ready = web.get(None, "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == []
    log_file = tmp_path / "web.log"
    handler = json_file_handler(log_file, "web")
    access = logging.getLogger("web.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        runner = CliRunner()
        from enqueue import cli

        created = runner.invoke(
            cli,
            ["create-user", "carol", "--password-stdin"],
            input=PASSWORD + "\n",
            env=web.pipeline.env(LOG_LEVEL="WARNING"),
        )
        assert created.exit_code == 0 and "created user carol" in created.output, created.output
        taken = runner.invoke(
            cli,
            ["create-user", "carol", "--password-stdin"],
            input=PASSWORD + "\n",
            env=web.pipeline.env(LOG_LEVEL="WARNING"),
        )
        assert taken.exit_code == 2 and "exists already" in taken.output
        web.login("carol")
        assert web.get("carol", "/api/v1/runs/rnope").status_code == 404
    finally:
        access.removeHandler(handler)
        handler.close()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    entry = next(e for e in lines if e["path"] == "/api/v1/runs/rnope")
    assert entry["route"] == "/api/v1/runs/<string:run_id>" and entry["status"] == 404
    assert entry["role"] == "web" and entry["duration_ms"] >= 0 and entry["user"] == "carol"
    assert "Bearer" not in json.dumps(lines)
    metrics = web.get(None, "/metrics").text
    assert 'web_http_requests_total{method="GET",route="/api/v1/runs/<string:run_id>",status="404"} 1.0' in metrics
    assert 'web_http_request_duration_seconds_count{method="POST",route="/api/v1/auth/login",status="200"}' in metrics


def test_pages_forms_need_the_csrf_token_and_login_redirects_stay_on_site(web, tmp_path):
    web.add_user("alice")
    web.login("alice")
    run_id = upload(web, "alice", write(tmp_path / "d.csv", ROWS[:2])).json()["run_id"]
    session = requests.Session()
    page = session.post(
        f"{web.url}/login",
        data={"username": "alice", "password": PASSWORD, "next": "//evil.example/"},
        allow_redirects=False,
        timeout=10,
    )
    assert page.status_code == 302 and page.headers["Location"] == "/"
    forged = session.post(f"{web.url}/runs/{run_id}/cancel", allow_redirects=False, timeout=10)
    assert forged.status_code in (302, 401) and "/login" in forged.headers.get("Location", "/login")
    assert web.get("alice", f"/api/v1/runs/{run_id}").json()["status"] != "cancelled"
    token = session.cookies["csrf_access_token"]
    done = session.post(
        f"{web.url}/runs/{run_id}/cancel", data={"csrf_token": token}, allow_redirects=False, timeout=10
    )
    assert done.status_code == 302 and web.get("alice", f"/api/v1/runs/{run_id}").json()["status"] == "cancelled"


EXAMPLES = int(os.environ.get("WEB_FUZZ_EXAMPLES", "8"))  # per operation; more for a longer hunt


def test_schemathesis_finds_no_server_error_and_no_response_off_the_schema(web, tmp_path):
    import schemathesis

    web.add_user("alice")
    web.login("alice")
    dataset = write(tmp_path / "known.csv", ROWS[:2])
    known = upload(web, "alice", dataset).json()["run_id"]
    schema = schemathesis.openapi.from_url(f"{web.url}/openapi.json")
    calls: list[int] = []
    seen: dict[str, set[int]] = {}
    for operation in schema.get_all_operations():
        operation = operation.ok()
        if operation.path == "/api/v1/auth/logout":  # would revoke the token the other calls use
            continue
        _fuzz(operation, web, known, calls, seen)
    print(f"schemathesis: {len(calls)} calls", {label: sorted(codes) for label, codes in seen.items()})
    assert len(calls) >= min(60, 7 * EXAMPLES) and not [s for s in calls if s >= 500]


def _fuzz(operation, web, known: str, calls: list[int], seen: dict[str, set[int]]) -> None:
    """Schemathesis' cases for one operation (about half on the run ``known``), their status codes added to
    ``calls`` and ``seen``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case) -> None:
        if case.path_parameters and "run_id" in case.path_parameters and len(calls) % 2:
            case.path_parameters["run_id"] = known  # half the calls on a real run
        response = case.call(base_url=web.url, headers=web.auth("alice"), timeout=30)
        calls.append(response.status_code)
        seen.setdefault(operation.label, set()).add(response.status_code)
        case.validate_response(response, checks=checks)

    fuzz()
