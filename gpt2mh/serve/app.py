"""The routes: /v1/generate, /v1/score, /health, /ready, /metrics and the playground at /
(/v1/completions and /v1/models: `gpt2mh.serve.openai`)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..inference.flush import TextFlush
from ..inference.generate import head_output, text_of
from ..inference.score import score_text
from . import openai
from .calls import Call, ClientGone, engine_error
from .gate import Gate
from .metrics import Metrics
from .schemas import ApiError, Limits, generate_job, score_job
from .wire import read_body, sse


@dataclass
class Settings:
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0  # 0: none
    drain_timeout: float = 30.0
    api_key: str | None = None
    limits: Limits = field(default_factory=lambda: Limits(max_new_tokens=512, max_n=4))


@dataclass
class Service:
    """What every handler shares: the model, its tokenizer, the engine's worker, the metrics."""
    model: object
    tokenizer: object
    worker: object
    metrics: Metrics
    settings: Settings
    name: str = "gpt2mh"
    draining: bool = False
    gate: object = None  # the Gate in front of the app (its count of requests in flight)
    score_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "gpt2mh-score"))


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="gpt2mh", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # 404, 405 in the one error shape
        return JSONResponse(ApiError(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404
                                     else "invalid_request_error").body(), e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if service.draining:
            return JSONResponse(ApiError(503, "draining: the server is shutting down", "unavailable").body(), 503)
        return {"status": "ready", "heads": list(service.model.head_names)}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return (resources.files(__package__) / "static" / "playground.html").read_text(encoding="utf-8")

    @app.post("/v1/generate")
    async def generate(request: Request):
        job = generate_job(await read_body(request, service), service.model, service.tokenizer,
                           service.settings.limits)
        if job.stream:
            call = await Call(service, request, job, watch_disconnect=False).__aenter__()
            return StreamingResponse(stream_events(call, service.tokenizer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async with Call(service, request, job) as call:
            try:
                results = await collect(call)
            except ClientGone:
                return Response(status_code=499)
        return outputs(service.tokenizer, job, results)

    @app.post("/v1/score")
    async def score(request: Request):
        inputs, conts, heads = score_job(await read_body(request, service), service.model, service.tokenizer)
        loop = asyncio.get_running_loop()
        scores = await loop.run_in_executor(service.score_pool, score_text, service.model, service.tokenizer,
                                            inputs, conts, heads)
        return {"scores": scores}

    app.include_router(openai.router(service))
    return Gate(app, service)


async def collect(call: Call) -> dict:
    """Every input's Result, by index."""
    results = {}
    async for kind, payload in call:
        if kind == "result":
            results[payload[0]] = payload[1]
        elif kind == "error":
            raise engine_error(*payload)
    return results


def outputs(tokenizer, job, results: dict) -> dict:
    """The response body: per input {head: text} ({head: [texts]} with num_return_sequences > 1) and usage;
    "logprobs" for choices heads (the answer's), with output_scores "token_logprobs" (each token's, per
    sequence) and, for beam search, "sequence_scores"."""
    rows = []
    for i in range(len(job.prompts)):
        r = results[i]
        out = {h: head_output(tokenizer, job.configs[h], r, h) for h in r.tokens}
        usage = {"prompt_tokens": r.prompt_tokens, "new_tokens": {h: sum(map(len, s)) for h, s in r.tokens.items()}}
        row = {"index": i, "outputs": out, "usage": usage}
        if r.choice:
            row["logprobs"] = {h: lp for h, (_, lp) in r.choice.items()}
        if r.scores:
            row["token_logprobs"] = r.scores
        if r.sequence_scores:
            row["sequence_scores"] = r.sequence_scores
        rows.append(row)
    return {"results": rows, "usage": {"prompt_tokens": sum(r["usage"]["prompt_tokens"] for r in rows),
                                       "new_tokens": sum(sum(r["usage"]["new_tokens"].values()) for r in rows)}}


async def stream_events(call: Call, tokenizer):
    """Server-sent events: {"index", "head", "sequence", "text"} deltas (the `stream()` flush rule),
    then one final event, the non-streamed body with "done": true; or an {"error": ...} event."""
    flush: dict[tuple, TextFlush] = {}
    results = {}

    def delta(i, h, r, text):
        return sse({"index": i, "head": h, "sequence": r, "text": text}) if text else ""

    try:
        async for kind, payload in call:
            if kind == "tokens":
                out = []
                for i, h, r, tok in payload:
                    if (i, h, r) not in flush:
                        c = call.job.configs[h]
                        flush[i, h, r] = TextFlush(tokenizer, c.eos_ids, c.max_new_tokens, c.stop_strings)
                    out.append(delta(i, h, r, flush[i, h, r].push(tok)))
                if any(out):
                    yield "".join(out)
            elif kind == "result":
                i, res = payload
                results[i] = res
                rest = [delta(i, h, r, flush[i, h, r].emit(text_of(tokenizer, ids, call.job.configs[h].stop_strings)))
                        for h, seqs in res.tokens.items() for r, ids in enumerate(seqs) if (i, h, r) in flush]
                for h, c in call.job.configs.items():  # beams and choices: their text comes whole, at the end
                    if h in res.tokens and (c.num_beams > 1 or c.choices):
                        texts = head_output(tokenizer, c, res, h)
                        rest += [delta(i, h, r, t) for r, t in enumerate(texts if isinstance(texts, list) else [texts])]
                if any(rest):
                    yield "".join(rest)
            elif kind == "error":
                raise engine_error(*payload)
        yield sse({"done": True, **outputs(tokenizer, call.job, results)})
    except ApiError as e:
        yield sse(e.body())
    finally:
        await call.__aexit__(None, None, None)
