"""The public generation entry points, all on the data-set engine (`gpt2mh.inference.engine`):

    generate(model, input_ids, ...)           ids in, {head: (B * R, new) ids} out
    generate_text(model, tok, texts, ...)     strings in, {head: [text]} out, in input order
    generate_rows(model, tok, texts, ...)     any iterable of strings in, (index, {head: text}) out as
                                              each input finishes: bounded memory for any count
    stream(model, tok, input_ids, ...)        (head, row, new text) as tokens are produced

Each builds one SamplingConfig per head (`request`), an engine sized for the call, and shapes what
the engine returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from ..inputs import check_vocab, encode_input, encode_prompts, prompt_batch
from ..model import GPT2
from .engine import Request, Result
from .flush import TextFlush, cut_stop
from .request import (
    call_configs,
    call_seed,
    check_room,
    hf_aliases,
    make_engine,
    use_compile,
)


def _requests(prompts: Iterable, names, configs, seed: int) -> Iterator[Request]:
    """Prompts, (key, prompt) pairs — the key names the input in results and in its sampling noise — or
    (key, prompt, heads) triples: that input wants only those heads (a head not generated here is an
    error of that input only)."""
    by_head = dict(zip(names, configs))
    for i, item in enumerate(prompts):
        key, ids, want = (item + (None,) if len(item) == 2 else item) if isinstance(item, tuple) else (i, item, None)
        yield Request(key, ids, by_head if want is None else {h: by_head.get(h) for h in want}, seed, key)


def _prompts(model: GPT2, input_ids, attention_mask) -> list[list[int]]:
    # Lists, numpy, BatchEncoding, right or left padding -> each row's real ids.
    ids, mask = prompt_batch(input_ids, attention_mask, model.config.vocab_size)
    if ids.size(1) == 0:  # an empty prompt starts from <s>, as HF does
        return [[model.config.bos_token_id] for _ in range(ids.size(0))]
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _setup(model: GPT2, prompts: list[list[int]], heads, per_head, compile, seed, generator, slots, controls,
           tokenizer=None):
    compile = use_compile(compile, model)
    names, configs = call_configs(model, heads, controls, per_head)
    width = max(len(p) for p in prompts)
    check_room(model, width, configs)
    if tokenizer is None and any(c.stop_strings or c.choices for c in configs):
        raise ValueError("stop_strings and choices: pass tokenizer= too (stop strings are matched in the decoded "
                         "text, as transformers' generate(stop_strings=..., tokenizer=...) does; choices are encoded)")
    engine = make_engine(model, names, configs, len(prompts), width, compile, slots, tokenizer)
    return names, configs, engine, _requests(prompts, names, configs, call_seed(seed, generator, model.device))


def _raise(result: Result) -> None:
    if result.error:
        raise ValueError(f"input {result.key}: {result.error}")


@dataclass
class GenerateOutput:
    """One head's output with return_dict_in_generate=True (rows as in `generate`)."""
    sequences: torch.Tensor                         # (B * R, new) long
    transition_scores: torch.Tensor | None = None   # (B * R, new) f32 with output_scores: each token's log-prob, 0 at pad
    sequences_scores: torch.Tensor | None = None    # (B * R,) f32 with output_scores and num_beams > 1


