"""Request bodies -> what the engine runs, checked by the library's own code; errors as HTTP errors.

Every error body is `{"error": {"message", "type", "param"}}` (OpenAI's shape): 400 for a request the
server will not run (malformed JSON, unknown head, input longer than the context, a limit), 422 for a
control value the library refuses (its own message, naming the control), 413 for a body too large."""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, fields

from .._checks import as_seed
from ..inference.controls import SamplingConfig
from ..inference.request import call_configs, call_seed, check_room, hf_aliases
from ..inputs import encode_input, encode_target

CONTROLS = [f.name for f in fields(SamplingConfig)]


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param}}


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int  # --max-new-tokens-limit
    max_n: int           # num_return_sequences / n / choices at most (the engine's members per input)
    max_beams: int = 1   # --max-beams: num_beams at most (1: no beam search)


@dataclass
class Job:
    """What one HTTP request asks the engine for: inputs, one config per head, the noise seed."""
    texts: list[str]
    prompts: list[list[int]]
    configs: dict[str, SamplingConfig]
    seed: int
    stream: bool


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def check_keys(body: dict, allowed) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(422, f"unknown field(s) {unknown}; this endpoint takes {sorted(allowed)}", param=unknown[0])


def strings(value, field: str, one_ok: bool = True) -> list[str]:
    if one_ok and isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{field} must be {'a string or ' if one_ok else ''}a non-empty list of strings",
                       param=field)
    return value


def head_names(model, heads, field: str = "heads") -> list[str] | None:
    if heads is None:
        return None
    names = strings(heads, field)
    unknown = [h for h in names if h not in model.head_names]
    if unknown:
        raise ApiError(400, f"unknown head(s) {unknown}; this model's heads are {list(model.head_names)}",
                       param=field)
    if len(set(names)) < len(names):
        raise ApiError(400, f"{field}={names}: name each head once", param=field)
    return names


def configs(model, heads, controls: dict, per_head, limits: Limits, field: dict | None = None) -> dict:
    """{head: SamplingConfig}, validated by the library (`request.call_configs`); a refused value is a
    422 naming the control (as `field` renames it: {"num_return_sequences": "n"} for completions)."""
    field = field or {}
    if per_head is not None and not isinstance(per_head, dict):
        raise ApiError(422, "per_head must map head names to controls, e.g. {\"tense\": {\"max_new_tokens\": 4}}",
                       param="per_head")
    for h, spec in (per_head or {}).items():
        if h not in model.head_names:
            raise ApiError(400, f"per_head names unknown head {h!r}; this model's heads are {list(model.head_names)}",
                           param="per_head")
        if not isinstance(spec, dict):
            raise ApiError(422, f"per_head[{h!r}] must be an object of controls", param=f"per_head.{h}")
        bad = sorted(set(spec) - set(CONTROLS))
        if bad:
            raise ApiError(422, f"per_head[{h!r}]: unknown control(s) {bad}; controls are {CONTROLS}",
                           param=f"per_head.{h}.{bad[0]}")
    try:
        names, cfgs = call_configs(model, heads, hf_aliases(controls, [[0]]), per_head)
    except (ValueError, TypeError, KeyError) as e:
        message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        raise ApiError(422, message, param=_param(message, per_head, field)) from None
    out = dict(zip(names, cfgs))
    for h, c in out.items():
        for key, limit, flag in (("max_new_tokens", limits.max_new_tokens, "--max-new-tokens-limit"),
                                 ("num_return_sequences", limits.max_n, "--max-n"),
                                 ("num_beams", limits.max_beams, "--max-beams")):
            if getattr(c, key) > limit:
                name = field.get(key, key)
                raise ApiError(400, f"{name}={getattr(c, key)} (head {h!r}) is above this server's limit {limit} "
                               f"({flag})", param=_where(key, h, per_head, field))
        if len(c.choices) > limits.max_n:
            raise ApiError(400, f"{len(c.choices)} choices (head {h!r}) are above this server's limit {limits.max_n} "
                           f"(--max-n: each choice is scored in a slot)", param=_where("choices", h, per_head, field))
    return out


