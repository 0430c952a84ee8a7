"""The data-set engine: any number of inputs through a fixed number of stream slots.

    engine = Engine(model, ["tense", "entities", "pos"], slots=48, budgets={...})
    for result in engine.run(requests):      # requests: any iterable, read as slots free up
        ...                                  # results in completion order

Memory is the slot layout's, whatever the number of inputs: S stream slots (grouped by head) and P
prompt rows (`gpt2mh.inference.cache.SlotCache`). An input is admitted when a prompt row and a slot
in each of its heads' groups are free: several waiting inputs are prefilled together (one trunk
pass), each head's first token comes from that pass, and each stream takes a slot. Every step
decodes all slots at once (`decode.decode_one_token`, compiled with `compile=True`); a stream that
ends (EOS, its own max_new_tokens) frees its slot at once for the next input, and an input whose
streams have all ended is returned and frees its prompt row.

A long-running source (a server's queue) yields `IDLE` when it has nothing now: the loop goes on
decoding; when nothing is live or waiting either (`engine.idle`) it asks again at once, so such a
source blocks until a request arrives. `engine.cancel(key)`, from any thread, retires an input.

Group sizes: a head's streams occupy its group for as many steps as they run, so by default each
head gets slots in proportion to its token budget x return sequences (`budgets`): a 4-token label
head needs few slots, a 48-token tag head many, and all groups drain at the same rate.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor

from ..inputs import encode_target
from ..kernels.linear import prepack_model
from ..model import (
    GPT2,
    heads_matmul_groups,
    padded_causal_mask,
    position_ids_from_mask,
)
from .beam import Beams, empty_beams, first_scores
from .cache import Decode, Prefill, SlotCache
from .controls import SamplingConfig, build_controls
from .decode import (
    SlotFixed,
    SlotState,
    broken_streams_error,
    compiled_decode_step,
    decode_one_token,
    next_token,
)
from .sampling import stream_key

PREFILL_BATCH = 16  # inputs prefilled together at most (one trunk pass)
GROW_BUCKET = 64  # a cache that must grow grows by at least this many positions
IDLE = object()  # what a request source yields for "nothing now" (None: no more, ever)
CANCELLED = "cancelled"  # the error of a Result for a cancelled input


@dataclass
class Request:
    """One input: its prompt ids and, per head it wants, a filled and validated SamplingConfig."""
    key: Hashable                          # returned with its Result (an input index, a request id)
    ids: Sequence[int]                     # the prompt, non-empty
    configs: Mapping[str, SamplingConfig]  # head -> config (eos_token_id / pad_token_id set)
    seed: int = 0                          # with `row`, the input's sampling noise (never its slot)
    row: int = 0


@dataclass
class Result:
    key: Hashable
    tokens: dict[str, list[list[int]]] = field(default_factory=dict)  # head -> one id list per return sequence
    error: str | None = None               # the input was refused (the run goes on)
    prompt_tokens: int = 0
    scores: dict[str, list[list[float]]] = field(default_factory=dict)  # output_scores: each token's log-prob
    sequence_scores: dict[str, list[float]] = field(default_factory=dict)  # beam search + output_scores
    choice: dict[str, tuple[int, float]] = field(default_factory=dict)  # choices: (index of the answer, its log-prob)


@dataclass
class Tokens:
    """The tokens of one step (or of a prefill: each new stream's first): (key, head, r, token) each."""
    items: list[tuple[Hashable, str, int, int]]


@dataclass
class _Input:
    request: Request
    prompt_row: int
    tokens: dict[str, list[list[int] | None]]
    live: int  # streams not yet ended
    scores: dict[str, list] = field(default_factory=dict)
    sequence_scores: dict[str, list] = field(default_factory=dict)


class Engine:
    """Stream slots and prompt rows for `heads` of `model`; `run` decodes any number of requests."""

    def __init__(self, model: GPT2, heads: Sequence[str], *, slots: int | Mapping[str, int] = 64,
                 returns: Mapping[str, int] | None = None, budgets: Mapping[str, int] | None = None,
                 prompt_rows: int | None = None, prompt_len: int = 64, gen_len: int = 64, compile: bool = False,
                 prefill_batch: int = PREFILL_BATCH, beams: Mapping[str, int] | None = None,
                 tokenizer=None):
        self.model, self.names = model, list(heads)
        self.tokenizer = tokenizer  # text <-> ids, for stop_strings and choices
        self.choice_ids: dict[tuple[str, ...], list[list[int]]] = {}  # choices -> each one's ids, </s> included
        # beam search: a head that may search (beams[h] > 1) gives each input a block of W slots
        self.max_beams = [int((beams or {}).get(h, 1)) for h in self.names]
        self.W = max(self.max_beams)
        self.searching = [b > 1 for b in self.max_beams]
        self.max_returns = [int((returns or {}).get(h, 1)) for h in self.names]
        self.returns = [self.W if b else r for b, r in zip(self.searching, self.max_returns)]  # rows per input
        sizes = group_sizes(self.names, slots, self.returns, budgets)
        self.sizes = tuple(-(-z // self.W) * self.W if b else z for z, b in zip(sizes, self.searching))
        self.S = sum(self.sizes)
        self.K = sum(self.returns)  # members per prompt row: every stream an input can have
        self.P = prompt_rows or self.S
        self.Tp, self.G = prompt_len, gen_len
        self.compile, self.prefill_batch = compile, prefill_batch
        self.first_slot = [sum(self.sizes[:n]) for n in range(len(self.names))]
        self.member0 = [sum(self.returns[:n]) for n in range(len(self.names))]
        blocks = [torch.arange(a, a + z) for a, z, b in zip(self.first_slot, self.sizes, self.searching) if b]
        self.blocks = torch.cat(blocks).view(-1, self.W).to(model.device) if blocks else None  # (nb, W)
        self.waiting: deque[Request] = deque()  # read from the source, not yet admitted
        self._cancels: deque = deque()  # keys from cancel(); deque.append is atomic (any thread)
        idx = model.head_index(self.names)
        with torch.no_grad():
            self.heads = model.head_weights(idx) if model.quantized else selected_heads(model, idx)

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Decode every request; yields a Result as each input's streams have all ended. Requests are
        read from the iterable only as slots free up."""
        return (e for e in self.events(requests, tokens=False) if isinstance(e, Result))

    @torch.no_grad()  # also holds across the generator's yields
    def events(self, requests: Iterable[Request], tokens: bool = True) -> Iterator[Result | Tokens]:
        """`run`, with a `Tokens` event after each prefill and step too (tokens=True): for streaming."""
        model = self.model
        was_training = model.training
        model.eval()
        self._setup()
        try:
            yield from self._loop(iter(requests), tokens)
        finally:
            if not self.compile:  # `model.clear_cache()` frees a compiled call's
                model.clear_cache()
            model.train(was_training)

    def _setup(self) -> None:
        m, dev = self.model, self.model.device
        c = m.config
        for block in m.transformer.h:  # a compiled call's caches are kept for the next (CUDA graphs: fixed addresses)
            cache = block.attn.kv_cache
            if not (isinstance(cache, SlotCache) and cache.fits(self.S, self.P, self.Tp, self.G, m.dtype, dev)):
                block.attn.kv_cache = SlotCache(self.S, self.P, c.n_head, self.Tp, self.G, c.head_dim, m.dtype, dev)
        prepack_model(m, self.S)  # the step's S-row GEMMs (gpt2mh.kernels.linear)
        S = self.S
        self.state = SlotState(tok=torch.zeros(S, dtype=torch.long, device=dev),
                               n_gen=torch.ones(S, dtype=torch.long, device=dev),
                               unfinished=torch.zeros(S, dtype=torch.bool, device=dev),
                               history=torch.full((S, self.Tp + self.G), -1, dtype=torch.long, device=dev),
                               bad=torch.zeros(S, dtype=torch.long, device=dev),
                               logp=torch.zeros(S, self.G, device=dev), beams=empty_beams(S, self.G, dev))
        self.pos0 = torch.zeros(S, dtype=torch.long, device=dev)
        self.key = torch.zeros(S, dtype=torch.long, device=dev)
        self.forced = torch.full((S, self.G), -1, dtype=torch.long, device=dev)
        self.prompt_valid = torch.zeros(self.P, self.Tp, dtype=torch.bool, device=dev)
        self.grid = [S] * (self.P * self.K)  # host copies of the layout, uploaded when it changes
        self.cell = [0] * S
        self.slot_stream: list[tuple[_Input, int, int] | None] = [None] * S  # (input, head n, r)
        self.slot_cfg: list[SamplingConfig | None] = [None] * S
        # free slots per head group; a searching head's: the first slot of each free block of W
        # (heaps: the lowest free slot first, so live streams stay at the front of their groups and a
        # quiet engine's steps decode only those: `_active`)
        self.free_slots = [list(range(a, a + n, self.W if b else 1))
                           for a, n, b in zip(self.first_slot, self.sizes, self.searching)]
        self.block_live: dict[int, int] = {}  # a searching head's block (first slot) -> its live streams
        self.free_rows = list(range(self.P))  # a heap, as free_slots
        self._subset = None  # (what a step on the live slots needs,), kept until the layout changes
        self.configs: list[SamplingConfig] = []  # every config seen: the plan covers them all
        self.was_live = [False] * S
        self.stop_ids: dict[int, tuple[list[int], int]] = {}  # slot -> (ids so far, their text's length): stop_strings
        self.step_fn = compiled_decode_step(self.model.device.type) if self.compile else decode_one_token

    def _loop(self, requests, tokens: bool) -> Iterator[Result | Tokens]:
        waiting = self.waiting = deque()
        exhausted = False
        live = 0  # slots holding an unfinished stream
        while True:
            if self._cancels:
                freed, dropped = self._drop_cancelled(waiting)
                live -= freed
                yield from dropped
            while not exhausted and len(waiting) < self.prefill_batch:
                nxt = next(requests, None)
                if nxt is IDLE:
                    break
                if nxt is None:
                    exhausted = True
                else:
                    waiting.append(nxt)
            admitted, done, first = self._admit(waiting)
            if tokens and first:
                yield Tokens(first)
            yield from done
            live += admitted
            if not live:
                if exhausted and not waiting:
                    return
                if not admitted and waiting and not done:
                    raise RuntimeError("the engine cannot admit an input although every slot is free")
                continue
            self.state = self._step()
            tok, unfinished, bad = self.state.tok.tolist(), self.state.unfinished.tolist(), self.state.bad.tolist()
            if any(bad):
                raise broken_streams_error(bad, lambda s: self.names[self._head_of(s)])
            if tokens:
                yield Tokens([(st[0].request.key, self.names[st[1]], st[2], tok[s])
                              for s, st in enumerate(self.slot_stream)
                              if st is not None and self.was_live[s] and _streams(self.slot_cfg[s])])
            unfinished = self._stop_strings(tok, unfinished)
            ended = [s for s, st in enumerate(self.slot_stream) if st is not None and not unfinished[s]]
            self.was_live = unfinished
            if ended:
                live -= len(ended)
                yield from self._retire(ended)

    # ---- a server's engine: idle, busy, cancel ---------------------------------------------------
    @property
    def busy(self) -> int:
        """Slots holding a live stream (read on the loop's thread: in the source, between events)."""
        return sum(st is not None for st in getattr(self, "slot_stream", ()))

    @property
    def idle(self) -> bool:
        """Nothing live, nothing waiting: a source that yields IDLE should block until a request arrives."""
        return not self.busy and not self.waiting

    def cancel(self, key: Hashable) -> None:
        """Retire input `key` at the loop's next iteration (thread-safe): its slots and prompt row are
        freed and `Result(key, error=CANCELLED)` is yielded. A key the engine does not hold (not read
        yet, or done) is ignored."""
        self._cancels.append(key)

    def _drop_cancelled(self, waiting: deque) -> tuple[int, list[Result]]:
        """(slots freed, Results) for the cancelled keys, waiting or live."""
        keys = set()
        while self._cancels:
            keys.add(self._cancels.popleft())
        done = [Result(r.key, error=CANCELLED, prompt_tokens=len(r.ids)) for r in waiting if r.key in keys]
        kept = [r for r in waiting if r.key not in keys]
        waiting.clear()
        waiting.extend(kept)
        slots = [s for s, st in enumerate(self.slot_stream) if st is not None and st[0].request.key in keys]
        inputs = {}
        for s in slots:
            x = self._free(s)
            inputs[id(x)] = x
            self.was_live[s] = False
        if slots:  # an idle slot must not advance (its cache column would run past G)
            idx = torch.tensor(slots, device=self.state.unfinished.device)
            self.state = self.state._replace(unfinished=self.state.unfinished.index_fill(0, idx, False))
            self._layout_changed()
        for x in inputs.values():
            heapq.heappush(self.free_rows, x.prompt_row)
            self.prompt_valid[x.prompt_row] = False
            done.append(Result(x.request.key, error=CANCELLED, prompt_tokens=len(x.request.ids)))
        return len(slots), done

    # ---- the step: every slot, or only the front of each group when few are live --------------------
    def _step(self) -> SlotState:
        sub = self._active()
        if sub is None:
            return self.step_fn(self.model, self._fixed(), self.state, self.controls, self.plan)
        rows, fixed, controls, plan = sub
        part = pytree.tree_map(lambda t: t[rows], self.state)
        new = self.step_fn(self.model, fixed, part, controls, plan)
        state = _put(self.state, rows, new, torch.arange(len(rows), device=rows.device))
        return state._replace(bad=state.bad.index_copy(0, rows, new.bad))

    def _active(self):
        """When the live streams sit in the front of their head groups (slots are handed out lowest
        first) and leave most slots idle, the step decodes only those fronts — each group up to its
        highest live slot, rounded up to a power of two, and the prompt rows up to the highest in use —
        instead of paying a full step for a quiet engine (a server between bursts).
        None: decode every slot (beam blocks and a compiled step always take the full step)."""
        if self._subset is not None:  # computed since the layout last changed
            return self._subset[0]
        self._subset = (None,)
        if self.blocks is not None or self.compile:  # compiled: one graph per shape, so always the full step
            return None
        sizes, rows = [], []  # per group: its front (0 rows: a group with nothing live)
        for a, z in zip(self.first_slot, self.sizes):
            top = max((s - a + 1 for s in range(a, a + z) if self.slot_stream[s] is not None), default=0)
            k = min(z, 1 << (top - 1).bit_length()) if top else 0
            sizes.append(k)
            rows.extend(range(a, a + k))
        top_row = max((st[0].prompt_row for st in self.slot_stream if st is not None), default=0) + 1
        P = min(self.P, 1 << (top_row - 1).bit_length())
        if not rows or len(rows) * 2 > self.S and P * 2 > self.P:  # nothing live, or nearly full: the whole step
            return None
        dev = self.model.device
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        position = torch.full((self.S + 1,), len(rows), dtype=torch.long, device=dev)  # slot -> its row here
        position[idx] = torch.arange(len(rows), device=dev)
        grid = position[torch.tensor(self.grid[: P * self.K], device=dev)]
        cell = torch.tensor([self.cell[s] if self.slot_stream[s] is not None else 0 for s in rows], device=dev)
        where = Decode(gen_pos=None, grid=grid, cell=cell, prompt_valid=self.prompt_valid[:P], rows=idx)
        controls, plan = self._controls([self.slot_cfg[s] or self.configs[0] for s in rows])
        fixed = SlotFixed(self.heads, tuple(sizes), self.Tp, self.pos0[idx], self.key[idx], where, None,
                          self.forced[idx])
        self._subset = ((idx, fixed, controls, plan),)
        return self._subset[0]

    # ---- admission ------------------------------------------------------------------------------
    def _fits(self, req: Request, taken: list[int], rows: int) -> bool:
        if rows >= len(self.free_rows):
            return False
        return all(len(self.free_slots[n]) - taken[n] >= self._units(req, n) for n in self._heads_of(req))

    def _admit(self, waiting: deque) -> tuple[int, list[Result], list]:
        """Prefill the waiting inputs that fit now (in order); returns (streams now live, results of
        inputs refused or ended at their first token, the first tokens as Tokens items)."""
        batch, taken, done = [], [0] * len(self.names), []
        while waiting and len(batch) < self.prefill_batch:
            error = self._check(waiting[0])
            if error:
                done.append(Result(waiting.popleft().key, error=error))
                continue
            if not self._fits(waiting[0], taken, len(batch)):
                break
            req = waiting.popleft()
            for n in self._heads_of(req):
                taken[n] += self._units(req, n)
            batch.append(req)
        if not batch:
            return 0, done, []
        self._grow(max(len(r.ids) for r in batch), max(self._budget(c) for r in batch for c in r.configs.values()))
        live, ended, first = self._prefill(batch)
        return live, done + ended, first

    def _check(self, req: Request) -> str | None:
        unknown = [h for h, c in req.configs.items() if h not in self.names or c is None]
        if unknown:
            return f"head(s) {unknown} are not served here (heads: {self.names})"
        if not req.configs:
            return "no head requested"
        if self.tokenizer is None and any(c.stop_strings or c.choices for c in req.configs.values()):
            return "stop_strings and choices need the tokenizer (the text <-> ids): pass tokenizer="
        if len(req.ids) == 0:
            return "empty prompt"
        longest = max(self._budget(c) for c in req.configs.values())
        n_pos = self.model.config.n_positions
        if len(req.ids) + longest > n_pos:
            return (f"prompt length {len(req.ids)} + max_new_tokens {longest} = {len(req.ids) + longest} exceeds "
                    f"the model's context n_positions={n_pos}")
        for h, c in req.configs.items():
            n = self.names.index(h)
            if c.num_beams > self.max_beams[n]:
                return f"head {h!r}: num_beams={c.num_beams} > {self.max_beams[n]}, the most this engine searches with"
            limit = self.W if self.searching[n] else self.max_returns[n]
            if c.num_return_sequences > limit:
                return f"head {h!r}: num_return_sequences={c.num_return_sequences} > {limit}"
            if len(c.choices) > limit:
                return f"head {h!r}: {len(c.choices)} choices > {limit}, the most this engine scores at once"
        return None

    def _prefill(self, batch: list[Request]) -> tuple[int, list[Result], list]:
        """One trunk pass over the batch's prompts into free prompt rows; every stream's first token."""
        m, dev = self.model, self.model.device
        T = max(len(r.ids) for r in batch)
        ids = torch.tensor([[0] * (T - len(r.ids)) + list(r.ids) for r in batch], dtype=torch.long, device=dev)
        mask = torch.tensor([[0] * (T - len(r.ids)) + [1] * len(r.ids) for r in batch], dtype=torch.long, device=dev)
        inputs = [_Input(r, heapq.heappop(self.free_rows), {h: [None] * _outputs(c) for h, c in r.configs.items()},
                         0, {h: [None] * _outputs(c) for h, c in r.configs.items()},
                         {h: [None] * _outputs(c) for h, c in r.configs.items()}) for r in batch]
        rows = torch.tensor([x.prompt_row for x in inputs], device=dev)
        last = m.hidden(ids, position_ids_from_mask(mask), padded_causal_mask(mask), Prefill(rows))[:, -1]  # (B, C)
        self.prompt_valid[rows] = F.pad(mask.bool(), (0, self.Tp - T))
        # the new streams, grouped by head (the layout heads_matmul_groups takes)
        streams = [(b, n, r) for n in range(len(self.names)) for b, x in enumerate(inputs)
                   if self.names[n] in x.request.configs for r in range(self._r(x.request, n))]
        sizes = [sum(1 for s in streams if s[1] == n) for n in range(len(self.names))]
        heads_used = [n for n in range(len(self.names)) if sizes[n]]
        h = last[torch.tensor([b for b, _, _ in streams], device=dev)]
        logits = heads_matmul_groups(h, self._heads_subset(heads_used), [sizes[n] for n in heads_used]).float()
        cfgs = [inputs[b].request.configs[self.names[n]] for b, n, _ in streams]
        controls, plan = self._controls(cfgs)
        history = torch.full((len(streams), self.Tp + self.G), -1, dtype=torch.long, device=dev)
        for i, (b, _, _) in enumerate(streams):
            p = inputs[b].request.ids
            history[i, self.Tp - len(p):self.Tp] = torch.tensor(p, device=dev)
        key = torch.tensor([self._key(inputs[b].request, n, r) for b, n, r in streams], dtype=torch.long, device=dev)
        M = len(streams)
        used = [r < _width(c) for (_, _, r), c in zip(streams, cfgs)]  # a block's rows past its input's own
        beams = empty_beams(M, self.G, dev)
        nb = torch.tensor([c.num_beams for c in cfgs], device=dev)
        beams = beams._replace(score=first_scores(nb, self.W).gather(  # beam r of a block: its initial score
            1, torch.tensor([r for _, _, r in streams], device=dev)[:, None].clamp(max=self.W - 1))[:, 0])
        forced = torch.full((M, self.G), -1, dtype=torch.long, device=dev)  # the choices' ids (plan.forced)
        for i, ((_, _, r), c) in enumerate(zip(streams, cfgs)):
            if c.choices and r < len(c.choices):
                ids = self._choices(c)[r]
                forced[i, :len(ids)] = torch.tensor(ids, device=dev)
        blocks = [i for i, (_, n, _) in enumerate(streams) if self.searching[n]]
        blocks = torch.tensor(blocks, device=dev).view(-1, self.W) if plan.beams else None
        first, _ = next_token(logits, SlotState(torch.zeros(M, dtype=torch.long, device=dev),
                                                torch.zeros(M, dtype=torch.long, device=dev),
                                                torch.tensor(used, device=dev), history,
                                                torch.zeros(M, dtype=torch.long, device=dev),
                                                torch.zeros(M, self.G, device=dev), beams),
                              key, self.Tp, controls, plan, blocks, forced)
        if any(first.bad.tolist()):
            raise broken_streams_error(first.bad.tolist(), lambda i: self.names[streams[i][1]])
        tok, unfinished = first.tok.tolist(), first.unfinished.tolist()
        for i, c in enumerate(cfgs):  # a first token that completes a stop string ends its stream
            if unfinished[i] and c.stop_strings and _completes(self.tokenizer.decode([tok[i]]), 0, c.stop_strings):
                unfinished[i] = False
        logp = first.logp[:, 0].tolist()
        place, ended, block = [], [], {}  # block: (input, head) -> the first slot of its block
        for i, (b, n, r) in enumerate(streams):
            x, name = inputs[b], self.names[n]
            if unfinished[i]:
                if self.searching[n]:
                    if (b, n) not in block:
                        block[b, n] = heapq.heappop(self.free_slots[n])
                        self.block_live[block[b, n]] = 0
                    s = block[b, n] + r
                    self.block_live[block[b, n]] += 1
                else:
                    s = heapq.heappop(self.free_slots[n])
                place.append((i, s))
                if cfgs[i].stop_strings:
                    self.stop_ids[s] = ([tok[i]], len(self.tokenizer.decode([tok[i]])))
                x.live += 1
                self.slot_stream[s] = (x, n, r)
                self.slot_cfg[s] = cfgs[i]
                cell = x.prompt_row * self.K + self.member0[n] + r
                self.grid[cell], self.cell[s] = s, cell
            elif used[i] and cfgs[i].num_beams == 1:  # a stream (or a choice) that ended at its first token
                x.tokens[name][r], x.scores[name][r] = [tok[i]], [logp[i]]
            elif r == 0 and cfgs[i].num_beams > 1:  # a search that ended at its first token (max_new_tokens=1)
                self._beam_outputs(x, n, first.beams, list(range(i, i + self.W)))
        if place:
            src = torch.tensor([i for i, _ in place], device=dev)
            dst = torch.tensor([s for _, s in place], device=dev)
            self.state = _put(self.state, dst, first, src)
            self.pos0[dst] = torch.tensor([len(inputs[streams[i][0]].request.ids) for i, _ in place], device=dev)
            self.key[dst] = key[src]
            self.forced[dst] = forced[src]
            self.was_live = self.state.unfinished.tolist()
            self._layout_changed()
        first_tokens = [(inputs[b].request.key, self.names[n], r, tok[i]) for i, (b, n, r) in enumerate(streams)
                        if used[i] and _streams(cfgs[i])]  # a beam's tokens are not final until it ends
        for x in inputs:
            if not x.live:
                ended.append(self._finish(x))
        return len(place), ended, first_tokens

    # ---- retirement -----------------------------------------------------------------------------
    def _retire(self, slots: list[int]) -> Iterator[Result]:
        st, dev = self.state, self.state.history.device
        plain = [s for s in slots if self.slot_cfg[s].num_beams == 1]
        if plain:
            n_gen = st.n_gen.tolist()
            rows = st.history[torch.tensor(plain, device=dev), self.Tp:].tolist()
            logp = st.logp[torch.tensor(plain, device=dev)].tolist()
            for s, row, lp in zip(plain, rows, logp):
                x, n, r = self.slot_stream[s]
                x.tokens[self.names[n]][r], x.scores[self.names[n]][r] = row[: n_gen[s]], lp[: n_gen[s]]
        for s in slots:  # a search ends all its beams at once: its results are its finished hypotheses
            x, n, r = self.slot_stream[s]
            if r == 0 and self.slot_cfg[s].num_beams > 1:
                self._beam_outputs(x, n, st.beams, list(range(s, s + self.W)))
        for s in slots:
            x = self._free(s)
            x.live -= 1
            if not x.live:
                yield self._finish(x)
        self._layout_changed()

    def _free(self, s: int) -> _Input:
        """Slot s holds nothing from now on (a searching head's block is free when its last stream ends);
        returns the input it held."""
        x, n, _ = self.slot_stream[s]
        self.stop_ids.pop(s, None)
        self.slot_stream[s], self.slot_cfg[s] = None, None
        self.grid[self.cell[s]] = self.S
        if self.searching[n]:
            s0 = s - (s - self.first_slot[n]) % self.W
            self.block_live[s0] -= 1
            if not self.block_live[s0]:
                del self.block_live[s0]
                heapq.heappush(self.free_slots[n], s0)
        else:
            heapq.heappush(self.free_slots[n], s)
        return x

    def _beam_outputs(self, x: _Input, n: int, beams: Beams, rows: list[int]) -> None:
        """A search's results: the best num_return_sequences finished hypotheses of its block (rows)."""
        name = self.names[n]
        idx = torch.tensor(rows[: x.request.configs[name].num_return_sequences], device=beams.fin_tok.device)
        lens = beams.fin_len[idx].tolist()
        x.tokens[name] = [t[:k] for t, k in zip(beams.fin_tok[idx].tolist(), lens)]
        x.scores[name] = [t[:k] for t, k in zip(beams.fin_logp[idx].tolist(), lens)]
        x.sequence_scores[name] = beams.fin_score[idx].tolist()

    def _stop_strings(self, tok: list[int], unfinished: list[bool]) -> list[bool]:
        """Streams whose newest token completes one of their stop_strings end here (that token kept, as
        transformers' StopStringCriteria): `unfinished` with them False, and the same on the device."""
        hit = []
        for s, (ids, before) in self.stop_ids.items():
            if unfinished[s]:
                ids.append(tok[s])
                text = self.tokenizer.decode(ids)
                self.stop_ids[s] = (ids, len(text))
                if _completes(text, before, self.slot_cfg[s].stop_strings):
                    hit.append(s)
        if hit:
            self.state = self.state._replace(unfinished=self.state.unfinished.index_fill(
                0, torch.tensor(hit, device=self.state.tok.device), False))
            unfinished = [u and s not in hit for s, u in enumerate(unfinished)]
        return unfinished

    def _finish(self, x: _Input) -> Result:
        heapq.heappush(self.free_rows, x.prompt_row)
        self.prompt_valid[x.prompt_row] = False
        cfg = x.request.configs
        choice = {}
        for h, c in cfg.items():  # a choices head answers with the choice it scores highest (the first of ties)
            if c.choices:
                total = [sum(lp) for lp in x.scores[h]]
                best = max(range(len(total)), key=total.__getitem__)
                choice[h] = (best, total[best])
                x.tokens[h], x.scores[h] = [x.tokens[h][best]], [x.scores[h][best]]
        return Result(x.request.key, {h: list(rows) for h, rows in x.tokens.items()}, None, len(x.request.ids),
                      {h: v for h, v in x.scores.items() if cfg[h].output_scores},
                      {h: v for h, v in x.sequence_scores.items() if cfg[h].output_scores and cfg[h].num_beams > 1},
                      choice)

    # ---- per-slot tensors -------------------------------------------------------------------------
    def _layout_changed(self) -> None:
        dev = self.model.device
        self._subset = None
        cfgs = [c if c is not None else self.configs[0] for c in self.slot_cfg]  # an idle slot: any config
        self.controls, self.plan = self._controls(cfgs)
        self.where = Decode(gen_pos=self.state.n_gen, grid=torch.tensor(self.grid, device=dev),
                            cell=torch.tensor(self.cell, device=dev), prompt_valid=self.prompt_valid)
        self._active()  # its host tensors now, not at a step

    def _fixed(self) -> SlotFixed:
        return SlotFixed(self.heads, self.sizes, self.Tp, self.pos0, self.key, self.where, self.blocks, self.forced)

    def _choices(self, cfg: SamplingConfig) -> list[list[int]]:
        """Each choice's ids as the head was trained to answer it (`inputs.encode_target`: </s> last)."""
        if cfg.choices not in self.choice_ids:
            self.choice_ids[cfg.choices] = [encode_target(self.tokenizer, c) for c in cfg.choices]
        return self.choice_ids[cfg.choices]

    def _budget(self, cfg: SamplingConfig) -> int:
        """Generated-cache columns a stream may need: its max_new_tokens, or its longest choice."""
        if cfg.choices and self.tokenizer is not None:
            return max(len(ids) for ids in self._choices(cfg))
        return cfg.max_new_tokens

    def _controls(self, cfgs: list[SamplingConfig]):
        for c in cfgs:
            if c not in self.configs:
                self.configs.append(c)
        which = [self.configs.index(c) for c in cfgs]
        return build_controls(self.configs, which, self.model.config.vocab_size, self.model.device)

    def _grow(self, prompt_len: int, max_new: int) -> None:
        """Longer prompts or budgets than the cache holds: reallocate it larger (keeping its contents),
        by GROW_BUCKET at least, so a file of growing prompt lengths reallocates (and recompiles) rarely."""
        if prompt_len <= self.Tp and max_new <= self.G:
            return
        Tp = self.Tp if prompt_len <= self.Tp else max(prompt_len, self.Tp + GROW_BUCKET)
        G = self.G if max_new <= self.G else max(max_new, self.G + GROW_BUCKET)
        for block in self.model.transformer.h:
            old = block.attn.kv_cache
            c = self.model.config
            new = SlotCache(self.S, self.P, c.n_head, Tp, G, c.head_dim, self.model.dtype, self.model.device)
            new.k_prompt[:, :, :self.Tp] = old.k_prompt
            new.v_prompt[:, :, :self.Tp] = old.v_prompt
            new.k_gen[:, :, :self.G] = old.k_gen
            new.v_gen[:, :, :self.G] = old.v_gen
            block.attn.kv_cache = new
        st = self.state
        history = torch.cat([torch.full((self.S, Tp - self.Tp), -1, dtype=torch.long, device=st.history.device),
                             st.history, torch.full((self.S, G - self.G), -1, dtype=torch.long,
                                                    device=st.history.device)], 1)
        grow = lambda t: F.pad(t, (0, G - self.G))  # noqa: E731  (S, G) rows: more generated columns
        self.forced = F.pad(self.forced, (0, G - self.G), value=-1)
        self.state = st._replace(history=history, logp=grow(st.logp),
                                 beams=st.beams._replace(fin_tok=grow(st.beams.fin_tok), fin_logp=grow(st.beams.fin_logp)))
        self.prompt_valid = F.pad(self.prompt_valid, (0, Tp - self.Tp))
        self.Tp, self.G = Tp, G

    def _heads_of(self, req: Request) -> list[int]:
        return [self.names.index(h) for h in req.configs]

    def _r(self, req: Request, n: int) -> int:
        """Rows (stream slots) the input takes in head n: a block of W for a head that may search."""
        return self.W if self.searching[n] else _outputs(req.configs[self.names[n]])

    def _units(self, req: Request, n: int) -> int:
        """What the input takes from head n's free list: one block, or one slot per stream."""
        return 1 if self.searching[n] else _outputs(req.configs[self.names[n]])

    def _head_of(self, s: int) -> int:
        return max(n for n, a in enumerate(self.first_slot) if a <= s)

    def _key(self, req: Request, n: int, r: int) -> int:
        return stream_key(req.seed, req.row, self.model.head_names.index(self.names[n]), r)

    def _heads_subset(self, used: list[int]):
        if used == list(range(len(self.names))):
            return self.heads
        if isinstance(self.heads, torch.Tensor):
            return self.heads[used]
        return self.heads.select(used)


def _completes(text: str, before: int, stops: Sequence[str]) -> bool:
    """A stop string occurs in `text` and ends past its first `before` characters (the text up to the
    newest token): HF's rule — the string may run off either end of that token ("st" + "opper" stops
    at "stop"), but one that ended before it was already seen."""
    return any(x in text[max(0, before - len(x) + 1):] for x in stops)


def _outputs(cfg: SamplingConfig) -> int:
    """Streams of one input in a head: its return sequences, or one per choice it scores."""
    return len(cfg.choices) if cfg.choices else cfg.num_return_sequences


def _width(cfg: SamplingConfig) -> int:
    """Rows of its block a stream set uses: its beams, or its streams."""
    return cfg.num_beams if cfg.num_beams > 1 else _outputs(cfg)


def _streams(cfg: SamplingConfig) -> bool:
    """Its tokens are final as they come (not a beam, not a choice being scored): streamed in Tokens."""
    return cfg.num_beams == 1 and not cfg.choices


def _put(state: SlotState, dst: Tensor, new: SlotState, src: Tensor) -> SlotState:
    """state with rows dst replaced by new's rows src (every field but the bad flags)."""
    def put(a, b):
        return a.index_copy(0, dst, b[src])

    return SlotState(put(state.tok, new.tok), put(state.n_gen, new.n_gen), put(state.unfinished, new.unfinished),
                     put(state.history, new.history), state.bad, put(state.logp, new.logp),
                     Beams(*(put(a, b) for a, b in zip(state.beams, new.beams))))


def selected_heads(model: GPT2, idx: list[int]) -> Tensor:
    """(N', C, V) heads for a subset: kept on the model until the heads change, so a CUDA graph sees
    the same address each call (a new copy per call would be copied into the graph every step)."""
    if idx == list(range(len(model.head_names))):
        return model.heads
    key = (tuple(idx), model.heads._version, model.heads.data_ptr())
    cached = model._head_subset
    if cached is None or cached[0] != key:
        sel = model.heads.detach()[idx].contiguous()
        torch._dynamo.mark_static_address(sel)
        model._head_subset = (key, sel)
    return model._head_subset[1]


def group_sizes(names: Sequence[str], slots: int | Mapping[str, int], returns: Sequence[int],
                budgets: Mapping[str, int] | None) -> list[int]:
    """Slots per head group: given per head, or a total split in proportion to each head's token
    budget x return sequences (each group holds at least one input's streams)."""
    if isinstance(slots, Mapping):
        sizes = [int(slots[h]) for h in names]
    else:
        weight = [max(1, int((budgets or {}).get(h, 1))) * r for h, r in zip(names, returns)]
        total = max(int(slots), sum(returns))
        sizes = [max(r, round(total * w / sum(weight))) for w, r in zip(weight, returns)]
    for h, n, r in zip(names, sizes, returns):
        if n < r:
            raise ValueError(f"head {h!r}: {n} slot(s) cannot hold {r} return sequences of one input")
    return sizes
