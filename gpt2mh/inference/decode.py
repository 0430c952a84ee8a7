"""The decode step: one token for every stream slot, the one function that is compiled.

S slots run at once. Each slot holds one stream (an input's head, return sequence) or idles; slots
are grouped by head (`SlotFixed.sizes`: group n = the next sizes[n] slots, continued by head n), so
the heads' logits are one GEMM per group (`model.heads_matmul_groups`). Every stream is at its own
step: its own cache column, position id, history length and min/max_new_tokens count, so streams
admitted at different times share the step (`gpt2mh.inference.engine` admits and retires them).

The step is a pure function of a `SlotState` (plus per-slot constants that change only when a
stream is admitted): it returns a new state and never mutates its inputs other than the KV cache.
Under CUDA graphs a replay overwrites the previous replay's outputs, so the engine feeds each state
straight into the next step and reads out what it keeps before the next replay. Sampling noise is
counter-based (`sampling.stream_noise`), computed inside the step: no host round trip per token,
and a stream's draws depend on its own key and step only. Beam blocks (`gpt2mh.inference.beam`) are
searched in the step too, their KV-cache rows reordered there; a forced stream (a label choice being
scored) takes its tokens from `SlotFixed.forced`."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..model import GPT2, heads_matmul_groups
from .beam import Beams, beam_step
from .cache import Decode
from .sampling import draw, has_nonfinite, noise_width, processors, stream_noise, warp


class SlotState(NamedTuple):
    """What changes from one token to the next, all on the model's device."""
    tok: Tensor         # (S,) long: each slot's newest token
    n_gen: Tensor       # (S,) long: tokens its stream has generated so far (the newest included)
    unfinished: Tensor  # (S,) bool: a live stream that has not ended
    history: Tensor     # (S, Tp + G) long: prompt right-aligned in [0, Tp) (-1 = padding), then generated ids
    bad: Tensor         # (S,) long: NON_FINITE | NOTHING_LEFT flags, OR-ed over the steps
    logp: Tensor        # (S, G) f32: each generated token's log-probability (plan.logprobs)
    beams: Beams        # beam search state (plan.beams; `gpt2mh.inference.beam`)


class SlotFixed(NamedTuple):
    """Per-slot constants: set when a stream is admitted, read by every step."""
    heads: object             # (N, C, V) heads, or their int8 kernel
    sizes: tuple[int, ...]    # slots per head group (static)
    prompt_len: int           # Tp (static): where generated ids start in history
    pos0: Tensor              # (S,) long: position id of the stream's first generated token (its prompt length)
    key: Tensor               # (S,) long: the stream's noise key (seed, input, head, return sequence)
    where: Decode             # the cache layout (gen_pos is derived from n_gen in the step)
    blocks: Tensor | None     # (nb, W) long: the slots of the beam blocks (None: no beam search)
    forced: Tensor            # (S, G) long: a scored choice's ids (its EOS included), -1 after them / elsewhere


NON_FINITE, NOTHING_LEFT = 1, 2  # bits of bad_rows


def decode_one_token(model: GPT2, fixed: SlotFixed, state: SlotState, controls, plan) -> SlotState:
    """One token for every slot: the trunk on each slot's newest token, each head on its group."""
    gen_pos = state.n_gen - 1  # the newest token's cache column
    pos = (fixed.pos0 + gen_pos)[:, None]  # (S, 1)
    h = model.hidden(state.tok[:, None], pos, None, fixed.where._replace(gen_pos=gen_pos))[:, 0]  # (S, C)
    logits = heads_matmul_groups(h, fixed.heads, fixed.sizes).float()  # (S, V)
    blocks = fixed.blocks if plan.beams else None
    state, src = next_token(logits, state, fixed.key, fixed.prompt_len, controls, plan, blocks, fixed.forced)
    if src is not None:  # the beams' reordering: each new beam's cache row is its parent's
        for block in model.transformer.h:
            block.attn.kv_cache.reorder(blocks.reshape(-1), src)
    return state


