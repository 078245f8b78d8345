"""The fake provider's batch APIs: OpenAI ``/v1/files`` + ``/v1/batches`` and Anthropic ``/v1/messages/batches``.

Each item of a batch is answered as the online call with the same body would be (the server's ``rules`` and
``fail_next`` give per-item errors, and each answered item counts as paid). A batch ends ``batch_delay`` seconds
after its creation, checked when it is read; ``batch_plan`` makes the next batches answer only their first
``keep`` items and then expire, or stall until cancelled. ``batch_token_limit`` refuses a batch whose tokens
(input + max output per item) would put its model's open batches over the limit, as OpenAI does (the batch is
created ``failed`` with ``token_limit_exceeded``) and Anthropic does (429). ``batch_lose_create`` creates the
batch, then answers 500, as a create whose reply was lost; ``batch_hang_create`` creates it, then holds the reply
``hang_seconds`` (a worker can be killed between the create and its record).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .fakeprovider import FakeProvider

DAY = 86400


@dataclass
class FakeBatch:
    id: str
    style: str  # "openai" | "anthropic"
    model: str
    items: list[tuple[str, dict[str, Any]]]  # (custom_id, request body)
    tokens: int
    created: float
    ends_at: float
    end: str  # "completed" | "expired" | "stall"
    keep: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    input_file_id: str | None = None
    refused: str | None = None  # the enqueued-token refusal (OpenAI: a failed batch)
    cancel_at: float | None = None
    final: str | None = None  # completed / expired / cancelled / failed, once ended
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)  # custom_id -> outcome, once ended
    output_file_id: str | None = None
    error_file_id: str | None = None


class FakeBatches:
    def __init__(self, server: FakeProvider) -> None:
        self.server = server
        self.batches: dict[str, FakeBatch] = {}
        self.files: dict[str, bytes] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}/content", self._file_content)
        app.router.add_post("/v1/batches", self._openai_create)
        app.router.add_get("/v1/batches", self._openai_list)
        app.router.add_get("/v1/batches/{id}", self._openai_retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self._openai_cancel)
        app.router.add_post("/v1/messages/batches", self._anthropic_create)
        app.router.add_get("/v1/messages/batches", self._anthropic_list)
        app.router.add_get("/v1/messages/batches/{id}", self._anthropic_retrieve)
        app.router.add_post("/v1/messages/batches/{id}/cancel", self._anthropic_cancel)
        app.router.add_get("/v1/messages/batches/{id}/results", self._anthropic_results)

    def count(self, style: str | None = None) -> int:
        """Batches created (refused ones included), of one API or both."""
        with self.server._lock:
            return sum(1 for b in self.batches.values() if style is None or b.style == style)

    # --- creating --------------------------------------------------------------------------------------------
    def _new_batch(self, style: str, items: list[tuple[str, dict[str, Any]]], **extra: Any) -> FakeBatch:
        from .fakeprovider import _all_input_text, _tokens

        server = self.server
        with server._lock:
            config = server.config
            plan = config.batch_plan.pop(0) if config.batch_plan else {}
            model = items[0][1].get("model", "unknown") if items else "unknown"
            tokens = sum(_tokens(_all_input_text(body, style)) + int(body.get("max_tokens") or 0) for _, body in items)
            prefix = "batch_" if style == "openai" else "msgbatch_"
            now = time.time()
            batch = FakeBatch(
                id=prefix + uuid.uuid4().hex[:24],
                style=style,
                model=model,
                items=items,
                tokens=tokens,
                created=now,
                ends_at=now + float(plan.get("delay", config.batch_delay)),
                end=plan.get("end", "completed"),
                keep=plan.get("keep"),
                **extra,
            )
            limit = config.batch_token_limit
            if limit is not None and self._open_tokens(model) + tokens > limit:
                batch.refused = (
                    f"Enqueued token limit reached for {model} in organization org-fake. Limit: "
                    f"{limit:,} enqueued tokens. Please try again once some in_progress batches "
                    "have been completed."
                )
                server._stats.batches_refused += 1
            server._stats.batches_created += 1
            self.batches[batch.id] = batch
            if batch.refused and style == "openai":
                batch.final = "failed"
            return batch

    def _open_tokens(self, model: str) -> int:
        self._settle_all()
        return sum(b.tokens for b in self.batches.values() if b.model == model and b.final is None and not b.refused)

    def _lose_reply(self) -> bool:
        with self.server._lock:
            if self.server.config.batch_lose_create > 0:
                self.server.config.batch_lose_create -= 1
                return True
            return False

    async def _hang_if_asked(self) -> None:
        with self.server._lock:
            hang = self.server.config.batch_hang_create > 0
            if hang:
                self.server.config.batch_hang_create -= 1
        if hang:
            await asyncio.sleep(self.server.config.hang_seconds)

    # --- ending ----------------------------------------------------------------------------------------------
    def _settle_all(self) -> None:
        for batch in self.batches.values():
            self._settle(batch)

    def _settle(self, batch: FakeBatch) -> None:
        """End the batch if its time came (or it was cancelled): answer its kept items, the rest expire or are
        cancelled. Called with the server's lock held."""
        if batch.final is not None or batch.refused:
            return
        now = time.time()
        if batch.cancel_at is not None:
            final = "cancelled"
        elif now < batch.ends_at or batch.end == "stall":
            return
        else:
            final = "expired" if batch.end == "expired" else "completed"
        keep = batch.keep if batch.keep is not None else (0 if final == "cancelled" else len(batch.items))
        for n, (custom_id, body) in enumerate(batch.items):
            if n < keep:
                batch.outcomes[custom_id] = self._answer_item(batch.style, body)
            else:
                batch.outcomes[custom_id] = {"kind": "expired" if final == "expired" else "canceled"}
        batch.final = final
        if batch.style == "openai":
            self._write_openai_files(batch)

    def _answer_item(self, style: str, body: dict[str, Any]) -> dict[str, Any]:
        from .fakeprovider import (
            _all_input_text,
            _anthropic_body,
            _anthropic_error,
            _last_user_text,
            _openai_body,
            _openai_error,
            _tokens,
        )

        server = self.server
        prompt = _last_user_text(body.get("messages", []))
        instruction = server._instruction(prompt)
        if isinstance(instruction, int):
            make_error = _openai_error if style == "openai" else _anthropic_error
            return {
                "kind": "errored",
                "status": instruction,
                "body": make_error(instruction, f"fake provider says {instruction}"),
            }
        content = server._content(prompt)
        max_tokens = body.get("max_tokens")
        finish = "stop"
        if max_tokens and _tokens(content) > max_tokens:
            content, finish = content[: max_tokens * 4], "length"
        server._stats.paid[prompt] += 1
        server._stats.batch_items += 1
        make = _openai_body if style == "openai" else _anthropic_body
        return {
            "kind": "succeeded",
            "body": make(
                body.get("model", "unknown"), content, _tokens(_all_input_text(body, style)), _tokens(content), finish
            ),
        }

    def _write_openai_files(self, batch: FakeBatch) -> None:
        output, errors = [], []
        for custom_id, outcome in batch.outcomes.items():
            line: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": custom_id}
            if outcome["kind"] == "succeeded":
                output.append(
                    {
                        **line,
                        "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": outcome["body"]},
                        "error": None,
                    }
                )
            elif outcome["kind"] == "errored":
                errors.append(
                    {
                        **line,
                        "response": {
                            "status_code": outcome["status"],
                            "request_id": uuid.uuid4().hex,
                            "body": outcome["body"],
                        },
                        "error": None,
                    }
                )
            else:
                code = "batch_expired" if outcome["kind"] == "expired" else "batch_cancelled"
                errors.append(
                    {**line, "response": None, "error": {"code": code, "message": f"request not executed ({code})"}}
                )
        if output:
            batch.output_file_id = self._store_file("\n".join(json.dumps(o) for o in output) + "\n")
        if errors:
            batch.error_file_id = self._store_file("\n".join(json.dumps(e) for e in errors) + "\n")

    def _store_file(self, text: str) -> str:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = text.encode("utf-8")
        return file_id

    # --- OpenAI ----------------------------------------------------------------------------------------------
    async def _upload(self, request: web.Request) -> web.Response:
        purpose, content, filename = "", b"", "upload.jsonl"
        async for part in await request.multipart():
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                filename = part.filename or filename
                content = bytes(await part.read())
        with self.server._lock:
            file_id = f"file-{uuid.uuid4().hex[:24]}"
            self.files[file_id] = content
        return web.json_response(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": int(time.time()),
                "filename": filename,
                "purpose": purpose,
                "status": "processed",
            }
        )

    async def _file_content(self, request: web.Request) -> web.Response:
        with self.server._lock:
            content = self.files.get(request.match_info["id"])
        if content is None:
            return web.json_response({"error": {"message": "no such file", "type": "not_found"}}, status=404)
        return web.Response(body=content, content_type="application/octet-stream")

    async def _openai_create(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.server._lock:
            content = self.files.get(body.get("input_file_id", ""))
        if content is None:
            return web.json_response(
                {"error": {"message": "input file not found", "type": "invalid_request_error"}}, status=400
            )
        items = []
        for line in content.decode("utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                items.append((entry["custom_id"], entry["body"]))
        batch = self._new_batch(
            "openai", items, metadata=body.get("metadata") or {}, input_file_id=body["input_file_id"]
        )
        await self._hang_if_asked()
        if self._lose_reply():
            return web.json_response({"error": {"message": "reply lost", "type": "server_error"}}, status=500)
        with self.server._lock:
            return web.json_response(self._openai_object(batch))

    async def _openai_retrieve(self, request: web.Request) -> web.Response:
        with self.server._lock:
            batch = self.batches.get(request.match_info["id"])
            if batch is None:
                return web.json_response({"error": {"message": "no such batch", "type": "not_found"}}, status=404)
            self._settle(batch)
            return web.json_response(self._openai_object(batch))

    async def _openai_cancel(self, request: web.Request) -> web.Response:
        with self.server._lock:
            batch = self.batches.get(request.match_info["id"])
            if batch is None:
                return web.json_response({"error": {"message": "no such batch", "type": "not_found"}}, status=404)
            if batch.final is None and batch.cancel_at is None:
                batch.cancel_at = time.time()
                self.server._stats.batches_cancelled += 1
            obj = self._openai_object(batch)
            if batch.final is None:
                obj["status"] = "cancelling"
            return web.json_response(obj)

    async def _openai_list(self, request: web.Request) -> web.Response:
        with self.server._lock:
            self._settle_all()
            ordered = [
                b for b in sorted(self.batches.values(), key=lambda b: b.created, reverse=True) if b.style == "openai"
            ]
            page = _page(ordered, request.query.get("after"), int(request.query.get("limit", 20)))
            data = [self._openai_object(b) for b in page[0]]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": page[1],
            }
        )

    def _openai_object(self, batch: FakeBatch) -> dict[str, Any]:
        status = batch.final or "in_progress"
        done = sum(1 for o in batch.outcomes.values() if o["kind"] == "succeeded")
        failed = sum(1 for o in batch.outcomes.values() if o["kind"] != "succeeded")
        if batch.final is None and batch.keep:
            done = batch.keep
        created = int(batch.created)
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": (
                {
                    "object": "list",
                    "data": [{"code": "token_limit_exceeded", "message": batch.refused, "param": None, "line": None}],
                }
                if batch.refused
                else None
            ),
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": created,
            "in_progress_at": created,
            "expires_at": created + DAY,
            "completed_at": int(time.time()) if status == "completed" else None,
            "failed_at": created if status == "failed" else None,
            "expired_at": int(batch.ends_at) if status == "expired" else None,
            "cancelled_at": int(time.time()) if status == "cancelled" else None,
            "request_counts": {"total": len(batch.items), "completed": done, "failed": failed},
            "metadata": batch.metadata or None,
        }

    # --- Anthropic -------------------------------------------------------------------------------------------
    async def _anthropic_create(self, request: web.Request) -> web.Response:
        from .fakeprovider import _anthropic_error

        body = await request.json()
        items = [(r["custom_id"], r["params"]) for r in body.get("requests", [])]
        batch = self._new_batch("anthropic", items)
        if batch.refused:
            return web.json_response(_anthropic_error(429, batch.refused), status=429, headers={"retry-after": "1"})
        await self._hang_if_asked()
        if self._lose_reply():
            return web.json_response(_anthropic_error(500, "reply lost"), status=500)
        with self.server._lock:
            return web.json_response(self._anthropic_object(batch, request))

    async def _anthropic_retrieve(self, request: web.Request) -> web.Response:
        from .fakeprovider import _anthropic_error

        with self.server._lock:
            batch = self._anthropic_batch(request)
            if batch is None:
                return web.json_response(_anthropic_error(404, "no such batch"), status=404)
            self._settle(batch)
            return web.json_response(self._anthropic_object(batch, request))

    async def _anthropic_cancel(self, request: web.Request) -> web.Response:
        from .fakeprovider import _anthropic_error

        with self.server._lock:
            batch = self._anthropic_batch(request)
            if batch is None:
                return web.json_response(_anthropic_error(404, "no such batch"), status=404)
            if batch.final is None and batch.cancel_at is None:
                batch.cancel_at = time.time()
                self.server._stats.batches_cancelled += 1
            obj = self._anthropic_object(batch, request)
            if batch.final is None:
                obj["processing_status"] = "canceling"
            return web.json_response(obj)

    async def _anthropic_list(self, request: web.Request) -> web.Response:
        with self.server._lock:
            self._settle_all()
            ordered = [
                b
                for b in sorted(self.batches.values(), key=lambda b: b.created, reverse=True)
                if b.style == "anthropic" and not b.refused
            ]
            page = _page(ordered, request.query.get("after_id"), int(request.query.get("limit", 20)))
            data = [self._anthropic_object(b, request) for b in page[0]]
        return web.json_response(
            {
                "data": data,
                "has_more": page[1],
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def _anthropic_results(self, request: web.Request) -> web.Response:
        from .fakeprovider import _anthropic_error

        with self.server._lock:
            batch = self._anthropic_batch(request)
            if batch is None or batch.final is None:
                return web.json_response(_anthropic_error(404, "results not ready"), status=404)
            lines = []
            for custom_id, outcome in batch.outcomes.items():
                if outcome["kind"] == "succeeded":
                    result = {"type": "succeeded", "message": outcome["body"]}
                elif outcome["kind"] == "errored":
                    result = {"type": "errored", "error": outcome["body"]}
                else:
                    result = {"type": outcome["kind"]}
                lines.append(json.dumps({"custom_id": custom_id, "result": result}))
        return web.Response(text="\n".join(lines) + "\n", content_type="application/binary")

    def _anthropic_batch(self, request: web.Request) -> FakeBatch | None:
        batch = self.batches.get(request.match_info["id"])
        return batch if batch is not None and batch.style == "anthropic" else None

    def _anthropic_object(self, batch: FakeBatch, request: web.Request) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if batch.final is None:
            counts["processing"] = len(batch.items)
        for outcome in batch.outcomes.values():
            counts[outcome["kind"]] += 1
        ended = batch.final is not None
        base = f"{request.scheme}://{request.host}"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": "ended" if ended else ("canceling" if batch.cancel_at else "in_progress"),
            "request_counts": counts,
            "created_at": _iso(batch.created),
            "expires_at": _iso(batch.created + DAY),
            "ended_at": _iso(time.time()) if ended else None,
            "archived_at": None,
            "cancel_initiated_at": _iso(batch.cancel_at) if batch.cancel_at else None,
            "results_url": f"{base}/v1/messages/batches/{batch.id}/results" if ended else None,
        }


def _page(ordered: list[FakeBatch], after: str | None, limit: int) -> tuple[list[FakeBatch], bool]:
    start = 0
    if after:
        ids = [b.id for b in ordered]
        start = ids.index(after) + 1 if after in ids else len(ids)
    chosen = ordered[start : start + limit]
    return chosen, start + limit < len(ordered)


def _iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).isoformat().replace("+00:00", "Z")
