"""Run the app under uvicorn, with the engine's worker thread, and drain on SIGTERM/SIGINT:

    signal -> /ready 503, new requests 503 (gate.py) -> in-flight requests finish -> exit 0
    still running at --drain-timeout minus a grace second: each gets an error response (503), then exit.

A second signal exits at once."""
from __future__ import annotations

import ipaddress
import logging
import sys
import time

import uvicorn

from .app import Service, Settings, create_app
from .metrics import Metrics
from .schemas import ApiError
from .worker import Worker

log = logging.getLogger("gpt2mh.serve")
GRACE = 1.0  # seconds left at the drain deadline for the error responses to go out


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.drain_start: float | None = None
        self.failed = False

    def handle_exit(self, sig, frame) -> None:  # not re-raised after shutdown: the drain's exit code is 0
        if self.drain_start is not None:
            self.should_exit = self.force_exit = True
            return
        self.service.draining = True
        self.drain_start = time.monotonic()
        print(f"gpt2mh serve: draining {self.service.gate.inflight} request(s) in flight "
              f"(--drain-timeout {self.service.settings.drain_timeout:g} s)", file=sys.stderr, flush=True)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_start is not None and not self.should_exit:
            elapsed = time.monotonic() - self.drain_start
            deadline = self.service.settings.drain_timeout
            if self.service.gate.inflight == 0 or elapsed >= deadline:
                self.should_exit = True
            elif elapsed >= deadline - GRACE and not self.failed:
                self.failed = True
                self.service.worker.fail_all(ApiError(503, "the server is shutting down (--drain-timeout reached)",
                                                      "unavailable"))
        return await super().on_tick(counter)


def serve(model, tokenizer, *, host: str, port: int, slots: int | dict[str, int], prompt_rows: int | None,
          compile: bool, settings: Settings) -> None:
    if not settings.api_key and not is_loopback(host):
        print(f"gpt2mh serve: warning: listening on {host} without an API key: anyone who can reach this address "
              f"can use the model; set --api-key or GPT2MH_API_KEY", file=sys.stderr, flush=True)
    worker = Worker(model, tokenizer, list(model.head_names), slots=slots, max_n=settings.limits.max_n, prompt_rows=prompt_rows,
                    max_beams=settings.limits.max_beams,
                    compile=compile)
    metrics = worker.metrics = Metrics(sum(worker.slots.values()))
    service = Service(model, tokenizer, worker, metrics, settings)
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=max(1, int(settings.drain_timeout)))
    server = DrainingServer(config, service)
    worker.start()
    print(f"gpt2mh serve: http://{host}:{port}/ slots per head {worker.slots}, {worker.prompt_rows} inputs at once",
          file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        worker.close()
        worker.thread.join(timeout=5)
        service.score_pool.shutdown(wait=False)
    print("gpt2mh serve: stopped", file=sys.stderr, flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
