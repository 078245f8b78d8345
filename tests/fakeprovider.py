"""A fake LLM provider: a real HTTP server speaking the OpenAI Chat Completions and Anthropic Messages wire formats.

Tests and the benchmark point the official SDKs at it (``base_url``). It can add latency, enforce request and
token limits as token buckets or as sliding windows (answering 429 with ``Retry-After`` and the providers'
rate-limit headers), and inject 5xx, 4xx, hanging requests and malformed bodies, either for the next N requests,
for prompts that contain a given text, or at random for a share of all calls (``error_rate``, ``hang_rate``).
It counts what it saw, including how often each prompt was answered (paid for), what it admitted per second,
and (with ``sample_in_flight``) the calls in flight over time.

In-process: ``with FakeProvider(latency=0.2, rpm=3000) as server: ... server.url ...``.
As a process: ``python -m tests.fakeprovider --port 0 --latency 0.2 --rpm 3000`` prints its URL first;
``POST /_control`` (JSON config fields), ``GET /_stats`` and ``POST /_reset`` work on both.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime as dt
import math
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .fakebatches import FakeBatches

Instruction = int | str  # an HTTP status, "hang" or "malformed"


@dataclass
class Config:
    latency: float = 0.0
    jitter: float = 0.0
    rpm: float | None = None
    tpm: float | None = None
    burst_seconds: float = 1.0
    window: str = "bucket"  # "bucket": token buckets; "sliding": at most a window's share of the limit
    window_seconds: float = 10.0  # in any window_seconds ("sliding" only)
    retry_after: float = 1.0  # for injected 429s
    hang_seconds: float = 30.0
    error_rate: float = 0.0  # share of calls answered 500 at random
    hang_rate: float = 0.0  # share of calls that hang hang_seconds at random (then 504, never paid)
    sample_in_flight: float = 0.0  # seconds between samples of the calls in flight; 0 = no sampling
    fail_next: list[Instruction] = field(default_factory=list)
    rules: list[dict[str, Any]] = field(default_factory=list)  # {"match", "action", "times": N | None}
    answers: list[dict[str, str]] = field(default_factory=list)  # {"match", "content"}
    usage: bool = True  # False: answers carry no "usage" (some OpenAI-compatible servers)
    # Batch APIs (OpenAI /v1/batches, Anthropic /v1/messages/batches). A batch ends ``batch_delay`` seconds after
    # it is created, every item answered as the online call would be (``rules`` and ``fail_next`` give per-item
    # errors). ``batch_plan`` overrides that for the next batches, one dict each: {"keep": N items answered,
    # "end": "completed" | "expired" | "stall" (never ends until cancelled), "delay": s}.
    batch_delay: float = 0.0
    batch_plan: list[dict[str, Any]] = field(default_factory=list)
    batch_token_limit: int | None = None  # enqueued tokens per model over its open batches; above it, refused
    batch_lose_create: int = 0  # the next N creates make the batch, then answer 500 (reply lost)
    batch_hang_create: int = 0  # the next N creates make the batch, then hang hang_seconds first


class Bucket:
    """A token bucket refilled continuously at ``per_minute / 60`` per second, holding ``burst_seconds`` of it."""

    def __init__(self, per_minute: float, burst_seconds: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, cost: float) -> float:
        """0 if ``cost`` fits now (and takes it), else the seconds until it would."""
        self._refill()
        if self.level >= min(cost, self.capacity):
            self.level -= cost
            return 0.0
        return (min(cost, self.capacity) - self.level) / self.rate

    def remaining(self) -> int:
        self._refill()
        return max(0, int(self.level))

    def reset_seconds(self) -> float:
        return (self.capacity - self.level) / self.rate if self.rate else 0.0


class SlidingWindow:
    """At most ``per_minute / 60 * window_seconds`` admitted in any ``window_seconds``: no refill between, so
    the whole window's budget may go at once (as some providers count)."""

    def __init__(self, per_minute: float, window_seconds: float) -> None:
        self.rate = per_minute / 60.0
        self.seconds = window_seconds
        self.limit = max(1.0, self.rate * window_seconds)
        self.taken: collections.deque[tuple[float, float]] = collections.deque()  # (stamp, cost), oldest first
        self.total = 0.0

    def _expire(self) -> float:
        now = time.monotonic()
        while self.taken and self.taken[0][0] <= now - self.seconds:
            self.total -= self.taken.popleft()[1]
        return now

    def wait_for(self, cost: float) -> float:
        """0 if ``cost`` fits in the window now (and takes it), else the seconds until it would."""
        now = self._expire()
        needed = self.total + min(cost, self.limit) - self.limit
        if needed <= 1e-9:
            self.taken.append((now, cost))
            self.total += cost
            return 0.0
        freed = 0.0
        for stamp, taken in self.taken:
            freed += taken
            if freed >= needed - 1e-9:
                return stamp + self.seconds - now
        return self.seconds

    def remaining(self) -> int:
        self._expire()
        return max(0, int(self.limit - self.total))

    def reset_seconds(self) -> float:
        now = self._expire()
        return self.taken[0][0] + self.seconds - now if self.taken else 0.0


