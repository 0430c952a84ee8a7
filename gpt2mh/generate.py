"""Multi-head generation: prefill the prompts once, then one decode step per token for all streams.

Streams are laid out head-major: stream s = n * (Bp * R) + b * R + r for head n, prompt b (of Bp
after batch bucketing) and return sequence r, so the N heads' logits are one `bmm` of
(N, Bp*R, C) by the fused (N, C, V). `Streams.stream_ids` is the one place that layout is written.

The decode step is a pure function of a `DecodeState` (plus per-call constants): it returns a new
state and never mutates its inputs other than the KV cache. Under CUDA graphs a replay overwrites
the previous replay's outputs, so the loop feeds each state straight into the next step and copies
out only what it keeps (the tokens), before the next replay."""
from __future__ import annotations

import contextlib
import numbers
import operator
from dataclasses import dataclass
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from .inputs import prompt_batch, prompt_width
from .linear import prepack_model, stale_packs
from .model import GPT2, attention_mask_4d, heads_matmul, position_ids_from_mask
from .prompt import check_vocab, encode_prompts
from .sampling import SamplingConfig, build_controls, draw, has_nonfinite, noise_width, processors

CHECK_EVERY = 8  # decode steps between host checks of "all streams finished" (one sync each)
LEN_BUCKET = 64  # cache length is rounded up to this, so new prompt lengths reuse the compiled step


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def bucket_batch(b: int) -> int:
    return 1 << (b - 1).bit_length()  # next power of two: 1, 2, 4, 8, ...


# ---- the decode step: the one compiled function -----------------------------------------------
class DecodeState(NamedTuple):
    """What changes from one token to the next, all on the model's device."""
    tok: Tensor         # (S,) long: each stream's newest token
    input_pos: Tensor   # (1,) long: its cache slot (= its index in history)
    step: Tensor        # () long: tokens generated so far
    unfinished: Tensor  # (S,) bool
    history: Tensor     # (S, L) long: prompt (left-padded) then generated ids, for the processors
    bad: Tensor         # (S,) long: NON_FINITE | NOTHING_LEFT flags, OR-ed over the steps


class Fixed(NamedTuple):
    """Per-call constants of the decode step."""
    heads: Tensor       # (N, C, V) the selected heads
    pos_offset: Tensor  # (S,) long: position id = pos_offset + cache slot
    slot_valid: Tensor  # (S, L) bool: False at a prompt's left padding


