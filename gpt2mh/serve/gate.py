"""The ASGI layer in front of the routes: the API key, draining, requests in flight, latency.

- With an API key, every path but /health needs `Authorization: Bearer KEY` (compared in constant
  time); else 401.
- While draining (SIGTERM), new requests get 503; /health, /ready (503 itself) and /metrics answer.
- `inflight` counts the requests being answered (a streamed one until its last byte): the drain
  waits for it to reach 0."""
from __future__ import annotations

import hmac
import json
import time

from .schemas import ApiError

OPEN = ("/health",)
WHILE_DRAINING = ("/health", "/ready", "/metrics")
ENDPOINTS = {"/", "/health", "/ready", "/metrics", "/v1/generate", "/v1/score", "/v1/completions", "/v1/models"}


class Gate:
    def __init__(self, app, service):
        self.app, self.service = app, service
        self.inflight = 0
        service.gate = self

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        service = self.service
        if service.settings.api_key and path not in OPEN and not self._authorized(scope):
            service.metrics.rejected.labels("unauthorized").inc()
            return await reply(send, ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                              "authentication_error", headers={"WWW-Authenticate": "Bearer"}))
        if service.draining and path not in WHILE_DRAINING:
            service.metrics.rejected.labels("draining").inc()
            return await reply(send, ApiError(503, "the server is shutting down; retry on another replica",
                                              "unavailable", headers={"Connection": "close"}))
        endpoint = path if path in ENDPOINTS else "other"
        status = [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        counted = path not in WHILE_DRAINING
        self.inflight += counted
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.inflight -= counted
            service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            service.metrics.requests.labels(endpoint, str(status[0])).inc()

    def _authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        expected = b"Bearer " + self.service.settings.api_key.encode()
        return hmac.compare_digest(given, expected)


async def reply(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
