"""Money: every model has an exact price or none (never a guess, never free), and spend is integer nano-dollars
everywhere, so SQL totals equal the budget's Redis spend to the last unit. On SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest

from pipeline.calls.budget import spend_key
from pipeline.control import runs
from pipeline.pricing import Price, PriceTable

from .datasets import tricky_rows, write
from .fakeprovider import FakeProvider
from .processes import cli

TEMPLATE = "Q: {{ text }}"


def test_prices_are_exact_names_and_dated_aliases_never_a_prefix(tmp_path):
    table = PriceTable.load()
    for model in (
        "o3-mini",
        "o4-mini",
        "gpt-4-turbo",
        "gpt-4o-2024-08-06",
        "gpt-4o-mini-2024-07-18",
        "gpt-4.1-nano-2025-04-14",
        "o3",
        "claude-3-7-sonnet-latest",
        "claude-3-7-sonnet-20250219",
        "claude-3-5-haiku-latest",
        "claude-sonnet-4-5-20250929",
        "claude-opus-4-1",
    ):
        assert table.price(model) is not None, model
    assert table.price("claude-opus-4-5") == Price(5.0, 25.0)  # not claude-opus-4's 15 / 75
    assert table.price("claude-opus-4-0") == Price(15.0, 75.0)
    assert table.price("gpt-4o-2024-05-13") == Price(5.0, 15.0)  # not gpt-4o's 2.50 / 10
    for model in ("llama-3-8b", "gpt-4o-mini-turbo", "claude-opus-4-7", "o3-pro-something"):
        assert table.price(model) is None, model
    extra = tmp_path / "prices.toml"
    extra.write_text("[llama-3-8b]\ninput = 0.2\noutput = 0.4\n")
    assert PriceTable.load(extra).price("llama-3-8b") == Price(0.2, 0.4)
    assert Price(0.0375, 0.0625).cost_nano(3, 1) == 175  # 112.5 + 62.5 nano-dollars, exactly


def test_a_model_without_a_price_is_refused_a_budget_and_otherwise_shows_its_cost_as_unknown(make_pipeline, tmp_path):
    dataset = write(tmp_path / "d.csv", tricky_rows(6))
    with FakeProvider() as server:
        pipeline = make_pipeline(compatible_base_url=f"{server.url}/v1")
        base = ["submit", str(dataset), "-t", TEMPLATE, "--id-column", "id", "-p", "compatible", "-m", "llama-3-8b"]

        refused = cli(pipeline, *base, "--max-cost", "1")
        assert refused.returncode == 2 and refused.stdout == ""
        (line,) = refused.stderr.strip().splitlines()
        assert "llama-3-8b" in line and "PRICE_FILE" in line and "--price-in/--price-out" in line

        unknown = cli(pipeline, *base, "--json")
        assert unknown.returncode == 0, unknown.stderr
        assert unknown.stderr.count("no price for llama-3-8b") == 1
        unknown_id = json.loads(unknown.stdout)["run_id"]

        priced = cli(
            pipeline,
            *base,
            "--max-cost",
            "1",
            "--price-in",
            "2",
            "--price-out",
            "6",
            "--json",
            "--system",
            "another run",
        )
        assert priced.returncode == 0, priced.stderr
        priced_id = json.loads(priced.stdout)["run_id"]
        pipeline.work()
        pipeline.collect()

    status = json.loads(cli(pipeline, "status", unknown_id, "--json").stdout)
    assert (status["status"], status["cost_usd"], status["rows_unpriced"]) == ("completed", None, 6)
    assert "cost       unknown" in cli(pipeline, "status", unknown_id).stdout
    listed = {r["run_id"]: r for r in json.loads(cli(pipeline, "runs", "--json").stdout)}
    assert listed[unknown_id]["cost_usd"] is None
    assert "unknown" in next(line for line in cli(pipeline, "runs").stdout.splitlines() if unknown_id in line)

    results = pipeline.results(priced_id)  # the run's own price, used by the workers
    assert len(results) == 6 and all(r["status"] == "succeeded" for r in results)
    assert all(r["cost_nano"] == 2000 * r["input_tokens"] + 6000 * r["output_tokens"] for r in results)
    run = pipeline.run_row(priced_id)
    assert run["cost_nano"] == int(pipeline.redis.get(spend_key(priced_id))) > 0
    assert json.loads(cli(pipeline, "status", priced_id, "--json").stdout)["cost_usd"] == run["cost_nano"] / 1e9


def test_sql_spend_equals_redis_spend_to_the_nano_dollar_after_a_long_run(make_pipeline, tmp_path):
    """Prices with fractions of a nano-dollar per token (0.0375 $/M is 37.5 n$ a token): each call's cost is
    rounded once, and that same integer goes to Redis and to SQL. (Before: 2000 rows, SQL 648.5 n$ above Redis.)"""
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"fake": {"input": 0.0375, "output": 0.0625}}))
    pipeline = make_pipeline(price_file=prices)
    report = pipeline.submit(
        write(tmp_path / "d.csv", tricky_rows(1500)),
        TEMPLATE,
        id_column="id",
        chunk_size=250,
        max_cost=100.0,
        use_cache=False,
    )
    pipeline.work()
    pipeline.collect()
    redis_spend = int(pipeline.redis.get(spend_key(report.run_id)))
    run = pipeline.run_row(report.run_id)
    results = pipeline.results(report.run_id)
    assert (run["status"], len(results)) == ("completed", 1500)
    assert run["cost_nano"] == sum(r["cost_nano"] for r in results) == redis_spend
    info = runs.run_status(pipeline.redis, pipeline.engine, report.run_id)
    assert info["cost_usd"] == redis_spend / 1e9


def test_tables_from_the_float_version_are_refused_with_one_line(database_url):
    """create_all never changes an existing table: a float ``cost`` table must not take nano-dollars silently."""
    from sqlalchemy import create_engine, text

    from pipeline.collect import store
    from pipeline.errors import ConfigError

    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE runs (run_id VARCHAR(64) PRIMARY KEY, cost FLOAT NOT NULL)"))
    engine.dispose()
    with pytest.raises(ConfigError, match=r"older version .* 'Upgrading a database'"):
        store.make_engine(database_url)
