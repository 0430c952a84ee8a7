"""The server's Prometheus metrics (GET /metrics), in a registry of its own."""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self, slots: int):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("gpt2mh_queue_depth", "inputs accepted and waiting for a stream slot", registry=r)
        self.busy_slots = Gauge("gpt2mh_busy_slots", "stream slots decoding a stream now", registry=r)
        Gauge("gpt2mh_slots", "stream slots of the engine", registry=r).set(slots)
        self.tokens = Counter("gpt2mh_generated_tokens", "tokens generated, all heads", registry=r)
        Gauge("gpt2mh_tokens_per_second", "tokens generated per second, over the last 10 s",
              registry=r).set_function(self._rate)
        self.latency = Histogram("gpt2mh_request_seconds", "request latency, to the last byte", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("gpt2mh_requests", "requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter("gpt2mh_rejected_requests", "requests refused or ended early, by reason",
                                ["reason"], registry=r)
        self._samples = collections.deque([(time.monotonic(), 0.0)], maxlen=128)  # (time, tokens so far)
        self._lock = threading.Lock()

    def add_tokens(self, n: int) -> None:
        self.tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            if now - self._samples[-1][0] >= 0.1:  # one sample per 100 ms is plenty for a 10 s window
                self._samples.append((now, self.tokens._value.get()))

    def _rate(self, window: float = 10.0) -> float:
        now, total = time.monotonic(), self.tokens._value.get()
        with self._lock:
            old = [s for s in self._samples if now - s[0] <= window] or [self._samples[-1]]
            t0, n0 = old[0]
        return (total - n0) / (now - t0) if now - t0 > 1e-3 else 0.0

    def text(self) -> bytes:
        return generate_latest(self.registry)
