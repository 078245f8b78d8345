"""One provider call on the wire: the official SDK's URL, headers and error classes, sent over one aiohttp session.

The SDKs' request layer (request-options models, httpx2 request and header objects, an adapter onto aiohttp)
cost about 0.6 ms of CPU per call, four times the HTTP exchange itself, and at hundreds of calls in flight it
was what capped a worker process. So the SDK client still defines the call: its base URL, its default and auth
headers, and the error class a non-2xx answer becomes (the SDK's own ``_make_status_error_from_response``, so
``RateLimitError``, ``APIStatusError.response.headers`` and the rest are exactly the SDK's); only the bytes go
through aiohttp directly, the library the SDK's aiohttp transport uses underneath. What is the same for every call
is made once: the URLs (no parse per call), the headers (the session's own: a copy per call, not a merge), no
cookie jar (the SDK keeps no cookies either); the body is compact UTF-8 JSON as the SDK writes it, by orjson.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import aiohttp
import httpx2
import orjson
from yarl import URL

from ..errors import UnreadableAnswer


class SdkWire:
    def __init__(self, client: Any, sdk: ModuleType, *, timeout: float) -> None:
        self._client = client
        self._sdk = sdk
        self._base = str(client.base_url).rstrip("/")
        headers = {**client.default_headers, **client.auth_headers}
        self._headers = {name: value for name, value in headers.items() if isinstance(value, str)}  # not Omit
        self.deadline = timeout  # the whole exchange, sending to the last byte read: aiohttp's total timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0))
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    async def post_json(self, path: str, body: Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, str]]:
        """POST ``body`` to ``path`` under the base URL: the parsed JSON answer and the response headers, or the
        SDK's exception for a non-2xx status, a timeout or a failed connection."""
        url = self._urls.get(path) or self._urls.setdefault(path, URL(self._base + path))
        try:
            async with self._open().post(url, data=_dumps(body)) as response:
                content = await response.read()
                status, headers = response.status, response.headers
        except TimeoutError:
            raise self._sdk.APITimeoutError(request=httpx2.Request("POST", str(url))) from None
        except aiohttp.ClientError as exc:
            raise self._sdk.APIConnectionError(
                message=f"Connection error: {type(exc).__name__}", request=httpx2.Request("POST", str(url))
            ) from None
        if status >= 400:
            raise self._client._make_status_error_from_response(
                httpx2.Response(
                    status, headers=list(headers.items()), content=content, request=httpx2.Request("POST", str(url))
                )
            )
        try:
            answer = _loads(content)
        except ValueError:
            raise UnreadableAnswer(
                f"HTTP {status} with a body that is not JSON ({len(content)} bytes)", status=status
            ) from None
        if not isinstance(answer, dict):
            raise UnreadableAnswer(f"HTTP {status} with a JSON body that is not an object", status=status)
        return answer, headers

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on the event loop that uses it
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=self._timeout,
                headers=self._headers,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self._client.close()


def _dumps(body: Mapping[str, Any]) -> bytes:
    """The body as the SDKs write it (compact, UTF-8); what orjson refuses (an integer past 64 bits, a key that
    is not text) by the json module, as the SDKs do."""
    try:
        return orjson.dumps(body)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _loads(content: bytes) -> Any:
    """JSON by orjson; what it refuses and the json module reads (NaN, integers past 64 bits, UTF-16) by json."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)
