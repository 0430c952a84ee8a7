"""One HTTP request in the worker, seen from the event loop: submit, events, timeout, disconnect, cancel.

    async with Call(service, request, job) as call:     # 429 when the queue is full
        async for kind, payload in call:                # "tokens" / "result" / "error", as the worker says
            ...
    # leaving the block early (an error, a timeout, a disconnect) cancels what is still running

A timeout raises a 504 ApiError; a client that disconnects ends the iteration (`call.gone`)."""
from __future__ import annotations

import asyncio
import itertools

from ..inference.engine import Request
from .schemas import ApiError, Job
from .worker import Job as WorkerJob

_ids = itertools.count()


class ClientGone(Exception):
    """The client disconnected: nobody reads the answer."""


class Call:
    def __init__(self, service, request, job: Job, watch_disconnect: bool = True):
        self.service, self.request, self.job = service, request, job
        self.id = next(_ids)
        self.open = set(range(len(job.prompts)))  # inputs still expecting events
        self.watch = watch_disconnect
        self.events: asyncio.Queue = asyncio.Queue()
        self.gone = False

    async def __aenter__(self) -> "Call":
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.service.settings.request_timeout if self.service.settings.request_timeout \
            else None
        requests = [Request((self.id, i), ids, self.job.configs, self.job.seed, i) for i, ids in enumerate(self.job.prompts)]
        put = self.events.put_nowait
        accepted = self.service.worker.submit(
            WorkerJob(self.id, requests, lambda kind, payload: loop.call_soon_threadsafe(put, (kind, payload))),
            self.service.settings.max_queue)
        if not accepted:
            self.service.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"the queue is full ({self.service.settings.max_queue} inputs wait for a slot); "
                           f"retry later", type="rate_limit_error", headers={"Retry-After": "1"})
        self.watcher = asyncio.ensure_future(self._watch()) if self.watch else None
        return self

    async def __aexit__(self, *exc) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        if self.open:
            self.service.worker.cancel(self.id)

    def done(self, index: int) -> None:
        """Input `index` needs no more events (a result came, or the caller stopped it)."""
        self.open.discard(index)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.open:
            raise StopAsyncIteration
        timeout = None if self.deadline is None else self.deadline - asyncio.get_running_loop().time()
        try:
            kind, payload = await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            self.service.metrics.rejected.labels("timeout").inc()
            raise ApiError(504, f"the request took longer than --request-timeout "
                           f"{self.service.settings.request_timeout:g} s", type="timeout_error") from None
        if kind == "gone":
            self.gone = True
            self.service.metrics.rejected.labels("disconnected").inc()
            raise ClientGone()
        if kind == "result":
            self.done(payload[0])
        elif kind == "error" and payload[0] is not None:
            self.done(payload[0])
        return kind, payload

    async def _watch(self) -> None:
        """A plain (not streamed) request: its body is read, so the next ASGI message is the disconnect."""
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.events.put_nowait(("gone", None))
                return


def engine_error(index, error: Exception) -> ApiError:
    """An input the engine failed alone (its own controls, e.g. every token banned), or the shutdown."""
    if isinstance(error, ApiError):
        return error
    where = f"input {index}: " if index is not None else ""
    if isinstance(error, ValueError):
        return ApiError(422, f"{where}{error}")
    return ApiError(500, f"{where}generation failed: {type(error).__name__}: {error}", type="server_error")
