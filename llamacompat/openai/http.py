"""HTTP to an OpenAI-compatible server: pooling, retries, and errors mapped to ``LlamaError``.

httpx2 does the HTTP, the connection pool and the SSE parsing. This module adds
what the OpenAI servers share: a bearer key, retries with exponential backoff
for what a retry can fix (no connection, 429, 503; never another 4xx, never a
stream that already produced tokens), and one mapping from HTTP failures to the
error hierarchy with the server's own message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any, Iterator

import httpx2

from ..errors import (
    AuthenticationError,
    BackendUnavailableError,
    ContextFullError,
    GenerationError,
    InvalidParamsError,
    LlamaError,
    ModelLoadError,
    RequestTimeoutError,
    UnsupportedFeatureError,
)

__all__ = ["HttpSession", "http_error"]

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 503})
_BACKOFF_S = 0.5  # first wait; doubles per retry
_BACKOFF_MAX_S = 8.0
_NO_REPLY = (httpx2.ConnectError, httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError)
_CONTEXT_HINTS = ("context_length_exceeded", "context length", "context window", "exceed_context_size",
                  "exceeds the available context", "maximum context length")


def _server_message(body: str) -> str:
    """The human part of an error body: OpenAI's ``{"error": {"message"}}``, FastAPI's ``{"detail"}``, or the text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            for key in ("message", "detail", "msg"):
                if error.get(key):
                    detail = error[key]
                    return detail if isinstance(detail, str) else json.dumps(detail)
        elif isinstance(error, str):
            return error
    return json.dumps(data)[:500]


def http_error(status: int, body: str, what: str) -> LlamaError:
    """The ``LlamaError`` for an HTTP error reply to ``what`` (e.g. "POST /v1/completions")."""
    message = _server_message(body)
    said = f"{what}: the server answered {status}: {message}"
    lowered = body.lower()
    if status in (401, 403):
        return AuthenticationError(f"{said} (check api_key or OPENAI_API_KEY)")
    if any(hint in lowered for hint in _CONTEXT_HINTS):
        return ContextFullError(f"Context is full: {said}")
    if status == 404:
        if "model" in lowered:
            return ModelLoadError(f"Failed to load model: {said} (list the served models with GET /v1/models)")
        return UnsupportedFeatureError(f"{said} (this server has no such endpoint)")
    if status in (405, 501):
        return UnsupportedFeatureError(f"{said} (this server does not implement it)")
    if status in RETRY_STATUS:
        return BackendUnavailableError(f"{said} (still busy after the retries; raise max_retries or try later)")
    if 400 <= status < 500:
        return InvalidParamsError(f"{said}")
    return GenerationError(f"{said}")


class HttpSession:
    """One pooled HTTP client for one server."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float, connect_timeout: float,
                 max_retries: int, max_connections: int, transport: httpx2.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self._client = httpx2.Client(
            headers=headers,
            timeout=httpx2.Timeout(timeout, connect=connect_timeout),
            limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,  # tests put an httpx2.MockTransport here
        )

    def url(self, path: str) -> str:
        return self.base_url + path

    def get(self, path: str) -> Any:
        return self._json(self._send("GET", path, None), f"GET {path}")

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._json(self._send("POST", path, body), f"POST {path}")

    def try_get(self, path: str) -> Any | None:
        """``get``, but None when the server has no such endpoint or answers with something else (probing)."""
        try:
            return self.get(path)
        except (UnsupportedFeatureError, InvalidParamsError, ModelLoadError, GenerationError):
            return None

    @contextlib.contextmanager
    def events(self, path: str, body: dict[str, Any]) -> Iterator[Iterator[httpx2.ServerSentEvent]]:
        """POST ``body`` and iterate the reply's server-sent events; errors before the stream starts are mapped."""
        what = f"POST {path}"
        response = self._send("POST", path, body, stream=True)
        try:
            if response.status_code >= 400:
                response.read()
                raise http_error(response.status_code, response.text, what)
            yield self._checked(httpx2.EventSource(response), what)
        finally:
            response.close()

    def _checked(self, source: httpx2.EventSource, what: str) -> Iterator[httpx2.ServerSentEvent]:
        try:
            yield from source
        except httpx2.TimeoutException as err:
            raise RequestTimeoutError(f"{what}: no data from {self.base_url} for the read timeout ({err})") from err
        except httpx2.SSEError as err:
            raise GenerationError(f"{what}: the server did not stream server-sent events: {err}") from err
        except (httpx2.TransportError, httpx2.StreamError) as err:
            raise BackendUnavailableError(f"{what}: the connection to {self.base_url} broke mid-stream: "
                                          f"{err or type(err).__name__}") from err

    def _send(self, method: str, path: str, body: dict[str, Any] | None, stream: bool = False) -> httpx2.Response:
        """Send, retrying connection failures and 429/503 with backoff (Retry-After honoured)."""
        what = f"{method} {path}"
        request = self._client.build_request(method, self.url(path), json=body)
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self._client.send(request, stream=stream)
            except httpx2.TimeoutException as err:
                if isinstance(err, httpx2.ConnectTimeout) and not last:
                    self._wait(attempt, None, what, err)
                    continue
                raise RequestTimeoutError(f"{what}: {self.base_url} did not answer in time ({type(err).__name__}; "
                                          "raise 'timeout' for slow servers)") from err
            except httpx2.TransportError as err:
                if isinstance(err, _NO_REPLY) and not last:  # nothing came back: a stale keep-alive or no server
                    self._wait(attempt, None, what, err)
                    continue
                raise BackendUnavailableError(f"{what}: no OpenAI-compatible server at {self.base_url} "
                                              f"({err or type(err).__name__})") from err
            if response.status_code in RETRY_STATUS and not last:
                retry_after = response.headers.get("retry-after")
                response.close()
                self._wait(attempt, retry_after, what, f"HTTP {response.status_code}")
                continue
            return response
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _wait(self, attempt: int, retry_after: str | None, what: str, why: Any) -> None:
        delay = min(_BACKOFF_S * 2 ** attempt, _BACKOFF_MAX_S)
        if retry_after is not None:
            try:
                delay = min(max(float(retry_after), 0.0), _BACKOFF_MAX_S * 4)
            except ValueError:  # an HTTP date: keep the backoff
                pass
        logger.info("openai: %s failed (%s); retry %d of %d in %.2f s", what, why, attempt + 1, self.max_retries, delay)
        time.sleep(delay)

    def _json(self, response: httpx2.Response, what: str) -> Any:
        try:
            response.read()
        except httpx2.TimeoutException as err:
            raise RequestTimeoutError(f"{what}: the reply from {self.base_url} stalled ({err})") from err
        except httpx2.TransportError as err:
            raise BackendUnavailableError(f"{what}: the connection to {self.base_url} broke: {err}") from err
        finally:
            response.close()
        if response.status_code >= 400:
            raise http_error(response.status_code, response.text, what)
        try:
            return response.json()
        except ValueError as err:
            raise GenerationError(f"{what}: the server's reply is not JSON: {response.text[:200]!r}") from err

    def close(self) -> None:
        self._client.close()
