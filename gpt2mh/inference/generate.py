"""The public generation entry points: `generate` (ids in, ids out), `generate_text` (strings in and
out) and `stream` (text as it is produced). Each sets up a call (`request`), runs the decode loop
(`decode`) and shapes its output."""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch

from ..inputs import check_vocab, encode_prompts
from ..model import GPT2
from .controls import SamplingConfig
from .decode import DecodeState, decode_loop
from .request import Streams, hf_aliases, make_generator, prepare, use_compile


@contextlib.contextmanager
def decoding(model: GPT2, input_ids, attention_mask, heads, per_head, compile, seed, generator,
             controls) -> Iterator[tuple[Streams, Iterator[DecodeState]]]:
    """Set-up and tear-down shared by generate and stream: eval mode, the KV cache, the generator.

    A compiled call keeps its cache buffers for the next call (CUDA graphs replay on fixed
    addresses; a new cache would re-record them); `model.clear_cache()` frees them."""
    controls = hf_aliases(controls, input_ids)
    compile = use_compile(compile, model)
    st, input_ids, attention_mask = prepare(model, input_ids, attention_mask, heads, controls, per_head, compile)
    gen = make_generator(seed, generator, model.device)
    was_training = model.training
    model.eval()
    try:
        yield st, decode_loop(model, st, input_ids, attention_mask, compile, gen)
    finally:
        if not compile:
            model.clear_cache()
        model.train(was_training)


def generate(model: GPT2, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             heads: Sequence[str] | None = None, *, per_head: Mapping | None = None, compile: bool | None = None,
             seed: int | None = None, generator: torch.Generator | None = None,
             **controls) -> dict[str, torch.Tensor]:
    """Continue each (left-padded) prompt with every selected head; see `gpt2mh.GPT2.generate`."""
    with decoding(model, input_ids, attention_mask, heads, per_head, compile, seed, generator, controls) as (st, loop):
        max_new = max(c.max_new_tokens for c in st.configs)
        tokens = torch.empty(st.S, max_new, dtype=torch.long, device=model.device)
        n = 0
        for state in loop:
            tokens[:, n].copy_(state.tok)  # a copy: the next replay overwrites state.tok
            n += 1
    tokens = tokens[:, :n]  # (S, steps)
    out = {}
    for k, name in enumerate(st.head_names):
        rows = tokens[st.rows(k).to(tokens.device)][:, : st.configs[k].max_new_tokens]
        out[name] = trim_finished(rows, st.configs[k])
    return out


def trim_finished(rows: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Drop trailing columns where every row is already finished (HF stops once all rows are done)."""
    eos = torch.tensor(cfg.eos_token_id, device=rows.device)
    hit = torch.isin(rows, eos).long()
    finished_before = (hit.cumsum(1) - hit) > 0  # (rows, steps): an EOS came strictly earlier
    live = (~finished_before).any(0).nonzero()
    return rows[:, : int(live[-1]) + 1] if len(live) else rows[:, :0]


# ---- streaming --------------------------------------------------------------------------------
def stream(model: GPT2, tokenizer, input_ids, attention_mask=None, heads=None, *, per_head=None,
           compile: bool | None = None, seed=None, generator=None, **controls) -> Iterator[tuple[str, int, str]]:
    """Yields (head, row, new_text) as each head's text grows (one host sync per step).

    Flush rule: a row's text is re-decoded each step and everything that is stable is emitted —
    every complete character at once, Japanese included (no waiting for a space or a kanji as
    transformers' TextStreamer does); only a trailing U+FFFD or a partial whitespace run waits."""
    check_vocab(tokenizer, model)  # as generate_text and score_text: ids of another vocabulary are nonsense
    with decoding(model, input_ids, attention_mask, heads, per_head, compile, seed, generator, controls) as (st, loop):
        rows = [(st.head_names[n], j, s, st.configs[n]) for n in range(st.N) for j, s in enumerate(st.rows(n).tolist())]
        ids = {(name, j): [] for name, j, _, _ in rows}
        sent = {key: "" for key in ids}
        done = set()
        for state in loop:
            tok = state.tok.tolist()  # read before the next step (one sync)
            for name, j, s, cfg in rows:
                key = (name, j)
                if key in done or len(ids[key]) >= cfg.max_new_tokens:
                    continue
                if tok[s] in cfg.eos_token_id:
                    done.add(key)
                else:
                    ids[key].append(tok[s])
                text = tokenizer.decode(ids[key])
                stable = (text if key in done else text.rstrip()).rstrip("\ufffd")
                if stable.startswith(sent[key]) and len(stable) > len(sent[key]):
                    yield name, j, stable[len(sent[key]):]
                    sent[key] = stable


# ---- text in, text out ------------------------------------------------------------------------
def generate_text(model: GPT2, tokenizer, texts: str | Sequence[str], heads=None,
                  **kwargs) -> dict[str, list[str]] | dict[str, list[list[str]]]:
    """Strings in, per head the decoded strings out (a list per input when num_return_sequences > 1)."""
    single = isinstance(texts, str)
    input_ids, mask = encode_prompts(tokenizer, [texts] if single else list(texts), model)
    out = generate(model, input_ids, mask, heads, **kwargs)
    result = {}
    for name, rows in out.items():
        decoded = [tokenizer.decode(strip_after_eos(r.tolist(), tokenizer)) for r in rows]
        R = len(decoded) // input_ids.size(0)
        result[name] = decoded if R == 1 else [decoded[i * R:(i + 1) * R] for i in range(input_ids.size(0))]
    return result


def strip_after_eos(ids: list[int], tokenizer) -> list[int]:
    return ids[: ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids
