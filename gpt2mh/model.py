"""The network: a GPT-2 trunk with HF parameter names, and N output heads fused in one tensor."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import GPT2Config


class Conv1D(nn.Module):
    """HF GPT-2's linear layer: weight stored [in, out], y = x @ W + b.

    Keeping this layout makes loading a pure rename, and x @ W with W [in, out] is also the faster
    memory order for these shapes on CPU. `kernel` is a pluggable `kernel(x, weight, bias)` set from
    outside the network (a prepacked few-row weight, `gpt2mh.kernels.linear`; int8, `gpt2mh.kernels.int8`);
    it falls back to `addmm` itself whenever it does not apply."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.kernel = None  # set by gpt2mh.kernels (prepack_layer, quantize_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1))  # (M, in)
        y = torch.addmm(self.bias, x2, self.weight) if self.kernel is None else self.kernel(x2, self.weight, self.bias)
        return y.view(*x.shape[:-1], y.size(-1))


class KVCache(nn.Module):
    """Static cache: buffers allocated once, written in place at `input_pos` (no torch.cat per step)."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)  # (S, nh, L, hs)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # k, v: (b, nh, T, hs) with b <= S; a prefill of B prompts fills the first B rows.
        k_out, v_out = self.k_cache[: k.size(0)], self.v_cache[: k.size(0)]
        k_out.index_copy_(2, input_pos, k)
        v_out.index_copy_(2, input_pos, v)
        return k_out, v_out

    def attend(self, q, k, v, mask, input_pos):
        """Attention of q (B, nh, T, hs) over the cache after writing k, v at `input_pos` (T,)."""
        if mask is None:  # is_causal would align to cache slot 0, not to input_pos
            raise ValueError("with a KV cache, pass a (B, 1, T, L) bool attention mask")
        k, v = self.update(input_pos, k, v)  # (B, nh, L, hs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)  # its p goes to SDPA's dropout_p (HF's name)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.kv_cache = None  # KVCache (setup_cache) or the engine's SlotCache: anything with `attend`

    def forward(self, x, mask, input_pos=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.kv_cache is not None and input_pos is not None:
            # The cache decides how attention over cached keys works: KVCache here, the engine's
            # shared-prompt SlotCache (gpt2mh.inference.cache), each with its own `input_pos`.
            y = self.kv_cache.attend(q, k, v, mask, input_pos)  # (B, nh, T, hs)
        else:
            dropout = self.attn_dropout.p if self.training else 0.0
            # mask None: plain causal self-attention (forward() without padding; the trainer always passes a mask)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.n_inner)
        self.c_proj = Conv1D(config.n_inner, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        # GPT-2 was trained with the tanh approximation of GELU ("gelu_new"): use exactly that.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask, input_pos=None):
        x = x + self.attn(self.ln_1(x), mask, input_pos)
        return x + self.mlp(self.ln_2(x))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    # What HF generate computes for left padding: real tokens count 0, 1, ...; pads get 1.
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def attention_mask_4d(key_valid: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """The one attention-mask builder. key_valid (B, L) bool (False at padding), query_pos (T,) the
    cache slot of each query -> (B, 1, T, L) bool: a query sees valid keys at or before its slot.

    A pad query would see no key at all (NaN in SDPA), so every query also sees its own slot; a pad
    query's output is never used."""
    slots = torch.arange(key_valid.size(-1), device=key_valid.device)
    causal = slots[None, :] <= query_pos[:, None]  # (T, L)
    return (key_valid[:, None, None, :] & causal) | (slots[None, :] == query_pos[:, None])


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 key mask -> (B, 1, T, T) bool: causal and not a pad key (no cache)."""
    T = attention_mask.size(-1)
    return attention_mask_4d(attention_mask.bool(), torch.arange(T, device=attention_mask.device))


def heads_matmul(h: torch.Tensor, heads) -> torch.Tensor:
    """The one head-logits function: (N, M, C) or (1, M, C) @ heads (N, C, V) -> (N, M, V).

    Per-head rows (N, M, C) are what decoding has (each head continues its own streams); a leading 1
    is one set of hidden states shared by every head (training, scoring). A baddbmm, not a bmm: on
    CPU, inductor lowers a bmm with M = 1 to an elementwise multiply-and-sum that runs ~3x slower
    than MKL's GEMV. `heads` may also be a head kernel with the same contract (int8 mode,
    gpt2mh.kernels.int8.Int8Heads.matmul)."""
    h = h.expand(heads.size(0), -1, -1)  # (N, M, C), a view when shared
    if not isinstance(heads, torch.Tensor):
        return heads.matmul(h)
    return torch.baddbmm(h.new_zeros(()), h, heads, beta=0)


def heads_matmul_groups(h: torch.Tensor, heads, sizes: Sequence[int]) -> torch.Tensor:
    """Head logits of rows in N consecutive groups: (S, C), group n = the next sizes[n] rows, through
    head n -> (S, V). The data-set engine's layout: each head owns a group of stream slots, sized
    by how long its streams run, so groups differ in size and one bmm does not apply; each group is
    one GEMM (addmm with beta=0, for the reason given in heads_matmul). `heads` may be a head kernel
    with a `matmul_groups` method (int8 mode)."""
    parts = h.split(list(sizes))
    if not isinstance(heads, torch.Tensor):
        return heads.matmul_groups(parts)
    zero = h.new_zeros(())
    return torch.cat([torch.addmm(zero, x, heads[n], beta=0) for n, x in enumerate(parts) if x.size(0)])  # 0: idle


class GPT2(nn.Module):
    """One GPT-2 trunk (`transformer.*`, HF names) and N heads in one tensor `heads` [N, n_embd, vocab].

    Each head is a full LM head in Conv1D layout; every head's logits come from one batched matmul.
    The network only: loading, saving, generation and int8 mode live in modules above this one
    (the user-facing `gpt2mh.MultiHeadGPT2` adds them as HF-style methods).
    """

    def __init__(self, config: GPT2Config, head_names: Sequence[str] = ("lm",)):
        super().__init__()
        self.config = config
        self.head_names = check_head_names(head_names)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                drop=nn.Dropout(config.embd_pdrop),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.heads = nn.Parameter(torch.empty(len(self.head_names), config.n_embd, config.vocab_size))
        self.gradient_checkpointing = False
        self.int8_heads = None  # the heads' int8 kernel, set by gpt2mh.kernels.int8.quantize_model
        self._head_subset = None  # (key, heads[idx]) kept for CUDA graphs by gpt2mh.inference.request.selected_heads
        self.reset_parameters()

    # ---- construction -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2's initialisation (normal 0.02, residual projections scaled by 1/sqrt(2 n_layer)).

        Fresh heads start as copies of the (tied) input embedding, as a pretrained model's would."""
        std = 0.02
        for name, p in self.transformer.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            elif name.endswith(".weight") and p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(".weight"):  # LayerNorm gain
                nn.init.ones_(p)
        with torch.no_grad():
            self.heads.copy_(self.transformer.wte.weight.t().unsqueeze(0).expand_as(self.heads))

    @property
    def quantized(self) -> str | None:
        return "int8" if self.int8_heads is not None else None

    def head_weights(self, idx: list[int]):
        """The selected heads as the head matmul takes them: (N, C, V) fp32, or their int8 form."""
        q = self.int8_heads
        if q is not None and not torch.is_grad_enabled() and q.fresh(self.heads):  # fresh: gpt2mh.kernels.int8
            return q if idx == list(range(len(self.head_names))) else q.select(idx)
        return self.heads if idx == list(range(len(self.head_names))) else self.heads[idx].contiguous()

    @property
    def device(self) -> torch.device:
        return self.heads.device

    @property
    def dtype(self) -> torch.dtype:
        return self.heads.dtype

    def head_index(self, names: Sequence[str] | None) -> list[int]:
        if names is None:
            return list(range(len(self.head_names)))
        if isinstance(names, str):
            names = [names]
        given = names
        try:
            names = list(names)
        except TypeError:
            names = [given]
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"heads takes a head name, a list of head names or None (all heads), got {given!r}; "
                            f"this model has heads {list(self.head_names)}")
        unknown = [n for n in names if n not in self.head_names]
        if unknown:
            raise KeyError(f"unknown head(s) {unknown}; this model has heads {list(self.head_names)}")
        return [self.head_names.index(n) for n in names]

    # ---- KV cache ------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int) -> None:
        if max_len > self.config.n_positions:
            raise ValueError(f"cache length {max_len} exceeds n_positions={self.config.n_positions}")
        c = self.config
        for block in self.transformer.h:
            cache = block.attn.kv_cache
            if cache is None or cache.k_cache.shape != (batch_size, c.n_head, max_len, c.head_dim) \
                    or cache.k_cache.dtype != self.dtype or cache.k_cache.device != self.device:
                block.attn.kv_cache = KVCache(batch_size, c.n_head, max_len, c.head_dim, self.dtype, self.device)

    def clear_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    # ---- forward -------------------------------------------------------------------------------
    def hidden(self, input_ids, position_ids, mask=None, input_pos=None) -> torch.Tensor:
        """Trunk: (B, T) ids -> (B, T, C) final hidden states (after ln_f).

        mask: bool (B, 1, T, L) attention mask (True = attend) or None for plain causal;
        input_pos: (T,) cache slots to write, or None for the training path (no cache)."""
        t = self.transformer
        x = t.drop(t.wte(input_ids) + t.wpe(position_ids))  # (B, T, C)
        for block in t.h:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, mask, input_pos, use_reentrant=False)
            else:
                x = block(x, mask, input_pos)
        return t.ln_f(x)

    def head_logits(self, h: torch.Tensor, heads=None) -> torch.Tensor:
        """Every head on the same hidden states: (..., C) -> (N, ..., V), one batched matmul."""
        heads = self.heads if heads is None else heads
        y = heads_matmul(h.reshape(1, -1, h.size(-1)), heads)  # (N, M, V)
        return y.view(heads.size(0), *h.shape[:-1], -1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> logits (N, B, T, V) of every head. Left padding: pass attention_mask."""
        T = input_ids.size(1)
        if T > self.config.n_positions:
            raise ValueError(f"input length {T} exceeds the model's context n_positions={self.config.n_positions}")
        if attention_mask is None:
            position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)
            mask = None
        else:
            position_ids = position_ids_from_mask(attention_mask)
            mask = padded_causal_mask(attention_mask)
        return self.head_logits(self.hidden(input_ids, position_ids, mask))


def check_head_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [names]
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(f"head names must be a name or a list of names (one per head), got {names!r}") from None
    if not names:
        raise ValueError("a model needs at least one head (got an empty list of head names)")
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"head names must be non-empty strings (got {n!r})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate head names {dup}; each head needs its own name")
    return names
