"""The data-set engine's KV cache: each prompt's keys stored once, read by all of its heads' streams.

Per layer it holds two segments:

    prompt rows  k_prompt, v_prompt  (P, nh, Tp, hs)   one row per input in flight (its prompt, once)
    stream slots k_gen, v_gen        (S, nh, G, hs)    one row per stream (its generated tokens)

so an input costs Tp + (its streams) x G rows instead of (its streams) x (Tp + G): hard sharing
carried into the cache. A stream in slot s attends to its input's prompt row and to its own slot.

The prompt part is computed per prompt row for all of its streams at once: the streams' queries are
laid out on a grid of P rows x K members (`Decode.grid`: the slot at each cell, S for an empty one),
one batched matmul per row reads that row's keys once for all its streams, and the scores go back to
the slots through `Decode.cell`. Only (S, nh, Tp)-sized scores move between the layouts, never keys.
Both segments share one softmax. Static shapes: S, P, K, Tp and G are fixed for an engine, so the step
compiles once (and is CUDA-graph-friendly: no host sync, no data-dependent shape).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

_NEG_INF = float("-inf")


class Prefill(NamedTuple):
    """Where a prefill of B prompts (B, T) writes: prompt rows `rows` (B,), columns [0, T)."""
    rows: Tensor  # (B,) long


class Decode(NamedTuple):
    """Where a decode step of the S slots reads and writes (see the module docstring)."""
    gen_pos: Tensor       # (S,) long: the generated-cache column of each slot's newest token
    grid: Tensor          # (P * K,) long: the slot at each (prompt row, member) cell; S = empty
    cell: Tensor          # (S,) long: each slot's cell in the grid (an idle slot: any cell)
    prompt_valid: Tensor  # (P, Tp) bool: False at a prompt row's padding (P: the rows in use, a front)
    rows: Tensor | None = None  # (S',) long: the slots this step decodes (None: all S, in order)


class SlotCache(nn.Module):
    def __init__(self, slots: int, prompt_rows: int, n_head: int, prompt_len: int, gen_len: int, head_dim: int,
                 dtype, device):
        super().__init__()
        prompt = (prompt_rows, n_head, prompt_len, head_dim)  # (P, nh, Tp, hs)
        gen = (slots, n_head, gen_len, head_dim)  # (S, nh, G, hs)
        self.register_buffer("k_prompt", torch.zeros(prompt, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_prompt", torch.zeros(prompt, dtype=dtype, device=device), persistent=False)
        self.register_buffer("k_gen", torch.zeros(gen, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_gen", torch.zeros(gen, dtype=dtype, device=device), persistent=False)

    def fits(self, slots: int, prompt_rows: int, prompt_len: int, gen_len: int, dtype, device) -> bool:
        P, _, Tp, _ = self.k_prompt.shape
        S, _, G, _ = self.k_gen.shape
        return (S, P, Tp, G) == (slots, prompt_rows, prompt_len, gen_len) and self.k_gen.dtype == dtype \
            and self.k_gen.device == torch.device(device)

    def reorder(self, rows: Tensor, src: Tensor) -> None:
        """Beam search: generated-cache row rows[i] becomes a copy of row src[i] (its new beam's parent)."""
        self.k_gen.index_copy_(0, rows, self.k_gen[src])
        self.v_gen.index_copy_(0, rows, self.v_gen[src])

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, where) -> Tensor:
        if isinstance(where, Prefill):
            return self._prefill(q, k, v, mask, where)
        return self._decode(q, k, v, where)

    def _prefill(self, q, k, v, mask, where: Prefill) -> Tensor:
        # q, k, v: (B, nh, T, hs); the prompts attend among themselves (padded causal mask).
        T = k.size(2)
        self.k_prompt[where.rows, :, :T] = k
        self.v_prompt[where.rows, :, :T] = v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _decode(self, q, k, v, where: Decode) -> Tensor:
        # q, k, v: (S, nh, 1, hs), one new token per slot (per slot of where.rows when given).
        S, nh, _, hs = q.shape
        P, Tp = where.prompt_valid.shape
        G = self.k_gen.size(2)
        K = where.grid.numel() // P
        slots = torch.arange(S, device=q.device) if where.rows is None else where.rows
        self.k_gen[slots, :, where.gen_pos] = k[:, :, 0]
        self.v_gen[slots, :, where.gen_pos] = v[:, :, 0]
        k_gen, v_gen = (self.k_gen, self.v_gen) if where.rows is None else (self.k_gen[slots], self.v_gen[slots])
        k_prompt, v_prompt = self.k_prompt[:P], self.v_prompt[:P]
        scale = 1.0 / math.sqrt(hs)
        q = q[:, :, 0]  # (S, nh, hs)
        # prompt segment, per prompt row for its K member streams
        qg = F.pad(q, (0, 0, 0, 0, 0, 1))[where.grid].view(P, K, nh, hs).transpose(1, 2)  # (P, nh, K, hs)
        sp = (qg @ k_prompt.transpose(-1, -2)) * scale  # (P, nh, K, Tp)
        sp = sp.masked_fill(~where.prompt_valid[:, None, None, :], _NEG_INF)
        sp = sp.transpose(1, 2).reshape(P * K, nh, Tp)[where.cell]  # (S, nh, Tp)
        # generated segment, per slot
        sg = (q[:, :, None, :] @ k_gen.transpose(-1, -2))[:, :, 0] * scale  # (S, nh, G)
        mine = torch.arange(G, device=q.device) <= where.gen_pos[:, None]  # (S, G)
        sg = sg.masked_fill(~mine[:, None, :], _NEG_INF)
        a = torch.cat([sp, sg], -1).softmax(-1)  # (S, nh, Tp + G): one softmax over both segments
        ap, ag = a.split([Tp, G], -1)
        y = (ag[:, :, None, :] @ v_gen)[:, :, 0]  # (S, nh, hs)
        apg = F.pad(ap, (0, 0, 0, 0, 0, 1))[where.grid].view(P, K, nh, Tp).transpose(1, 2)  # (P, nh, K, Tp)
        yp = (apg @ v_prompt).transpose(1, 2).reshape(P * K, nh, hs)[where.cell]  # (S, nh, hs)
        return (y + yp)[:, :, None, :]  # (S, nh, 1, hs)