def generate(model: GPT2, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             heads: Sequence[str] | None = None, *, per_head: Mapping | None = None, compile: bool | None = None,
             seed: int | None = None, generator: torch.Generator | None = None, slots: int | None = None,
             return_dict_in_generate: bool = False, tokenizer=None,
             **controls) -> dict[str, torch.Tensor | GenerateOutput]:
    """Continue each prompt with every selected head; see `gpt2mh.MultiHeadGPT2.generate`.

    Returns {head: LongTensor (B * num_return_sequences, new_tokens)}: prompt-major rows (HF's order),
    each stream's tokens (its EOS included), then pad, as wide as the longest stream. With
    return_dict_in_generate=True, {head: GenerateOutput} (a choices head: its answer's log-probability in
    sequences_scores): with output_scores=True also each token's
    log-probability after the processors (what transformers' `compute_transition_scores` gives:
    normalize_logits=True for greedy and sampling, the beam search's own scores with beams) and, for
    beam search, each returned hypothesis' length-penalised score (HF's `sequences_scores`).
    stop_strings need `tokenizer` (as in transformers); the ids keep the tokens that complete one."""
    if not isinstance(return_dict_in_generate, bool):
        raise ValueError(f"return_dict_in_generate={return_dict_in_generate!r} must be True or False")
    controls = hf_aliases(controls, input_ids)
    prompts = _prompts(model, input_ids, attention_mask)
    names, configs, engine, requests = _setup(model, prompts, heads, per_head, compile, seed, generator, slots,
                                              controls, tokenizer)
    results = {}
    for r in engine.run(requests):
        _raise(r)
        results[r.key] = r
    out = {}
    for name, cfg in zip(names, configs):
        rows = [ids for b in range(len(prompts)) for ids in results[b].tokens[name]]
        width = max(len(ids) for ids in rows)
        seq = torch.tensor([ids + [cfg.pad_token_id] * (width - len(ids)) for ids in rows], dtype=torch.long,
                           device=model.device).view(len(rows), width)
        if not return_dict_in_generate:
            out[name] = seq
            continue
        out[name] = GenerateOutput(seq)
        if cfg.choices:  # the answer's log-probability (its ids, </s> included)
            out[name].sequences_scores = torch.tensor([results[b].choice[name][1] for b in range(len(prompts))],
                                                      device=model.device)
        if cfg.output_scores:
            lp = [x for b in range(len(prompts)) for x in results[b].scores[name]]
            out[name].transition_scores = torch.tensor([x + [0.0] * (width - len(x)) for x in lp],
                                                       device=model.device).view(len(rows), width)
            if cfg.num_beams > 1 and not cfg.choices:
                out[name].sequences_scores = torch.tensor(
                    [x for b in range(len(prompts)) for x in results[b].sequence_scores[name]], device=model.device)
    return out


# ---- streaming --------------------------------------------------------------------------------
def stream(model: GPT2, tokenizer, input_ids, attention_mask=None, heads=None, *, per_head=None,
           compile: bool | None = None, seed=None, generator=None, slots: int | None = None,
           **controls) -> Iterator[tuple[str, int, str]]:
    """Yields (head, row, new_text) as each head's text grows; row = b * R + r as in `generate`.

    Flush rule (`gpt2mh.inference.flush`): a row's text is re-decoded each step and everything that is
    stable is emitted — every complete character at once, Japanese included (no waiting for a space or
    a kanji as transformers' TextStreamer does); only a trailing U+FFFD or a partial whitespace run
    waits, and with stop_strings a tail that may still become one (the stop string itself is never sent)."""
    check_vocab(tokenizer, model)  # as generate_text and score_text: ids of another vocabulary are nonsense
    controls = hf_aliases(controls, input_ids)
    prompts = _prompts(model, input_ids, attention_mask)
    names, configs, engine, requests = _setup(model, prompts, heads, per_head, compile, seed, generator, slots,
                                              controls, tokenizer)
    searching = [n for n, c in zip(names, configs) if c.num_beams > 1]
    if searching:  # as transformers' streamers: a beam's tokens are not final until the search ends
        raise ValueError(f"stream: head(s) {searching} search with num_beams > 1, whose text is only known when "
                         f"the search ends; use generate_text (or num_beams=1 to stream)")
    cfg = dict(zip(names, configs))
    order = {name: n for n, name in enumerate(names)}
    flush: dict[tuple[str, int], TextFlush] = {}
    for event in engine.events(requests):
        if isinstance(event, Result):
            _raise(event)
            for name, (best, _) in event.choice.items():  # a choices head answers when all are scored
                yield name, event.key, cfg[name].choices[best]
            continue
        items = sorted(event.items, key=lambda e: (order[e[1]], e[0], e[2]))
        for b, name, r, tok in items:
            key = (name, b * cfg[name].num_return_sequences + r)
            if key not in flush:
                c = cfg[name]
                flush[key] = TextFlush(tokenizer, c.eos_token_id, c.max_new_tokens, c.stop_strings)
            new = flush[key].push(tok)
            if new:
                yield name, key[1], new


