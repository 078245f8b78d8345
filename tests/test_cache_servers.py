"""The response cache is per server: two OpenAI-compatible servers (or two tenants' endpoints) sharing one Redis
never get each other's answers, while the same server still gets its own."""

from __future__ import annotations

from pipeline.calls.cache import cache_key
from pipeline.providers.base import ProviderRequest

from .datasets import tricky_rows, write
from .fakeprovider import FakeProvider


def test_two_servers_sharing_a_redis_get_their_own_answers(make_pipeline, tmp_path):
    dataset = write(tmp_path / "d.csv", tricky_rows(6))
    with FakeProvider() as first, FakeProvider() as second:
        second.configure(answers=[{"match": "#", "content": "from the second server"}])
        answers = {}
        for label, server, key in (("first", first, "a"), ("second", second, "b"), ("again", first, "c")):
            pipeline = make_pipeline(compatible_base_url=f"{server.url}/v1")
            report = pipeline.submit(
                dataset, "Q: {{ text }}", provider="compatible", model="m", id_column="id", idempotency_key=key
            )
            pipeline.work()
            pipeline.collect()
            answers[label] = {r["row_key"]: (r["answer"], bool(r["cached"])) for r in pipeline.results(report.run_id)}
    assert all(answer.startswith("ECHO: ") and not cached for answer, cached in answers["first"].values())
    assert all(answer == "from the second server" and not cached for answer, cached in answers["second"].values())
    assert answers["again"] == {key: (answer, True) for key, (answer, _) in answers["first"].items()}


def test_cache_key_names_the_server():
    request = ProviderRequest(prompt="p", model="m")
    assert cache_key("compatible", request, "http://a:8000/v1") != cache_key("compatible", request, "http://b:8000/v1")
    assert cache_key("compatible", request, "http://a:8000/v1/") == cache_key("compatible", request, "http://a:8000/v1")
    assert cache_key("fake", request) == cache_key("fake", request, None)