def _param(message: str, per_head, field: dict) -> str | None:
    m = re.search(r"\b([a-z_]+)=", message)
    if not m or m.group(1) not in CONTROLS:
        return None
    for h in re.findall(r"head '([^']+)'", message):
        return _where(m.group(1), h, per_head, field)
    return _where(m.group(1), None, per_head, field)


def _where(key: str, head, per_head, field: dict) -> str:
    """The body field that set `key`: per_head.HEAD.key when that head's own controls did."""
    for h, spec in (per_head or {}).items():
        if key in spec and (head is None or h == head):
            return f"per_head.{h}.{key}"
    return field.get(key, key)


def prompts(model, tokenizer, texts: list[str], cfgs: dict, field: str, max_field: str) -> list[list[int]]:
    """Each input's prompt ids; one longer than the context, or too long for max_new_tokens, is a 400."""
    out = []
    n = model.config.n_positions
    for i, text in enumerate(texts):
        ids = encode_input(tokenizer, text)
        if len(ids) >= n:
            raise ApiError(400, f"{field}[{i}] is {len(ids)} tokens long; the model's context is n_positions={n} "
                           f"tokens, the output included: shorten the input", param=field)
        try:
            check_room(model, len(ids), list(cfgs.values()))
        except ValueError as e:
            raise ApiError(400, f"{field}[{i}]: {e}", param=max_field) from None
        out.append(ids)
    return out


def seed_of(value, device) -> int:
    """The engine's noise key: from the request's seed as `generate_text(seed=...)` draws it, so a
    seeded request gives what the library gives; no seed: a fresh random one."""
    if value is None:
        return secrets.randbelow(2**32)
    try:
        return call_seed(as_seed(value), None, device)
    except (TypeError, ValueError) as e:
        raise ApiError(422, str(e), param="seed") from None


GENERATE_KEYS = {"inputs", "heads", "per_head", "seed", "stream", *CONTROLS}


def generate_job(body: dict, model, tokenizer, limits: Limits) -> Job:
    """POST /v1/generate: {"inputs", "heads"?, HF-named controls, "per_head"?, "seed"?, "stream"?}."""
    check_keys(body, GENERATE_KEYS)
    if "inputs" not in body:
        raise ApiError(400, "missing field 'inputs' (a string or a list of strings)", param="inputs")
    texts = strings(body["inputs"], "inputs")
    heads = head_names(model, body.get("heads"))
    controls = {k: body[k] for k in CONTROLS if k in body}
    cfgs = configs(model, heads, controls, body.get("per_head"), limits)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(422, f"stream={stream!r} must be true or false", param="stream")
    return Job(texts, prompts(model, tokenizer, texts, cfgs, "inputs", "max_new_tokens"), cfgs,
               seed_of(body.get("seed"), model.device), stream)


def score_job(body: dict, model, tokenizer) -> tuple[list[str], list[str], list[str] | None]:
    """POST /v1/score: {"inputs": [...], "continuations": [...], "heads"?}: one continuation per input."""
    check_keys(body, {"inputs", "continuations", "heads"})
    for key in ("inputs", "continuations"):
        if key not in body:
            raise ApiError(400, f"missing field {key!r} (a string or a list of strings)", param=key)
    inputs, conts = strings(body["inputs"], "inputs"), strings(body["continuations"], "continuations")
    if len(inputs) != len(conts):
        raise ApiError(400, f"{len(inputs)} inputs but {len(conts)} continuations: give one per input",
                       param="continuations")
    n = model.config.n_positions  # scored as one batch: the longest input + the longest continuation
    width = max(len(encode_input(tokenizer, a)) for a in inputs) + max(len(encode_target(tokenizer, b)) for b in conts)
    if width > n:
        raise ApiError(400, f"the longest input + the longest continuation = {width} tokens exceeds the model's "
                       f"context n_positions={n}; send long pairs in requests of their own", param="inputs")
    return inputs, conts, head_names(model, body.get("heads"))
