"""Multi-head generation: prefill the prompts once, then one decode step per token for all streams.

Streams are laid out head-major: stream s = n * (Bp * R) + b * R + r for head n, prompt b (of Bp
after batch bucketing) and return sequence r, so the N heads' logits are one `bmm` of
(N, Bp*R, C) by the fused (N, C, V). `Streams.stream_ids` is the one place that layout is written.

The decode step is a pure function of a `DecodeState` (plus per-call constants): it returns a new
state and never mutates its inputs other than the KV cache. Under CUDA graphs a replay overwrites
the previous replay's outputs, so the loop feeds each state straight into the next step and copies
out only what it keeps (the tokens), before the next replay."""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from ..kernels.linear import prepack_model
from ..model import GPT2, attention_mask_4d, heads_matmul, position_ids_from_mask
from .controls import build_controls
from .request import Streams
from .sampling import draw, has_nonfinite, noise_width, padding_as_no_token, processors

CHECK_EVERY = 8  # decode steps between host checks of "all streams finished" (one sync each)


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
    prepack_model(model, st.S)  # the decode step's S-row GEMMs (gpt2mh.kernels.linear)
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
    history[:, :T] = padding_as_no_token(input_ids[src], prompt_mask)
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