# ---- text in, text out ------------------------------------------------------------------------
def generate_rows(model: GPT2, tokenizer, texts: Iterable[str], heads=None, *, per_head=None,
                  compile: bool | None = None, seed=None, generator=None, slots: int | None = None,
                  usage: bool = False, **controls) -> Iterator[tuple]:
    """Any number of strings in, read only as stream slots free up (or (key, string) pairs: the key,
    an int, is returned instead of the position and seeds the row's sampling, so a row samples the
    same wherever it is in the input; or (key, string, heads) for a row that wants only some of the
    heads); yields (index, {head: text}) in completion order — {head: [texts]} with num_return_sequences > 1 — or (index, error message)
    for an input that cannot be generated (longer than the context), and goes on with the others.
    usage=True: (index, outputs, {"prompt_tokens": n, head: new tokens}) triples (with choices heads also
    "logprobs": {head: the answer's log-probability}).
    Memory is bounded by `slots` (default: DEFAULT_SLOTS for the device), whatever the count."""
    check_vocab(tokenizer, model)
    if controls.get("max_length") is not None:
        raise ValueError("max_length counts the prompt, whose length differs from input to input: "
                         "give max_new_tokens instead")
    n = len(texts) if isinstance(texts, Sequence) and not isinstance(texts, str) else None
    prompts = ((t[0], encode_input(tokenizer, t[1]), *t[2:]) if isinstance(t, tuple) else encode_input(tokenizer, t)
               for t in texts)
    rows = _text_rows(model, tokenizer, prompts, n, 64, heads, per_head, compile, seed, generator, slots, controls)
    yield from rows if usage else ((i, out) for i, out, _ in rows)


def _text_rows(model, tokenizer, prompts, n, width, heads, per_head, compile, seed, generator, slots, controls):
    controls = hf_aliases(controls, [[0] * width])
    compile = use_compile(compile, model)
    names, configs = call_configs(model, heads, controls, per_head)
    engine = make_engine(model, names, configs, n, width, compile, slots, tokenizer)
    seed = call_seed(seed, generator, model.device)
    for r in engine.run(_requests(prompts, names, configs, seed)):
        if r.error:
            yield r.key, r.error, {}
            continue
        out, used = {}, {"prompt_tokens": r.prompt_tokens}
        for name, c in zip(names, configs):
            if name not in r.tokens:  # a row that did not ask for this head
                continue
            used[name] = sum(len(ids) for ids in r.tokens[name])
            out[name] = head_output(tokenizer, c, r, name)
            if c.choices:
                used.setdefault("logprobs", {})[name] = r.choice[name][1]
        yield r.key, out, used


def generate_text(model: GPT2, tokenizer, texts: str | Sequence[str], heads=None, *, per_head=None,
                  compile: bool | None = None, seed=None, generator=None, slots: int | None = None,
                  **controls) -> dict[str, list[str]] | dict[str, list[list[str]]]:
    """Strings in, per head the decoded strings out, in input order (a list per input when
    num_return_sequences > 1). For a stream of inputs with results as they finish: generate_rows."""
    single = isinstance(texts, str)
    input_ids, mask = encode_prompts(tokenizer, [texts] if single else list(texts), model)
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
    rows = {}
    for i, out, _ in _text_rows(model, tokenizer, prompts, len(prompts), input_ids.size(1), heads, per_head,
                                compile, seed, generator, slots, controls):
        if isinstance(out, str):
            raise ValueError(f"input {i}: {out}")
        rows[i] = out
    return {name: [rows[i][name] for i in range(len(prompts))] for name in rows[0]}


def head_output(tokenizer, cfg, result: Result, head: str) -> str | list[str]:
    """One head's output in a Result as text: the chosen choice (its ids may not decode to the same
    string), or each stream's text (a list with num_return_sequences > 1)."""
    if cfg.choices:
        return cfg.choices[result.choice[head][0]]
    texts = [text_of(tokenizer, ids, cfg.stop_strings) for ids in result.tokens[head]]
    return texts if cfg.num_return_sequences > 1 else texts[0]


def text_of(tokenizer, ids: list[int], stop_strings=()) -> str:
    """A stream's text: up to </s>, cut before its first stop string."""
    return cut_stop(tokenizer.decode(strip_after_eos(ids, tokenizer.eos_id)), stop_strings)


def strip_after_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