def next_token(logits: Tensor, state: SlotState, key: Tensor, prompt_len: int, controls, plan,
               blocks: Tensor | None = None, forced: Tensor | None = None) -> tuple[SlotState, Tensor | None]:
    """Processing, sampling and end-of-stream bookkeeping, shared by the first token (from the
    prefill, n_gen = 0) and every decode step. The new token goes to history column Tp + n_gen.
    With beam blocks (nb, W), also returns the row each block row now continues (nb * W,). A forced
    stream (a choice being scored, plan.forced) takes its next id from `forced` (S, G) and keeps the
    head's own log-probability of it (before any processor) until its ids run out."""
    cur = prompt_len + state.n_gen  # (S,) history length before the new token
    if plan.beams:  # beam search ranks log-probs; the processors then act on them, as in HF
        logits = torch.where(controls.num_beams[:, None] > 1, logits.log_softmax(-1), logits)
    scores = processors(logits, state.history, cur, state.n_gen, controls, plan)  # the warpers are in `draw`
    noise = stream_noise(key, state.n_gen, noise_width(plan, logits.size(-1))) if plan.any_sample else None
    nxt = torch.where(state.unfinished, draw(scores, noise, controls, plan), controls.pad)
    col = state.n_gen.clamp(max=state.logp.size(1) - 1)[:, None]  # the new token's generated column
    if plan.forced:
        nxt = torch.where(controls.forced & state.unfinished, forced.gather(1, col)[:, 0], nxt)
    # An ended or idle slot's history is never read again (a new stream brings its own row): no mask.
    history = state.history.scatter(1, cur.clamp(max=state.history.size(1) - 1)[:, None], nxt[:, None])
    done = (nxt[:, None] == controls.eos).any(-1) | (state.n_gen + 1 >= controls.max_new)
    if plan.forced:
        done = torch.where(controls.forced, state.n_gen + 1 >= (forced >= 0).sum(1), done)
    bad = state.bad | bad_rows(logits, scores, state.unfinished)
    n_gen = state.n_gen + state.unfinished.long()
    logp, warped = state.logp, None
    if plan.logprobs:  # as transformers' compute_transition_scores(..., normalize_logits=True)
        warped = warp(scores, controls, plan) if plan.any_sample else scores
        lp = warped.log_softmax(-1).gather(1, nxt[:, None])
        if plan.forced:
            lp = torch.where(controls.forced[:, None], logits.log_softmax(-1).gather(1, nxt[:, None]), lp)
        logp = logp.scatter(1, col, lp)
    new = SlotState(nxt, n_gen, state.unfinished & ~done, history, bad, logp, state.beams)
    if blocks is None:
        return new, None
    return _beam_rows(new, state, warped, blocks, key, cur, col, controls, plan)


def _beam_rows(new: SlotState, state: SlotState, lp: Tensor, blocks: Tensor, key: Tensor, cur: Tensor, col: Tensor,
               controls, plan) -> tuple[SlotState, Tensor]:
    """The rows of beam blocks get the beam search's tokens, histories and states (`beam.beam_step`);
    the other rows keep `new`'s. lp (S, V): processed, warped log-probs."""
    rows = blocks.reshape(-1)
    gumbel = -stream_noise(key, state.n_gen, lp.size(1)).log() if plan.any_sample else None
    Tp = state.history.size(1) - state.logp.size(1)
    step = beam_step(lp, blocks, state.n_gen, state.history[:, Tp:], state.logp, state.beams, controls.eos,
                     controls.max_new, controls.num_beams, controls.length_penalty, controls.early_stopping,
                     controls.beam_keep, controls.do_sample, gumbel)
    live = state.unfinished[blocks].any(-1, keepdim=True).expand_as(blocks).reshape(-1)  # the block searches
    active = (torch.arange(blocks.size(1), device=rows.device) < controls.num_beams[blocks[:, :1]]).reshape(-1)
    beam = live & active & (controls.num_beams[rows] > 1)  # (nb * W,) rows whose values come from the search
    src = torch.where(beam, step.src.reshape(-1), rows)
    tok = step.tok.reshape(-1)
    unfinished = ~step.done[:, None].expand_as(blocks).reshape(-1)

    def pick(b, old):  # rows of a searching block: the search's value; other rows: new's
        mask = beam.view(-1, *[1] * (old.dim() - 1))
        return old.index_copy(0, rows, torch.where(mask, b, old[rows]))

    history = state.history[src].scatter(1, cur[rows].clamp(max=state.history.size(1) - 1)[:, None], tok[:, None])
    logp = state.logp[src].scatter(1, col[rows], step.tok_logp.reshape(-1, 1))
    beams = Beams(*(pick(b, old) for b, old in zip(step.beams, new.beams)))
    out = SlotState(pick(tok, new.tok), pick(state.n_gen[rows] + 1, new.n_gen), pick(unfinished, new.unfinished),
                    pick(history, new.history), new.bad, pick(logp, new.logp), beams)
    return out, src


def bad_rows(logits, scores, unfinished):
    """(S,) long flags of live streams: NaN/+inf logits, or every token banned (argmax would emit a
    banned id). Checked on the host when the engine syncs."""
    flags = has_nonfinite(logits).long() | (scores.isneginf().all(-1).long() * NOTHING_LEFT)
    return flags * unfinished


_compiled: dict[str, object] = {}


def compiled_decode_step(device_type: str):
    """The decode step compiled once per process and device type (fullgraph, static shapes).

    On CUDA it is captured as a CUDA graph ("reduce-overhead"). New shapes (slot count, cache
    lengths) or a new set of active processors compile one more graph, kept for later calls."""
    if device_type not in _compiled:
        # Each (model, slot layout, processor plan) is one graph: allow more than the default 8.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        mode = "reduce-overhead" if device_type == "cuda" else None
        _compiled[device_type] = torch.compile(decode_one_token, fullgraph=True, dynamic=False, mode=mode)
    return _compiled[device_type]


def broken_streams_error(bad: list[int], head_of) -> Exception:
    """The exception for streams flagged by bad_rows: `bad` (S,) flags, head_of(slot) -> head name."""
    def heads(bit):
        return sorted({head_of(s) for s, f in enumerate(bad) if f & bit})

    if heads(NON_FINITE):
        return FloatingPointError(f"non-finite logits (NaN or inf) from head(s) {heads(NON_FINITE)}: the weights or "
                                  f"inputs are broken (a diverged fine-tune, or fp16 overflow)")
    return ValueError(f"head(s) {heads(NOTHING_LEFT)}: every token is banned at some step (bad_words_ids, "
                      f"no_repeat_ngram_size and min_new_tokens together leave nothing to pick); ban fewer tokens")
