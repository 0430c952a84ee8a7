"""OpenAI-compatible /v1/completions (one head: `model` = the head's name) and /v1/models (the heads),
so the official `openai` client and tools that speak it work unchanged.

OpenAI's meanings: max_tokens (default 16), temperature (default 1; 0 = greedy), top_p, n, seed,
stop (up to 4 strings: the library's stop_strings, so the engine ends a choice at the first one and the
text is cut before it), stream (`data: {chunk}` events, then `data: [DONE]`)."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..inference.flush import TextFlush
from ..inference.generate import text_of
from .calls import Call, ClientGone, engine_error
from .schemas import ApiError, Job, check_keys, configs, prompts, seed_of, strings
from .wire import read_body, sse

FIELDS = {"num_return_sequences": "n", "max_new_tokens": "max_tokens", "stop_strings": "stop"}
USED = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "user",
        "stream_options"}
OFF = {"echo": (False, None), "best_of": (1, None), "logprobs": (None,), "suffix": (None,),
       "frequency_penalty": (0, None), "presence_penalty": (0, None), "logit_bias": (None, {})}


class Choice:
    """One choice: its text as tokens arrive (`TextFlush`: a possible stop string held back, the text cut
    before one), its token count and why it ended."""

    def __init__(self, tokenizer, cfg):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.flush = TextFlush(tokenizer, cfg.eos_ids, cfg.max_new_tokens, cfg.stop_strings)
        self.tokens, self.finish = 0, None

    @property
    def text(self) -> str:
        return self.flush.sent

    def push(self, tok: int) -> str:
        self.tokens += tok not in self.cfg.eos_ids
        return self.flush.push(tok)

    def end(self, ids: list[int]) -> str:
        text = text_of(self.tokenizer, ids, self.cfg.stop_strings)
        stopped = any(t in self.cfg.eos_ids for t in ids) or text != text_of(self.tokenizer, ids)
        self.finish = "stop" if stopped or self.tokens < self.cfg.max_new_tokens else "length"
        return self.flush.emit(text)


def completion_job(body: dict, service) -> tuple[Job, str]:
    model = service.model
    check_keys(body, USED | set(OFF))
    for key, off in OFF.items():
        if key in body and body[key] not in off:
            raise ApiError(422, f"{key}={body[key]!r} is not supported here (leave it out)", param=key)
    head = body.get("model")
    if head not in model.head_names:
        raise ApiError(400, f"model={head!r}: not a head of this model; the heads (models) are "
                       f"{list(model.head_names)}", param="model")
    if "prompt" not in body:
        raise ApiError(400, "missing field 'prompt' (a string or a list of strings)", param="prompt")
    texts = strings(body["prompt"], "prompt")
    temperature = body.get("temperature", 1)
    temperature = 1 if temperature is None else temperature
    controls = {"do_sample": temperature != 0, "temperature": temperature if temperature != 0 else 1.0,
                "top_p": 1 if body.get("top_p") is None else body["top_p"],
                "max_new_tokens": 16 if body.get("max_tokens") is None else body["max_tokens"],
                "num_return_sequences": 1 if body.get("n") is None else body["n"]}
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    controls["stop_strings"] = tuple(stops)
    cfgs = configs(model, [head], controls, None, service.settings.limits, FIELDS)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(422, f"stream={stream!r} must be true or false", param="stream")
    job = Job(texts, prompts(model, service.tokenizer, texts, cfgs, "prompt", "max_tokens"), cfgs,
              seed_of(body.get("seed"), model.device), stream)
    return job, head


def router(service) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": h, "object": "model", "created": 0, "owned_by": service.name}
                                           for h in service.model.head_names]}

    @r.post("/v1/completions")
    async def completions(request: Request):
        job, head = completion_job(await read_body(request, service), service)
        run = Completion(service, job, head)
        if job.stream:
            call = await Call(service, request, job, watch_disconnect=False).__aenter__()
            return StreamingResponse(run.chunks(call), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async with Call(service, request, job) as call:
            try:
                async for _ in run.events(call):
                    pass
            except ClientGone:
                return Response(status_code=499)
        return run.body([{"text": c.text, "index": k, "logprobs": None, "finish_reason": c.finish}
                         for k, c in enumerate(run.choices)], usage=True)

    return r


class Completion:
    def __init__(self, service, job: Job, head: str):
        self.job, self.head = job, head
        cfg = job.configs[head]
        self.n = cfg.num_return_sequences
        self.choices = [Choice(service.tokenizer, cfg) for _ in range(len(job.prompts) * self.n)]
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    async def events(self, call: Call):
        """(choice index, new text) as it comes; a choice whose finish is set has ended."""
        async for kind, payload in call:
            if kind == "tokens":
                for i, _, r, tok in payload:
                    yield i * self.n + r, self.choices[i * self.n + r].push(tok)
            elif kind == "result":
                i, res = payload
                for r, ids in enumerate(res.tokens.get(self.head, [])):
                    yield i * self.n + r, self.choices[i * self.n + r].end(ids)
            elif kind == "error":
                raise engine_error(*payload)

    async def chunks(self, call: Call):
        reported = set()
        try:
            async for k, text in self.events(call):
                c = self.choices[k]
                if text:
                    yield sse(self.body([{"text": text, "index": k, "logprobs": None, "finish_reason": None}]))
                if c.finish and k not in reported:
                    reported.add(k)
                    yield sse(self.body([{"text": "", "index": k, "logprobs": None, "finish_reason": c.finish}]))
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield sse(e.body())
        finally:
            await call.__aexit__(None, None, None)

    def body(self, choices: list[dict], usage: bool = False) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.head,
               "choices": choices}
        if usage:
            prompt = sum(len(p) for p in self.job.prompts)
            new = sum(c.tokens for c in self.choices)
            out["usage"] = {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}
        return out
