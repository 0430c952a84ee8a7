"""`gpt2mh serve`: the model over HTTP, every request sharing one engine (see gpt2mh/serve/)."""
from __future__ import annotations

import argparse
import os

from .args import UsageError, at_least, load_model_and_tokenizer, number_arg
from .generate import slots_arg


seconds_arg = number_arg(float, 0, "must be >= 0")


def head_slots(spec: str, heads: list[str], max_n: int) -> dict[str, int]:
    """--head-slots tense=4,entities=16,pos=40 -> {head: slots}, every head named once."""
    out = {}
    for item in spec.split(","):
        name, _, n = item.partition("=")
        if not n.strip().isdigit() or name.strip() not in heads or name.strip() in out:
            raise UsageError(f"--head-slots {spec!r}: expected HEAD=N for each of the heads {heads} once, "
                             f"e.g. {','.join(f'{h}=16' for h in heads)}")
        out[name.strip()] = int(n)
    if set(out) != set(heads) or min(out.values()) < max_n:
        raise UsageError(f"--head-slots {spec!r}: give each of the heads {heads} at least --max-n {max_n} slots")
    return out


def cmd_serve(args) -> None:
    try:
        from ..serve.app import Settings
        from ..serve.schemas import Limits
        from ..serve.server import serve
    except ImportError as e:
        raise UsageError(f"gpt2mh serve needs the serve extra ({e.name} is missing): "
                         f"pip install -e \".[serve]\"") from None
    at_least("--port", args.port, 0)
    at_least("--max-queue", args.max_queue, 1)
    at_least("--max-body-bytes", args.max_body_bytes, 64)
    at_least("--max-new-tokens-limit", args.max_new_tokens_limit, 1)
    at_least("--max-n", args.max_n, 1)
    at_least("--max-beams", args.max_beams, 1)
    key = args.api_key if args.api_key is not None else os.environ.get("GPT2MH_API_KEY") or None
    model, tok = load_model_and_tokenizer(args.model, args.device, args.revision)
    if args.int8:
        model.quantize("int8")
    settings = Settings(max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                        request_timeout=args.request_timeout, drain_timeout=args.drain_timeout, api_key=key,
                        limits=Limits(max_new_tokens=args.max_new_tokens_limit, max_n=args.max_n,
                                      max_beams=args.max_beams))
    slots = head_slots(args.head_slots, list(model.head_names), args.max_n) if args.head_slots else \
        args.slots or (256 if model.device.type == "cuda" else 64)
    serve(model, tok, host=args.host, port=args.port, slots=slots, prompt_rows=args.prompt_rows, compile=args.compile,
          settings=settings)


def add_parsers(add) -> None:
    s = add("serve", help="an HTTP server: every request shares one engine's slots")
    s.add_argument("--model", help="checkpoint folder, training output folder or hub id (default: runs/quickstart)")
    s.add_argument("--revision")
    s.add_argument("--device")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=slots_arg, default=None,
                   help="streams decoded at once, all requests and heads together (default: 64 on CPU, 256 on CUDA; "
                        "at least heads x --max-n)")
    s.add_argument("--head-slots", dest="head_slots", metavar="HEAD=N,...",
                   help="slots per head instead of --slots split equally: more for heads with long outputs, "
                        "e.g. tense=4,entities=16,pos=40")
    s.add_argument("--prompt-rows", dest="prompt_rows", type=slots_arg, default=None,
                   help="inputs decoded at once (default: the largest head's slots); each costs attention work every step")
    s.add_argument("--max-queue", dest="max_queue", type=int, default=256,
                   help="inputs waiting for a slot at most; more: 429 with Retry-After (default: 256)")
    s.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413 (default: 1 MiB)")
    s.add_argument("--request-timeout", dest="request_timeout", type=seconds_arg, default=300.0,
                   help="seconds a request may run; then 504 and its slots are freed (0: no limit; default: 300)")
    s.add_argument("--drain-timeout", dest="drain_timeout", type=seconds_arg, default=30.0,
                   help="on SIGTERM/SIGINT: seconds for the requests in flight to finish before the exit (default: 30)")
    s.add_argument("--api-key", dest="api_key",
                   help="require Authorization: Bearer KEY on every endpoint but /health (default: $GPT2MH_API_KEY)")
    s.add_argument("--max-new-tokens-limit", dest="max_new_tokens_limit", type=int, default=512,
                   help="largest max_new_tokens a request may ask for (default: 512)")
    s.add_argument("--max-n", dest="max_n", type=int, default=4,
                   help="largest num_return_sequences (n) a request may ask for (default: 4)")
    s.add_argument("--max-beams", dest="max_beams", type=int, default=1,
                   help="largest num_beams a request may ask for (default: 1, no beam search; with K > 1 every "
                        "input takes a block of K slots in each head, so the slots hold K times fewer inputs)")
    s.add_argument("--int8", action="store_true", help="int8 weights (CPU inference)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step")
    s.set_defaults(func=cmd_serve)
