"""Multi-head generation: prefill the prompts once, then one decode step per token for all streams.

Streams are laid out head-major: stream s = n * (B * R) + b * R + r for head n, prompt b and
return sequence r, so the N heads' logits are one `bmm` of (N, B*R, C) by the fused (N, C, V)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from .model import MultiHeadGPT2
from .prompt import check_ids
from .sampling import SamplingConfig, build_controls, check_finite, process, sample

CHECK_EVERY = 8  # decode steps between host checks of "all streams finished" (one sync each)
LEN_BUCKET = 64  # cache length is rounded up to this, so new prompt lengths reuse the compiled step


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def bucket_batch(b: int) -> int:
    return 1 << (b - 1).bit_length()  # next power of two: 1, 2, 4, 8, ...


# ---- the decode step: the one compiled function -----------------------------------------------
def decode_one_token(model: MultiHeadGPT2, heads, tok, input_pos, pos_offset, slot_valid, history,
                     step, unfinished, noise, controls, plan):
    """One token for every stream. Shapes: tok, pos_offset, unfinished (S,); slot_valid, history
    (S, L); input_pos (1,) the cache slot of `tok`; step () tokens generated before `tok`+1."""
    S, L = history.shape
    N = heads.size(0)
    slots = torch.arange(L, device=tok.device)
    mask = (slot_valid & (slots <= input_pos))[:, None, None, :]  # (S, 1, 1, L)
    h = model.hidden(tok[:, None], (pos_offset + input_pos)[:, None], mask, input_pos)  # (S, 1, C)
    logits = heads_matmul(h.view(N, S // N, -1), heads).view(S, -1).float()  # (S, V): all heads at once
    return next_token(logits, history, input_pos + 1, step, unfinished, noise, controls, plan)


def next_token(logits, history, cur_len, step, unfinished, noise, controls, plan):
    """Processing, sampling and end-of-stream bookkeeping, shared by the first token (from the
    prefill) and every decode step. cur_len (1,): tokens in history; the new one goes to that slot."""
    scores = process(logits, history, cur_len[0], step, controls, plan)
    nxt = torch.where(unfinished, pick(scores, noise, controls), controls.pad)
    history = history.index_copy(1, cur_len, nxt[:, None])
    done = (nxt[:, None] == controls.eos).any(-1) | (step + 1 >= controls.max_new)
    return nxt, unfinished & ~done, history, bad_rows(logits, scores, unfinished)


NON_FINITE, NOTHING_LEFT = 1, 2  # bits of bad_rows


def bad_rows(logits, scores, unfinished):
    """(S,) long flags of live streams: NaN/+inf logits, or every token banned (argmax would emit a
    banned id). Checked on the host every CHECK_EVERY steps."""
    flags = check_finite(logits).long() | (scores.isneginf().all(-1).long() * NOTHING_LEFT)
    return flags * unfinished


def heads_matmul(h, heads):
    """(N, M, C) @ (N, C, V) -> (N, M, V). A baddbmm, not a bmm: on CPU, inductor lowers a bmm with
    M = 1 to an elementwise multiply-and-sum that runs ~3x slower than MKL's GEMV."""
    if not isinstance(heads, torch.Tensor):  # int8 heads (gpt2mh.quantize)
        return heads.matmul(h)
    return torch.baddbmm(h.new_zeros(()), h, heads, beta=0)


def pick(scores, noise, controls):
    # noise is None when no stream samples: plain argmax, no random numbers drawn.
    return scores.argmax(-1) if noise is None else sample(scores, noise, controls)


_compiled: dict[str, object] = {}


def compiled_decode_step(device_type: str):
    """The decode step compiled once per process and device type (fullgraph, static shapes).

    On CUDA it is captured as a CUDA graph ("reduce-overhead"). New shapes (batch bucket, cache
    bucket) or a new set of active processors compile one more graph, kept for later calls."""
    if device_type not in _compiled:
        # Each (model, shape bucket, processor plan) is one graph: allow more than the default 8.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        mode = "reduce-overhead" if device_type == "cuda" else None
        _compiled[device_type] = torch.compile(decode_one_token, fullgraph=True, dynamic=False, mode=mode)
    return _compiled[device_type]


# ---- requests ---------------------------------------------------------------------------------
@dataclass
class Streams:
    """Everything one generate call decodes with, built on the host before the loop."""
    head_names: list[str]
    heads: torch.Tensor            # (N, C, V) the selected heads
    configs: list[SamplingConfig]  # one per head
    B: int                         # real prompts
    Bp: int                        # prompts after bucketing (padding rows finish at once)
    R: int                         # return sequences per prompt (the max over heads)
    T: int                         # prompt length (left-padded)
    L: int                         # cache length

    @property
    def S(self) -> int:
        return len(self.head_names) * self.Bp * self.R

    def rows(self, n: int) -> torch.Tensor:
        """Stream ids of head n's real outputs, in HF's order (prompt-major, then return sequence)."""
        R_n = self.configs[n].num_return_sequences
        b, r = torch.meshgrid(torch.arange(self.B), torch.arange(R_n), indexing="ij")
        return (n * self.Bp * self.R + b * self.R + r).flatten()


