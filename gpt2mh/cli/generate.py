"""`gpt2mh generate`: every head's output for each input (plain, --json, --stream)."""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from .args import (
    UsageError,
    given_controls,
    head_list,
    load_model_and_tokenizer,
    number_arg,
    one_setting_each,
    parse_head_controls,
    read_text_inputs,
    seed_arg,
    stream_refusal,
)


slots_arg = number_arg(int, 1, "need at least 1 stream slot")


def read_inputs(args) -> list[str]:
    if args.text and args.file:
        raise UsageError(f"got TEXT arguments and --file {args.file}: give the inputs one way (the other would be "
                         f"ignored)")
    if args.text:
        return list(args.text)
    if args.file:
        path = Path(args.file)
        if path.is_dir():
            raise UsageError(f"--file {path}: is a folder; expected a UTF-8 text file with one input per line")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such input file")
    lines = read_text_inputs(args.file)
    texts = [line for _, line in lines]
    if not texts:
        raise UsageError("no input text: give TEXT arguments, --file FILE or lines on stdin")
    return texts


def cmd_generate(args) -> None:
    from ..inference.controls import SamplingConfig
    from ..inference.generate import generate_rows, stream
    from ..inputs import encode_prompts
    from .datajob import run_file_job

    model, tok = load_model_and_tokenizer(args.model, args.device, args.revision)
    heads = head_list(args.heads)
    names = [model.head_names[i] for i in model.head_index(heads)]
    controls = given_controls(SamplingConfig.from_string(args.controls), args.controls) if args.controls else {}
    if args.stream and args.json:
        raise UsageError("--stream prints text as it is produced, --json whole outputs as JSON lines: "
                         "give one of them")
    controls = one_setting_each(controls, args.max_new_tokens)  # 0 and negatives too: refused by name, never ignored
    kwargs = dict(per_head=parse_head_controls(args.head, names), compile=args.compile, seed=args.seed, **controls)
    if args.output:
        if args.stream or args.json or args.text:
            raise UsageError("--output writes JSON lines of --file (or stdin) to a file: leave out "
                             + ", ".join(f for f, on in (("--stream", args.stream), ("--json", args.json),
                                                         ("TEXT arguments", args.text)) if on))
        run_file_job(args, model, tok, heads, kwargs)
        return
    if args.resume or args.overwrite:
        raise UsageError(f"{'--resume' if args.resume else '--overwrite'} goes with --output OUT.jsonl")
    texts = read_inputs(args)
    if args.stream:
        stream_refusal(controls, kwargs["per_head"])
        print_stream(stream(model, tok, *encode_prompts(tok, texts, model), heads, **kwargs), texts, names)
        return
    encode_prompts(tok, texts, model)  # an input too long for the context is refused before any work
    ready, nxt = {}, 0
    rows = generate_rows(model, tok, texts, heads, slots=args.slots, usage=True, **kwargs)
    for i, out, used in rows:  # printed in input order
        if isinstance(out, str):
            raise ValueError(f"input {i}: {out}")
        ready[i] = out, used.get("logprobs")
        while nxt in ready:
            print_row(texts[nxt], *ready.pop(nxt), names, args.json)
            nxt += 1


def print_row(text: str, out: dict, logprobs: dict | None, names: list[str], as_json: bool) -> None:
    if as_json:  # a choices head's answer comes with its log-probability
        print(json.dumps({"input": text, **{h: out[h] for h in names}, **({"logprobs": logprobs} if logprobs else {})},
                         ensure_ascii=False), flush=True)
        return
    print(text)
    for h in names:
        print(f"  {h:>{max(map(len, names))}}: {out[h]}", flush=True)


def print_stream(pieces, texts: list[str], names: list[str]) -> None:
    """--stream in the layout of the plain output (each input, then one line per head). The first
    output streams live; the others are held back and follow in order, so no line is ever interleaved
    with another: with several heads or inputs the rest appears when generation ends."""
    width = max(map(len, names))
    order = [(row, h) for row in range(len(texts)) for h in names]
    got = {key: "" for key in order}
    live = 0  # the (row, head) being printed live

    def start(k: int) -> None:
        row, h = order[k]
        if h == names[0]:
            print(texts[row])
        print(f"  {h:>{width}}: ", end="")

    pieces = iter(pieces)
    first = next(pieces, None)  # settings are checked when generation starts: no header before that
    start(0)
    for head, row, piece in itertools.chain([first] if first else [], pieces):
        got[row, head] += piece
        if (row, head) == order[live]:
            print(piece, end="", flush=True)
    print(flush=True)
    for k in range(live + 1, len(order)):
        start(k)
        print(got[order[k]], flush=True)


def add_parsers(add) -> None:
    s = add("generate", help="every head's output for each input text")
    s.add_argument("text", nargs="*", help="input text(s); else --file or stdin")
    s.add_argument("--model", help="checkpoint folder, training output folder or hub id (default: runs/quickstart)")
    s.add_argument("--revision")
    s.add_argument("--file", help="one input per line, or (.jsonl) {\"input\": ..., \"heads\": [...]} per line")
    s.add_argument("--heads", help="comma-separated subset of heads")
    s.add_argument("--controls", help="controls for all heads, transformers' names: do_sample, temperature, top_k, "
                   "top_p, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, bad_words_ids, "
                   "min_new_tokens, max_new_tokens, num_return_sequences, num_beams, length_penalty, "
                   "early_stopping (true/false/never), stop_strings, choices; lists separated by '|'. "
                   "E.g. do_sample=true,temperature=1.5,top_p=0.95 or num_beams=4,length_penalty=0.5")
    s.add_argument("--head", action="append", metavar="NAME:KEY=VALUE,...",
                   help="controls for one head, e.g. tense:choices=過去|現在 (the head answers the choice it scores "
                        "highest; --json and --output add its log-prob) or pos:stop_strings=。")
    s.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    s.add_argument("--seed", type=seed_arg)
    s.add_argument("--json", action="store_true", help="one JSON object per input (JSONL)")
    s.add_argument("--stream", action="store_true", help="print text as it is produced")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step (pays off for long or repeated runs)")
    s.add_argument("--output", metavar="OUT.jsonl",
                   help="write each row of --file (or stdin) to OUT as soon as it is done, with its line number; "
                        "bad rows get an error and the run goes on (exit code 3)")
    s.add_argument("--resume", action="store_true", help="with --output: continue a stopped run, skipping rows in OUT")
    s.add_argument("--overwrite", action="store_true", help="with --output: start over when OUT exists")
    s.add_argument("--slots", type=slots_arg, default=None,
                   help="streams decoded at once, all heads together (default: 64 on CPU, 256 on CUDA); "
                        "memory grows with it, not with the number of inputs")
    s.add_argument("--device")
    s.set_defaults(func=cmd_generate)