def decode_one_token(model: GPT2, fixed: Fixed, state: DecodeState, noise: Tensor | None,
                     controls, plan) -> DecodeState:
    """One token for every stream: the trunk on each stream's newest token, all heads at once."""
    S = state.history.size(0)
    N = fixed.heads.size(0)
    mask = attention_mask_4d(fixed.slot_valid, state.input_pos)  # (S, 1, 1, L)
    pos = (fixed.pos_offset + state.input_pos)[:, None]  # (S, 1)
    h = model.hidden(state.tok[:, None], pos, mask, state.input_pos)  # (S, 1, C)
    logits = heads_matmul(h.view(N, S // N, -1), fixed.heads).view(S, -1).float()  # (S, V)
    return next_token(logits, state, noise, controls, plan)


def next_token(logits: Tensor, state: DecodeState, noise, controls, plan) -> DecodeState:
    """Processing, sampling and end-of-stream bookkeeping, shared by the first token (from the
    prefill) and every decode step. The new token goes to slot state.input_pos + 1."""
    cur = state.input_pos + 1  # (1,) tokens in history before the new one
    scores = processors(logits, state.history, cur[0], state.step, controls, plan)  # the warpers are in `draw`
    nxt = torch.where(state.unfinished, draw(scores, noise, controls, plan), controls.pad)
    history = state.history.index_copy(1, cur, nxt[:, None])
    done = (nxt[:, None] == controls.eos).any(-1) | (state.step + 1 >= controls.max_new)
    bad = state.bad | bad_rows(logits, scores, state.unfinished)
    return DecodeState(nxt, cur, state.step + 1, state.unfinished & ~done, history, bad)


NON_FINITE, NOTHING_LEFT = 1, 2  # bits of bad_rows


def bad_rows(logits, scores, unfinished):
    """(S,) long flags of live streams: NaN/+inf logits, or every token banned (argmax would emit a
    banned id). Checked on the host every CHECK_EVERY steps."""
    flags = has_nonfinite(logits).long() | (scores.isneginf().all(-1).long() * NOTHING_LEFT)
    return flags * unfinished


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
    def N(self) -> int:
        return len(self.head_names)

    @property
    def S(self) -> int:
        return self.N * self.Bp * self.R

    def stream_ids(self, n, b, r):
        """The stream layout, written once: head n, prompt b, return sequence r -> stream id."""
        return n * self.Bp * self.R + b * self.R + r

    def prompt_of(self) -> torch.Tensor:
        """(S,) the (bucketed) prompt row each stream continues."""
        return (torch.arange(self.S) // self.R) % self.Bp

    def rows(self, n: int) -> torch.Tensor:
        """Stream ids of head n's real outputs, in HF's order (prompt-major, then return sequence)."""
        R_n = self.configs[n].num_return_sequences
        b, r = torch.meshgrid(torch.arange(self.B), torch.arange(R_n), indexing="ij")
        return self.stream_ids(n, b, r).flatten()

    def head_of(self, s: int) -> str:
        return self.head_names[s // (self.Bp * self.R)]

    def live(self) -> torch.Tensor:
        """(S,) bool: streams that produce output (not bucket padding, not a surplus return sequence)."""
        s = torch.arange(self.S)
        R_of = torch.tensor([c.num_return_sequences for c in self.configs])[s // (self.Bp * self.R)]
        return (self.prompt_of() < self.B) & (s % self.R < R_of)


def head_configs(model: GPT2, names: Sequence[str], controls: dict, per_head: Mapping | None,
                 eos_default: int, pad_default: int) -> list[SamplingConfig]:
    if per_head is not None and not isinstance(per_head, Mapping):
        raise TypeError(f"per_head must map head names to controls, e.g. per_head={{'{names[0]}': "
                        f"{{'max_new_tokens': 8}}}}; got a {type(per_head).__name__}")
    per_head = dict(per_head or {})
    unknown = [h for h in per_head if h not in names]
    if unknown:
        raise KeyError(f"per_head names {unknown} are not among the generated heads {list(names)}")
    out = []
    for name in names:
        spec = per_head.get(name, {})
        try:
            if isinstance(spec, SamplingConfig):
                cfg = spec
            elif isinstance(spec, str):  # the CLI's spelling: "temperature=0.5,top_k=40"
                cfg = SamplingConfig.from_string(spec, SamplingConfig(**controls))
            elif isinstance(spec, Mapping):
                cfg = SamplingConfig(**{**controls, **dict(spec)})
            else:
                raise TypeError(f"per_head[{name!r}] must be a dict of controls (or a SamplingConfig, or a "
                                f"string like 'temperature=0.5'), got {type(spec).__name__}")
        except TypeError as e:
            raise TypeError(f"head {name!r}: {e}; valid controls are {list(SamplingConfig.__dataclass_fields__)}") from None
        for key in ("eos_token_id", "pad_token_id"):
            v = getattr(cfg, key)
            if v is not None and not all(_is_id(t) for t in (v if isinstance(v, (list, tuple)) else [v])):
                raise ValueError(f"head {name!r}: {key}={v!r} must be a token id (an int, e.g. tokenizer.eos_id)"
                                 + (" or a list of them" if key == "eos_token_id" else ""))
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else eos_default
        eos = tuple(int(t) for t in eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        pad = int(cfg.pad_token_id) if cfg.pad_token_id is not None else pad_default
        cfg = cfg.replace(eos_token_id=eos, pad_token_id=pad)
        cfg.validate(model.config.vocab_size)
        out.append(cfg)
    return out


def selected_heads(model: GPT2, idx: list[int]) -> Tensor:
    """(N', C, V) heads for a subset: kept on the model until the heads change, so a CUDA graph sees
    the same address each call (a new copy per call would be copied into the graph every step)."""
    if idx == list(range(len(model.head_names))):
        return model.heads
    key = (tuple(idx), model.heads._version, model.heads.data_ptr())
    cached = getattr(model, "_head_subset", None)
    if cached is None or cached[0] != key:
        sel = model.heads.detach()[idx].contiguous()
        torch._dynamo.mark_static_address(sel)
        model._head_subset = (key, sel)
    return model._head_subset[1]


def _is_id(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def use_compile(compile: bool | None, model: GPT2) -> bool:
    # Default: compile on CUDA (the step becomes one CUDA graph). On CPU compiling costs 10-100 s
    # for a ~15% faster step (same MKL calls either way): worth it only for long or repeated runs.
    # int8 (model.quantize) compiles too: its kernel is a custom op. A compiled graph cannot see
    # that a weight changed after quantize (eager decoding falls back to fp32 for such layers).
    stale = stale_packs(model) if compile and model.quantized else []
    if stale:
        raise ValueError(f"compile=True: weights changed since quantize('int8') ({', '.join(stale[:3])}"
                         f"{', ...' if len(stale) > 3 else ''}); call model.quantize('int8') again (or compile=False)")
    return model.device.type == "cuda" if compile is None else bool(compile)


def prepare(model: GPT2, input_ids, attention_mask, heads, controls, per_head, compile: bool):
    # Lists, numpy, BatchEncoding, right or left padding -> left-padded (B, T) LongTensors.
    input_ids, attention_mask = prompt_batch(input_ids, attention_mask, model.config.vocab_size)
    cfg = model.config
    if input_ids.size(1) == 0:  # an empty prompt starts from <s>, as HF does
        input_ids = torch.full((input_ids.size(0), 1), cfg.bos_token_id, dtype=torch.long)
        attention_mask = torch.ones_like(input_ids)
    names = [model.head_names[i] for i in model.head_index(heads)]
    if not names or len(set(names)) < len(names):
        raise ValueError(f"heads={heads!r}: name each head to generate once (or heads=None for all "
                         f"of {list(model.head_names)})")
    idx = model.head_index(names)
    # (N, C, V); int8 heads (model.quantize): one object per head subset; fp32 subsets are kept static for CUDA graphs.
    # no_grad: head_weights gives the int8 form only to inference (else generate decoded fp32 heads)
    with torch.no_grad():
        sel = model.head_weights(idx) if model.quantized else selected_heads(model, idx)
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
    if Bp > B:  # bucket padding: copies of prompt 0 (their streams are idle from the start)
        input_ids = torch.cat([input_ids, input_ids[:1].expand(Bp - B, T)])
        attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(Bp - B, T)])
    return st, input_ids.to(model.device), attention_mask.to(model.device)


# ---- the loop ---------------------------------------------------------------------------------
@torch.no_grad()
def prefill(model: GPT2, st: Streams, input_ids, attention_mask) -> Tensor:
    """Run the Bp prompts (Bp, T) once, fill the first Bp cache rows, fan them out to the S streams.

    Returns the last position's hidden state of every stream, (S, C)."""
    dev = input_ids.device
    T = st.T
    key_valid = torch.zeros(st.Bp, st.L, dtype=torch.bool, device=dev)
    key_valid[:, :T] = attention_mask.bool()
    query = torch.arange(T, device=dev)
    model.setup_cache(st.S, st.L)
    prepack_model(model, st.S)  # the decode step's S-row GEMMs (gpt2mh.linear)
    h = model.hidden(input_ids, position_ids_from_mask(attention_mask), attention_mask_4d(key_valid, query),
                     query)[:, -1]  # (Bp, C): last position only
    src = st.prompt_of().to(dev)
    model.gather_cache_rows(src)
    return h[src]


def initial_state(model: GPT2, st: Streams, input_ids, attention_mask) -> tuple[Fixed, DecodeState]:
    """The per-call constants and the state before the first token (input_pos = the last prompt slot)."""
    dev = model.device
    S, T, L = st.S, st.T, st.L
    src = st.prompt_of().to(dev)
    prompt_mask = attention_mask[src]  # (S, T)
    history = torch.zeros(S, L, dtype=torch.long, device=dev)
    history[:, :T] = input_ids[src]
    slot_valid = torch.ones(S, L, dtype=torch.bool, device=dev)
    slot_valid[:, :T] = prompt_mask.bool()
    pos_offset = prompt_mask.long().sum(-1) - T  # position id = pos_offset + cache slot
    fixed = Fixed(st.heads, pos_offset, slot_valid)
    state = DecodeState(tok=torch.zeros(S, dtype=torch.long, device=dev),
                        input_pos=torch.tensor([T - 1], device=dev), step=torch.zeros((), dtype=torch.long, device=dev),
                        unfinished=st.live().to(dev), history=history,
                        bad=torch.zeros(S, dtype=torch.long, device=dev))
    return fixed, state


@torch.no_grad()  # also holds across the generator's yields
def decode_loop(model: GPT2, st: Streams, input_ids, attention_mask, compile: bool,
                generator: torch.Generator | None) -> Iterator[DecodeState]:
    """Yields the state after each new token. A consumer must read what it needs from a state
    before asking for the next one: a CUDA graph replay overwrites the previous step's outputs."""
    dev = model.device
    stream_cfg = torch.arange(st.N).repeat_interleave(st.Bp * st.R)
    controls, plan = build_controls(st.configs, stream_cfg, model.config.vocab_size, dev)
    h = prefill(model, st, input_ids, attention_mask)
    fixed, state = initial_state(model, st, input_ids, attention_mask)

    def noise():  # None when no stream samples: plain argmax, no random numbers drawn
        if not plan.any_sample:
            return None
        width = noise_width(plan, model.config.vocab_size)
        return torch.empty(st.S, width, device=dev).exponential_(generator=generator)

    # First token: from the prefill's last hidden state, with the same processing as every step.
    logits = heads_matmul(h.view(st.N, st.S // st.N, -1), st.heads).view(st.S, -1).float()
    state = next_token(logits, state, noise(), controls, plan)
    yield state

    fn = compiled_decode_step(dev.type) if compile else decode_one_token
    for i in range(1, max(c.max_new_tokens for c in st.configs)):
        if i % CHECK_EVERY == 0 and not check_streams(state, st):
            return
        state = fn(model, fixed, state, noise(), controls, plan)
        yield state
    check_streams(state, st)


def check_streams(state: DecodeState, st: Streams) -> bool:
    """One host sync: raise for broken streams, else whether any stream is still running."""
    any_live, any_bad = torch.stack([state.unfinished.any(), state.bad.any()]).tolist()
    if any_bad:
        raise_bad(state.bad.cpu(), st)
    return bool(any_live)


def raise_bad(bad: Tensor, st: Streams) -> None:
    def heads(bit):
        return sorted({st.head_of(int(s)) for s in (bad & bit).nonzero().flatten()})

    if heads(NON_FINITE):
        raise FloatingPointError(f"non-finite logits (NaN or inf) from head(s) {heads(NON_FINITE)}: the weights or "
                                 f"inputs are broken (a diverged fine-tune, or fp16 overflow)")
    raise ValueError(f"head(s) {heads(NOTHING_LEFT)}: every token is banned at some step (bad_words_ids, "
                     f"no_repeat_ngram_size and min_new_tokens together leave nothing to pick); ban fewer tokens")


def make_generator(seed: int | None, generator: torch.Generator | None, device) -> torch.Generator | None:
    device = torch.device(device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r}: expected a torch.Generator (or pass seed=)")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}: sampling noise is "
                             f"drawn on the model's device; pass torch.Generator(device={str(device)!r}) or seed=")
        return generator
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(check_seed(seed))


SEEDS = (-2**63, 2**64)  # what torch.Generator.manual_seed accepts


def check_seed(seed) -> int:
    """An integer seed (numpy and 0-d tensor integers too); int(1.5) or int("3") would quietly pick another."""
    try:
        if isinstance(seed, bool):
            raise TypeError
        value = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed={seed!r}: expected an integer (got {type(seed).__name__})") from None
    if not SEEDS[0] <= value < SEEDS[1]:
        raise ValueError(f"seed={value} is out of range: a seed is an integer in [-2**63, 2**64)")
    return value


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


def hf_aliases(controls: dict, input_ids) -> dict:
    """Accept transformers' spelling of a generate call (the seed memo's, verbatim)."""
    controls = dict(controls)
    controls.pop("bos_token_id", None)  # used by HF only for empty prompts; gpt2mh takes the model's
    if controls.get("max_length", 0) is None:  # HF's "not set"
        del controls["max_length"]
    if "max_length" in controls:
        max_length = controls.pop("max_length")
        if not isinstance(max_length, int) or isinstance(max_length, bool):
            raise ValueError(f"max_length={max_length!r} must be an integer (prompt + new tokens), or None")
        T = prompt_width(input_ids)
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
