"""The engine's thread: one `Engine` loop for the whole server, fed by a queue.

HTTP handlers (on the event loop) `submit` a Job — one engine `Request` per input, keyed (job id,
input index) — and receive its events through `job.deliver(kind, payload)`, called on this thread:

    ("tokens", [(index, head, r, token), ...])   each step's new tokens of the job's inputs
    ("result", (index, Result))                 an input is done (Result.tokens: every stream's ids)
    ("error", (index or None, exception))       the input (None: the whole job) failed

The queue source yields `IDLE` when the queue is empty and blocks when the engine has nothing to do
(`Engine.idle`). `cancel` (a disconnect, a timeout, the shutdown) drops the job's inputs that have
not reached the engine and retires the rest there (`Engine.cancel`).

An exception inside the engine fails no bystander: the inputs the engine held are run again, each
alone on a fresh engine, and only the one that fails alone gets the error. Every input has a fixed
seed and the noise depends on (seed, input, head, r) only, so a rerun makes the same tokens; those
already delivered are not delivered twice.

The engine keeps every SamplingConfig it has seen (its per-slot controls are built from them all): when
it is idle and has seen more than CONFIGS_KEPT, the loop starts a fresh one (the KV cache is kept).
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Hashable

from ..inference.engine import IDLE, Engine, Request, Result, Tokens, group_sizes

log = logging.getLogger("gpt2mh.serve")
CONFIGS_KEPT = 64  # an engine builds its per-slot controls from every config it has seen: renew it when idle


@dataclass
class Job:
    id: int
    requests: list[Request]           # keys (id, index)
    deliver: Callable[[str, object], None]


class Worker:
    def __init__(self, model, tokenizer, heads: list[str], *, slots: int | dict[str, int], max_n: int,
                 prompt_rows: int | None = None, compile: bool = False, metrics=None, max_beams: int = 1):
        self.model, self.tokenizer, self.heads, self.max_n = model, tokenizer, list(heads), max_n
        self.max_beams = max_beams  # > 1: every input takes a block of max_beams slots per head (beam search)
        self.compile, self.metrics = compile, metrics
        # slots per head: given, or the total split equally (requests' budgets are not known in advance)
        self.slots = dict(zip(self.heads, group_sizes(self.heads, slots, [max_n] * len(self.heads), None)))
        # inputs in flight at most: an input holds its prompt row until its longest stream ends, so about
        # the largest group; each row's attention runs over heads x max_n members every step, so rows
        # beyond what the slots can use cost time for nothing
        self.prompt_rows = prompt_rows or max(self.slots.values())
        self.closing = False
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.jobs: dict[int, Job] = {}
        self.state: dict[Hashable, str] = {}     # key -> "queued" | "admitted" (no Result yet)
        self.inflight: dict[Hashable, Request] = {}  # read by the engine, no Result yet
        self.delivered: dict[tuple, int] = {}   # (key, head, r) -> tokens delivered
        self.seen: dict[tuple, int] = {}        # (key, head, r) -> tokens made by the current engine run
        self.waiting = 0                        # inputs queued, not yet admitted: the queue depth
        self.engine: Engine | None = None
        self.thread = threading.Thread(target=self._run, name="gpt2mh-engine", daemon=True)

    # ---- the event loop's side --------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job, max_queue: int) -> bool:
        """Queue the job's inputs; False (nothing queued) while max_queue inputs already wait for a slot."""
        with self.lock:
            if self.waiting >= max_queue:
                return False
            self.jobs[job.id] = job
            self.waiting += len(job.requests)
            for r in job.requests:
                self.state[r.key] = "queued"
        for r in job.requests:
            self.inbox.put(r)
        self._gauges()
        return True

    def cancel(self, job_id: int) -> None:
        """Drop the job's inputs still running; no more events for them."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return
            for key in [r.key for r in job.requests]:
                self._forget(key)
                if key in self.inflight and self.engine is not None:
                    self.engine.cancel(key)
            self._close_if_done(job)
        self._gauges()

    def fail_all(self, error: Exception) -> None:
        """Every job gets `error` and is cancelled (shutdown past its deadline)."""
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.deliver("error", (None, error))
            self.cancel(job.id)

    def close(self) -> None:
        """End the loop once the engine has finished what it holds."""
        self.closing = True
        self.inbox.put(None)

    # ---- this thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            engine = self.engine = self._engine()
            try:
                for event in engine.events(self._source(engine)):
                    self._dispatch(event)
                if self.closing:
                    return
            except Exception as e:  # noqa: BLE001 - isolate the input that caused it, keep serving
                log.error("gpt2mh serve: the engine failed (%s: %s); running its %d input(s) again one by one",
                          type(e).__name__, e, len(self.inflight))
                self._isolate()

    def _engine(self, alone: Request | None = None) -> Engine:
        returns = {h: self.max_n for h in self.heads}
        if alone is None:
            return Engine(self.model, self.heads, slots=self.slots, returns=returns, prompt_rows=self.prompt_rows,
                          compile=self.compile, tokenizer=self.tokenizer,
                          beams={h: self.max_beams for h in self.heads})
        names = list(alone.configs)
        rows = {h: max(c.num_return_sequences, c.num_beams, len(c.choices)) for h, c in alone.configs.items()}
        return Engine(self.model, names, slots=rows, returns=rows, prompt_rows=1, prompt_len=len(alone.ids),
                      gen_len=max(c.max_new_tokens for c in alone.configs.values()), tokenizer=self.tokenizer,
                      beams={h: c.num_beams for h, c in alone.configs.items()})

    def _source(self, engine: Engine):
        while True:
            if engine.idle and len(engine.configs) > CONFIGS_KEPT:
                return  # a fresh engine (same caches) forgets the configs it has seen
            try:
                req = self.inbox.get(block=engine.idle)
            except queue.Empty:
                yield IDLE
                continue
            if req is None:
                return
            with self.lock:
                if req.key not in self.state:  # cancelled while queued
                    continue
                self.inflight[req.key] = req
            yield req

    def _isolate(self) -> None:
        with self.lock:
            suspects = list(self.inflight.values())
            self.inflight.clear()
        for req in suspects:
            with self.lock:
                if req.key not in self.state:
                    continue
                self.inflight[req.key] = req
                for s in [s for s in self.seen if s[0] == req.key]:
                    self.seen[s] = 0  # the rerun's tokens up to what was delivered are skipped
            engine = self.engine = self._engine(alone=req)
            try:
                for event in engine.events(iter([req])):
                    self._dispatch(event)
            except Exception as e:  # noqa: BLE001 - this input fails alone: it is the cause
                log.error("gpt2mh serve: input %s failed: %s: %s", req.key, type(e).__name__, e)
                with self.lock:
                    job = self.jobs.get(req.key[0])
                    if req.key in self.state:
                        self._forget(req.key)
                        job.deliver("error", (req.key[1], e))
                        self._close_if_done(job)
            self.inflight.pop(req.key, None)

    def _dispatch(self, event) -> None:
        if isinstance(event, Tokens):
            by_job: dict[int, list] = {}
            with self.lock:
                for key, head, r, tok in event.items:
                    if self.state.get(key) is None:
                        continue
                    if self.state[key] == "queued":
                        self.state[key] = "admitted"
                        self.waiting -= 1
                    s = (key, head, r)
                    self.seen[s] = self.seen.get(s, 0) + 1
                    if self.seen[s] > self.delivered.get(s, 0):
                        self.delivered[s] = self.seen[s]
                        by_job.setdefault(key[0], []).append((key[1], head, r, tok))
                for job_id, items in by_job.items():
                    self.jobs[job_id].deliver("tokens", items)
            if self.metrics is not None:
                self.metrics.add_tokens(sum(map(len, by_job.values())))
        elif isinstance(event, Result):
            with self.lock:
                self.inflight.pop(event.key, None)
                if event.key in self.state:
                    job = self.jobs[event.key[0]]
                    self._forget(event.key)
                    job.deliver("result", (event.key[1], event))
                    self._close_if_done(job)
        self._gauges()

    # ---- bookkeeping (under self.lock) ----------------------------------------------------------------
    def _forget(self, key) -> None:
        if self.state.pop(key, None) == "queued":
            self.waiting -= 1
        for s in [s for s in self.delivered if s[0] == key]:
            del self.delivered[s]
            self.seen.pop(s, None)

    def _close_if_done(self, job: Job) -> None:
        if not any(r.key in self.state for r in job.requests):
            self.jobs.pop(job.id, None)

    def _gauges(self) -> None:
        if self.metrics is not None:
            engine = self.engine
            self.metrics.queue_depth.set(self.waiting)
            self.metrics.busy_slots.set(engine.busy if engine is not None else 0)