@dataclass
class Stats:
    requests: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    by_path: collections.Counter = field(default_factory=collections.Counter)
    paid: collections.Counter = field(default_factory=collections.Counter)
    auth_seen: int = 0
    in_flight: int = 0
    in_flight_max: int = 0
    max_per_second: int = 0
    max_per_minute: int = 0
    admitted: collections.deque = field(default_factory=collections.deque)
    admitted_total: int = 0
    admitted_tokens: int = 0  # as charged to the token limit: input + max output tokens
    first_admitted: float | None = None  # monotonic
    last_admitted: float | None = None
    admitted_per_second: list[int] = field(default_factory=list)  # by whole seconds since first_admitted
    tokens_per_second: list[int] = field(default_factory=list)
    in_flight_samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, calls in flight)
    batches_created: int = 0
    batch_items: int = 0  # batch requests answered (paid), all batches
    batches_refused: int = 0  # creates refused for the enqueued-token limit
    batches_cancelled: int = 0

    def admit(self, now: float, tokens: int = 0) -> None:
        if self.first_admitted is None:
            self.first_admitted = now
        self.last_admitted = now
        self.admitted_total += 1
        self.admitted_tokens += tokens
        second = int(now - self.first_admitted)
        for series in (self.admitted_per_second, self.tokens_per_second):
            series.extend([0] * (second + 1 - len(series)))
        self.admitted_per_second[second] += 1
        self.tokens_per_second[second] += tokens
        self.admitted.append(now)
        while self.admitted and self.admitted[0] <= now - 60:
            self.admitted.popleft()
        self.max_per_minute = max(self.max_per_minute, len(self.admitted))
        in_last_second = 0
        for stamp in reversed(self.admitted):
            if stamp <= now - 1:
                break
            in_last_second += 1
        self.max_per_second = max(self.max_per_second, in_last_second)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "by_path": dict(self.by_path),
            "paid": dict(self.paid),
            "auth_seen": self.auth_seen,
            "in_flight_max": self.in_flight_max,
            "max_per_second": self.max_per_second,
            "max_per_minute": self.max_per_minute,
            "in_flight": self.in_flight,
            "admitted_total": self.admitted_total,
            "admitted_tokens": self.admitted_tokens,
            "first_admitted": self.first_admitted,
            "last_admitted": self.last_admitted,
            "admitted_per_second": list(self.admitted_per_second),
            "tokens_per_second": list(self.tokens_per_second),
            "in_flight_samples": list(self.in_flight_samples),
            "batches_created": self.batches_created,
            "batch_items": self.batch_items,
            "batches_refused": self.batches_refused,
            "batches_cancelled": self.batches_cancelled,
        }