def head_configs(model: MultiHeadGPT2, names: Sequence[str], controls: dict, per_head: Mapping | None,
                 eos_default: int, pad_default: int) -> list[SamplingConfig]:
    per_head = dict(per_head or {})
    unknown = [h for h in per_head if h not in names]
    if unknown:
        raise KeyError(f"per_head names {unknown} are not among the generated heads {list(names)}")
    out = []
    for name in names:
        spec = per_head.get(name, {})
        if isinstance(spec, SamplingConfig):
            cfg = spec
        else:
            try:
                cfg = SamplingConfig(**{**controls, **dict(spec)})
            except TypeError as e:
                raise TypeError(f"head {name!r}: {e}; valid controls are {list(SamplingConfig.__dataclass_fields__)}") from None
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else eos_default
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else pad_default
        cfg = cfg.replace(eos_token_id=eos, pad_token_id=pad)
        cfg.validate(model.config.vocab_size)
        out.append(cfg)
    return out


def use_compile(compile: bool | None, model: MultiHeadGPT2) -> bool:
    # Default: compile on CUDA (the step becomes one CUDA graph). On CPU compiling costs 10-100 s
    # for a ~15% faster step (same MKL calls either way): worth it only for long or repeated runs.
    if compile and model.quantized:
        raise ValueError(f"compile=True with a {model.quantized} model: its int8 kernels run eagerly only; "
                         f"pass compile=False (or model.quantize(None) for fp32)")
    return model.device.type == "cuda" if compile is None else bool(compile)


def prepare(model: MultiHeadGPT2, input_ids, attention_mask, heads, controls, per_head, compile: bool):
    check_ids(input_ids, model.config.vocab_size)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids must be (B, T) with an attention_mask of the same shape; got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    if input_ids.size(0) == 0:
        raise ValueError("input_ids holds no prompt (batch size 0)")
    cfg = model.config
    if input_ids.size(1) == 0:  # an empty prompt starts from <s>, as HF does
        input_ids = torch.full((input_ids.size(0), 1), cfg.bos_token_id, dtype=torch.long)
        attention_mask = torch.ones_like(input_ids)
    names = [model.head_names[i] for i in model.head_index(heads)]
    if not names or len(set(names)) < len(names):
        raise ValueError(f"heads={heads!r}: name each head to generate once (or heads=None for all "
                         f"of {list(model.head_names)})")
    idx = model.head_index(names)
    sel = model.head_weights(idx)  # (N, C, V), or their int8 form (model.quantize)
    pad_default = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    configs = head_configs(model, names, controls, per_head, cfg.eos_token_id, pad_default)
    B, T = input_ids.shape
    max_new = max(c.max_new_tokens for c in configs)
    if T + max_new > cfg.n_positions:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new} = {T + max_new} exceeds the "
                         f"model's context n_positions={cfg.n_positions}; shorten the prompt or max_new_tokens")
    Bp = bucket_batch(B) if compile else B
    L = min(round_up(T + max_new, LEN_BUCKET), cfg.n_positions) if compile else T + max_new
    R = max(c.num_return_sequences for c in configs)
    st = Streams(names, sel, configs, B, Bp, R, T, L)
    return st, input_ids.to(model.device), attention_mask.to(model.device)


# ---- the loop ---------------------------------------------------------------------------------
@torch.no_grad()
def prefill(model: MultiHeadGPT2, st: Streams, input_ids, attention_mask) -> torch.Tensor:
    """Run the B prompts once, fill the first B cache rows, fan them out to the S streams.

    Returns the last position's hidden state of every stream, (S, C)."""
    B, T = input_ids.shape
    dev = input_ids.device
    if st.Bp > B:  # bucket padding: copies of prompt 0 (their streams finish at once)
        input_ids = torch.cat([input_ids, input_ids[:1].expand(st.Bp - B, T)])
        attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(st.Bp - B, T)])
    pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    slots = torch.arange(st.L, device=dev)
    key_ok = torch.zeros(st.Bp, st.L, dtype=torch.bool, device=dev)
    key_ok[:, :T] = attention_mask.bool()
    mask = key_ok[:, None, None, :] & (slots[None, :] <= torch.arange(T, device=dev)[:, None])  # (Bp,1,T,L)
    mask |= (slots[None, :] == torch.arange(T, device=dev)[:, None])  # a pad query sees itself (no NaN)
    model.setup_cache(st.S, st.L)
    h = model.hidden(input_ids, pos, mask, torch.arange(T, device=dev))[:, -1]  # (Bp, C): last position only
    src = (torch.arange(st.S, device=dev) // st.R) % st.Bp  # stream -> its prompt
    model.gather_cache_rows(src)
    return h[src]


@torch.no_grad()  # also holds across the generator's yields
def decode_loop(model: MultiHeadGPT2, st: Streams, input_ids, attention_mask, compile: bool,
                generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Yields the (S,) tokens of each step; the caller decides when to look at them (sync)."""
    dev = model.device
    S, N, T, L = st.S, len(st.head_names), st.T, st.L
    stream_cfg = torch.arange(N).repeat_interleave(st.Bp * st.R)
    controls, plan = build_controls(st.configs, stream_cfg, model.config.vocab_size, dev)
    h = prefill(model, st, input_ids, attention_mask)

    src = (torch.arange(S, device=dev) // st.R) % st.Bp
    prompt_mask = torch.cat([attention_mask, attention_mask[:1].expand(st.Bp - st.B, T)])[src]
    history = torch.zeros(S, L, dtype=torch.long, device=dev)
    history[:, :T] = torch.cat([input_ids, input_ids[:1].expand(st.Bp - st.B, T)])[src]
    slot_valid = torch.ones(S, L, dtype=torch.bool, device=dev)
    slot_valid[:, :T] = prompt_mask.bool()
    pos_offset = prompt_mask.long().sum(-1) - T  # position id = pos_offset + cache slot
    r = torch.arange(S, device=dev) % st.R
    R_of = torch.tensor([c.num_return_sequences for c in st.configs], device=dev)[stream_cfg.to(dev)]
    unfinished = (src < st.B) & (r < R_of)  # bucket-padding rows and surplus return sequences are idle

    def noise():
        if not plan.any_sample:
            return None
        return torch.empty(S, model.config.vocab_size, device=dev).exponential_(generator=generator)

    # First token: from the prefill's last hidden state, with the same processing as every step.
    logits = heads_matmul(h.view(N, S // N, -1), st.heads).view(S, -1).float()
    step = torch.zeros((), dtype=torch.long, device=dev)
    tok, unfinished, history, bad = next_token(logits, history, torch.tensor([T], device=dev), step,
                                               unfinished, noise(), controls, plan)
    yield tok

    fn = compiled_decode_step(dev.type) if compile else decode_one_token
    max_new = max(c.max_new_tokens for c in st.configs)
    for i in range(1, max_new):
        if i % CHECK_EVERY == 0:
            raise_if_bad(bad, st)
            if not bool(unfinished.any()):
                return
        input_pos = torch.tensor([T + i - 1], device=dev)
        step = torch.tensor(i, device=dev)
        tok, unfinished, history, bad_i = fn(model, st.heads, tok, input_pos, pos_offset, slot_valid, history,
                                             step, unfinished, noise(), controls, plan)
        bad = bad | bad_i
        yield tok
    raise_if_bad(bad, st)


def raise_if_bad(bad: torch.Tensor, st: Streams) -> None:
    if not bool(bad.any()):
        return

    def heads(bit):
        return sorted({st.head_names[int(s) // (st.Bp * st.R)] for s in (bad & bit).nonzero().flatten()})

    if heads(NON_FINITE):
        raise FloatingPointError(f"non-finite logits (NaN or inf) from head(s) {heads(NON_FINITE)}: the weights or "
                                 f"inputs are broken (a diverged fine-tune, or fp16 overflow)")
    raise ValueError(f"head(s) {heads(NOTHING_LEFT)}: every token is banned at some step (bad_words_ids, "
                     f"no_repeat_ngram_size and min_new_tokens together leave nothing to pick); ban fewer tokens")


def make_generator(seed: int | None, generator: torch.Generator | None, device) -> torch.Generator | None:
    if generator is not None:
        return generator
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def generate(model: MultiHeadGPT2, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             heads: Sequence[str] | None = None, *, per_head: Mapping | None = None, compile: bool | None = None,
             seed: int | None = None, generator: torch.Generator | None = None,
             **controls) -> dict[str, torch.Tensor]:
    """Continue each (left-padded) prompt with every selected head; see `MultiHeadGPT2.generate`."""
    controls = hf_aliases(controls, input_ids)
    compile = use_compile(compile, model)
    st, input_ids, attention_mask = prepare(model, input_ids, attention_mask, heads, controls, per_head, compile)
    gen = make_generator(seed, generator, model.device)
    was_training = model.training
    model.eval()
    try:
        steps = list(decode_loop(model, st, input_ids, attention_mask, compile, gen))
    finally:
        model.clear_cache()
        model.train(was_training)
    tokens = torch.stack(steps, 1)  # (S, steps)
    out = {}
    for n, name in enumerate(st.head_names):
        rows = tokens[st.rows(n).to(tokens.device)][:, : st.configs[n].max_new_tokens]
        out[name] = trim_finished(rows, st.configs[n])
    return out


def trim_finished(rows: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Drop trailing columns where every row is already finished (HF stops once all rows are done)."""
    eos = torch.tensor(cfg.eos_token_id, device=rows.device)
    hit = torch.isin(rows, eos).long()
    finished_before = (hit.cumsum(1) - hit) > 0  # (rows, steps): an EOS came strictly earlier
    live = (~finished_before).any(0).nonzero()
    return rows[:, : int(live[-1]) + 1] if len(live) else rows[:, :0]


def hf_aliases(controls: dict, input_ids) -> dict:
    """Accept transformers' spelling of a generate call (the seed memo's, verbatim)."""
    controls = dict(controls)
    controls.pop("bos_token_id", None)  # used by HF only for empty prompts; gpt2mh takes the model's
    if "max_length" in controls:
        max_length = controls.pop("max_length")
        T = input_ids.shape[-1]
        if "max_new_tokens" not in controls:
            if max_length <= T:
                raise ValueError(f"max_length={max_length} leaves no room after a prompt of {T} tokens")
            controls["max_new_tokens"] = max_length - T
    if "max_new_tokens" in controls and controls["max_new_tokens"] is None:
        del controls["max_new_tokens"]
    words = controls.get("bad_words_ids")
    if words is not None:
        try:
            controls["bad_words_ids"] = tuple(tuple(_token_id(t) for t in w) for w in words)
        except (TypeError, ValueError):
            raise ValueError(f"bad_words_ids={words!r}: expected a list of token-id lists, "
                             f"e.g. [[5], [7, 8]]") from None
    return controls


def _token_id(t) -> int:
    if isinstance(t, (str, bytes, bool)) or int(t) != t:
        raise TypeError(t)
    return int(t)


# ---- streaming --------------------------------------------------------------------------------
def stream(model: MultiHeadGPT2, tokenizer, input_ids, attention_mask=None, heads=None, *, per_head=None,
           compile: bool | None = None, seed=None, generator=None, **controls) -> Iterator[tuple[str, int, str]]:
    """Yields (head, row, new_text) as each head's text grows (one host sync per step).

    Flush rule: a row's text is re-decoded each step and everything that is stable is emitted —
    every complete character at once, Japanese included (no waiting for a space or a kanji as
    transformers' TextStreamer does); only a trailing U+FFFD or a partial whitespace run waits."""
    controls = hf_aliases(controls, input_ids)
    compile = use_compile(compile, model)
    st, input_ids, attention_mask = prepare(model, input_ids, attention_mask, heads, controls, per_head, compile)
    gen = make_generator(seed, generator, model.device)
    rows = {name: st.rows(n).tolist() for n, name in enumerate(st.head_names)}
    eos = {name: set(st.configs[n].eos_token_id) for n, name in enumerate(st.head_names)}
    done = {(name, j): False for name in rows for j in range(len(rows[name]))}
    ids = {key: [] for key in done}
    sent = {key: "" for key in done}
    was_training = model.training
    model.eval()
    try:
        for tok in decode_loop(model, st, input_ids, attention_mask, compile, gen):
            tok = tok.tolist()
            for name, stream_ids in rows.items():
                for j, s in enumerate(stream_ids):
                    key = (name, j)
                    if done[key] or len(ids[key]) >= st.configs[st.head_names.index(name)].max_new_tokens:
                        continue
                    if tok[s] in eos[name]:
                        done[key] = True
                    else:
                        ids[key].append(tok[s])
                    text = tokenizer.decode(ids[key])
                    stable = text.rstrip() if not done[key] else text
                    stable = stable.rstrip("\ufffd")
                    if stable.startswith(sent[key]) and len(stable) > len(sent[key]):
                        yield name, j, stable[len(sent[key]):]
                        sent[key] = stable
    finally:
        model.clear_cache()
        model.train(was_training)


# ---- text in, text out ------------------------------------------------------------------------
def generate_text(model: MultiHeadGPT2, tokenizer, texts: str | Sequence[str], heads=None,
                  **kwargs) -> dict[str, list[str]] | dict[str, list[list[str]]]:
    """Strings in, per head the decoded strings out (a list per input when num_return_sequences > 1)."""
    from .prompt import encode_prompts

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