class FakeProvider:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self.host, self.port = host, port
        self.config = Config(**config)
        self._buckets = self._make_buckets()
        self._stats = Stats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task | None = None
        self.batches = FakeBatches(self)

    # --- control -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def settings(self) -> dict[str, str]:
        """Settings that point the pipeline's providers (OpenAI, Anthropic and a compatible server) at this server."""
        return {
            "openai_api_key": "sk-test-openai",
            "openai_base_url": f"{self.url}/v1",
            "anthropic_api_key": "sk-ant-test",
            "anthropic_base_url": self.url,
            "compatible_base_url": f"{self.url}/v1",
        }

    def configure(self, **changes: Any) -> None:
        with self._lock:
            self.config = dataclasses.replace(self.config, **changes)
            if {"rpm", "tpm", "burst_seconds", "window", "window_seconds"} & changes.keys():
                self._buckets = self._make_buckets()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats.to_dict()

    def reset(self) -> None:
        with self._lock:
            self._stats = Stats()
            self._buckets = self._make_buckets()

    def _make_buckets(self) -> dict[str, Bucket | SlidingWindow]:
        c = self.config
        if c.window not in ("bucket", "sliding"):
            raise ValueError(f"window must be 'bucket' or 'sliding', not {c.window!r}")

        def limit(per_minute: float) -> Bucket | SlidingWindow:
            if c.window == "sliding":
                return SlidingWindow(per_minute, c.window_seconds)
            return Bucket(per_minute, c.burst_seconds)

        buckets = {}
        if c.rpm:
            buckets["requests"] = limit(c.rpm)
        if c.tpm:
            buckets["tokens"] = limit(c.tpm)
        return buckets

    # --- lifecycle -----------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_get("/v1/models", self._models)
        self.batches.add_routes(app)
        app.router.add_post("/_control", self._control)
        app.router.add_get("/_stats", self._get_stats)
        app.router.add_post("/_reset", self._reset)
        return app

    async def serve(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=2048, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the real port when asked for 0
        if self.config.sample_in_flight > 0:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_in_flight())

    async def _sample_in_flight(self) -> None:
        """Record (time, calls in flight) every ``sample_in_flight`` seconds, into the current stats."""
        while True:
            await asyncio.sleep(self.config.sample_in_flight)
            with self._lock:
                self._stats.in_flight_samples.append((time.monotonic(), self._stats.in_flight))

    async def cleanup(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        await self._runner.cleanup()

    def start(self) -> FakeProvider:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-provider", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake provider did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the two wire formats ------------------------------------------------------------------------------
    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "openai")

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "anthropic")

    async def _answer(self, request: web.Request, style: str) -> web.StreamResponse:
        body = await request.json()
        prompt = _last_user_text(body.get("messages", []))
        input_text = _all_input_text(body, style)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        with self._lock:
            stats = self._stats  # all of this request is counted here, even if a reset replaces them meanwhile
            stats.requests += 1
            stats.by_path[request.path] += 1
            if request.headers.get("authorization") or request.headers.get("x-api-key"):
                stats.auth_seen += 1
            stats.in_flight += 1
            stats.in_flight_max = max(stats.in_flight_max, stats.in_flight)
            config = self.config
            instruction = self._instruction(prompt)
            prompt_tokens = _tokens(input_text)
            wait = 0.0
            if instruction is None:
                charged = prompt_tokens + (max_tokens or 0)
                wait = self._take_budget(charged)
                if not wait:
                    stats.admit(time.monotonic(), charged)
            headers = self._limit_headers(style)
        try:
            if instruction is None and wait:
                return self._finish(stats, style, 429, headers, wait)
            if instruction is not None:
                return await self._inject(stats, style, instruction, headers, config, request)
            await asyncio.sleep(config.latency + random.uniform(0, config.jitter))
            content = self._content(prompt)
            finish = "stop"
            if max_tokens and _tokens(content) > max_tokens:
                content, finish = content[: max_tokens * 4], "length"
            with self._lock:
                stats.paid[prompt] += 1
                stats.by_status[200] += 1
            payload = (_openai_body if style == "openai" else _anthropic_body)(
                body.get("model", "unknown"), content, prompt_tokens, _tokens(content), finish
            )
            if not config.usage:
                del payload["usage"]
            return web.json_response(payload, headers=headers)
        finally:
            with self._lock:
                stats.in_flight -= 1

    def _instruction(self, prompt: str) -> Instruction | None:
        config = self.config
        if config.fail_next:
            return config.fail_next.pop(0)
        for rule in config.rules:
            if rule["match"] in prompt and (rule.get("times") is None or rule["times"] > 0):
                if rule.get("times") is not None:
                    rule["times"] -= 1
                return rule["action"]
        draw = random.random() if config.error_rate or config.hang_rate else 1.0
        if draw < config.error_rate:
            return 500
        if draw < config.error_rate + config.hang_rate:
            return "hang"
        return None

    def _take_budget(self, tokens: int) -> float:
        waits = [self._buckets["requests"].wait_for(1)] if "requests" in self._buckets else []
        if "tokens" in self._buckets and not any(waits):
            waits.append(self._buckets["tokens"].wait_for(tokens))
        return max(waits, default=0.0)

    def _content(self, prompt: str) -> str:
        for answer in self.config.answers:
            if answer["match"] in prompt:
                return answer["content"]
        return "ECHO: " + prompt

    async def _inject(
        self,
        stats: Stats,
        style: str,
        instruction: Instruction,
        headers: dict[str, str],
        config: Config,
        request: web.Request,
    ) -> web.StreamResponse:
        if instruction == "hang":
            await asyncio.sleep(config.hang_seconds)
            return self._finish(stats, style, 504, headers)
        if instruction == "malformed":
            with self._lock:
                stats.by_status["malformed"] += 1
            return web.Response(
                status=200, text='{"id": "oops", "choices": [', content_type="application/json", headers=headers
            )
        status = int(instruction)
        if status == 401:  # like the real APIs, echo the key back, so tests can check that we redact it
            key = request.headers.get("x-api-key") or request.headers.get("authorization", "").split(" ")[-1]
            return self._finish(stats, style, status, headers, message=f"Incorrect API key provided: {key}")
        return self._finish(stats, style, status, headers, config.retry_after if status == 429 else None)

    def _finish(
        self,
        stats: Stats,
        style: str,
        status: int,
        headers: dict[str, str],
        retry_after: float | None = None,
        message: str | None = None,
    ) -> web.Response:
        with self._lock:
            stats.by_status[status] += 1
        headers = dict(headers)
        if retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(retry_after)))
            headers["retry-after-ms"] = str(int(retry_after * 1000))
        message = message or f"fake provider says {status}"
        body = (_openai_error if style == "openai" else _anthropic_error)(status, message)
        return web.json_response(body, status=status, headers=headers)

    def _limit_headers(self, style: str) -> dict[str, str]:
        request_id = uuid.uuid4().hex
        headers = {"x-request-id": request_id, "request-id": request_id}
        for kind, bucket in self._buckets.items():
            limit, remaining = int(bucket.rate * 60), bucket.remaining()
            if style == "openai":
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
                headers[f"x-ratelimit-reset-{kind}"] = f"{bucket.reset_seconds():.3f}s"
            else:
                reset = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=bucket.reset_seconds())
                headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
                headers[f"anthropic-ratelimit-{kind}-remaining"] = str(remaining)
                headers[f"anthropic-ratelimit-{kind}-reset"] = reset.isoformat().replace("+00:00", "Z")
        return headers

    # --- control endpoints ---------------------------------------------------------------------------------
    async def _models(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]}
        )

    async def _control(self, request: web.Request) -> web.Response:
        self.configure(**(await request.json()))
        return web.json_response(dataclasses.asdict(self.config))

    async def _get_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return ""


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _all_input_text(body: dict[str, Any], style: str) -> str:
    parts = [_text_of(m.get("content")) for m in body.get("messages", [])]
    if style == "anthropic":
        parts.append(_text_of(body.get("system")))
    return "".join(parts)


def _openai_body(model: str, content: str, prompt_tokens: int, completion_tokens: int, finish: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _anthropic_body(model: str, content: str, prompt_tokens: int, completion_tokens: int, finish: str) -> dict:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": content}],
        "stop_reason": "end_turn" if finish == "stop" else "max_tokens",
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
    }


_OPENAI_ERRORS = {
    429: "rate_limit_exceeded",
    400: "invalid_request_error",
    401: "invalid_api_key",
    403: "permission_denied",
    404: "not_found",
    422: "invalid_request_error",
}
_ANTHROPIC_ERRORS = {
    429: "rate_limit_error",
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    422: "invalid_request_error",
    529: "overloaded_error",
}


def _openai_error(status: int, message: str) -> dict:
    kind = _OPENAI_ERRORS.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


def _anthropic_error(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_ERRORS.get(status, "api_error"), "message": message}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--rpm", type=float)
    parser.add_argument("--tpm", type=float)
    parser.add_argument("--burst-seconds", type=float, default=1.0, help="bucket size of --window bucket")
    parser.add_argument(
        "--window",
        choices=("bucket", "sliding"),
        default="bucket",
        help="bucket: token buckets refilled continuously; sliding: at most rpm/60 * "
        "--window-seconds (and the same for tpm) admitted in any --window-seconds",
    )
    parser.add_argument("--window-seconds", type=float, default=10.0)
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of calls answered 500 at random")
    parser.add_argument(
        "--hang-rate",
        type=float,
        default=0.0,
        help="share of calls that hang --hang-seconds at random (then 504; never paid)",
    )
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument(
        "--sample-in-flight",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="sample the calls in flight this often into /_stats' in_flight_samples",
    )
    args = parser.parse_args()
    server = FakeProvider(
        args.host,
        args.port,
        latency=args.latency,
        jitter=args.jitter,
        rpm=args.rpm,
        tpm=args.tpm,
        burst_seconds=args.burst_seconds,
        window=args.window,
        window_seconds=args.window_seconds,
        error_rate=args.error_rate,
        hang_rate=args.hang_rate,
        hang_seconds=args.hang_seconds,
        sample_in_flight=args.sample_in_flight,
    )

    async def run() -> None:
        await server.serve()
        print(server.url, flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.cleanup()

    asyncio.run(run())


if __name__ == "__main__":
    main()
