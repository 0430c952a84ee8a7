"""A generate call's arguments -> `Streams`: the heads, one SamplingConfig per head (per_head
overrides, HF aliases such as max_length), the batch and cache buckets, the random generator."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .._checks import as_seed, is_int, merge_settings
from ..inputs import prompt_batch, prompt_width
from ..kernels.int8 import stale_layers
from ..model import GPT2
from .controls import SamplingConfig

LEN_BUCKET = 64  # cache length is rounded up to this, so new prompt lengths reuse the compiled step


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def bucket_batch(b: int) -> int:
    return 1 << (b - 1).bit_length()  # next power of two: 1, 2, 4, 8, ...


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
            if v is not None and not all(is_int(t) for t in (v if isinstance(v, (list, tuple)) else [v])):
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
    cached = model._head_subset
    if cached is None or cached[0] != key:
        sel = model.heads.detach()[idx].contiguous()
        torch._dynamo.mark_static_address(sel)
        model._head_subset = (key, sel)
    return model._head_subset[1]


def use_compile(compile: bool | None, model: GPT2) -> bool:
    # Default: compile on CUDA (the step becomes one CUDA graph). On CPU compiling costs 10-100 s
    # for a ~15% faster step (same MKL calls either way): worth it only for long or repeated runs.
    # int8 (model.quantize) compiles too: its kernel is a custom op. A compiled graph cannot see
    # that a weight changed after quantize (eager decoding falls back to fp32 for such layers).
    stale = stale_layers(model) if compile and model.quantized else []
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
    return torch.Generator(device=device).manual_seed(as_seed(seed))


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
        given = controls.pop("max_new_tokens", None)
        if given is None and max_length <= T:
            raise ValueError(f"max_length={max_length} leaves no room after a prompt of {T} tokens")
        controls.update(merge_settings([  # both given: they must agree (one rule, `_checks.merge_settings`)
            (f"max_length={max_length} (a prompt of {T} + {{value}} new tokens)", {"max_new_tokens": max_length - T}),
            ("max_new_tokens={value}", {} if given is None else {"max_new_tokens": given})]))
    if "max_new_tokens" in controls and controls["max_new_tokens"] is None:
        del controls["max_new_tokens"]
    words = controls.get("bad_words_ids")
    if words is not None:
        try:
            controls["bad_words_ids"] = tuple(tuple(_bad_word_id(t) for t in w) for w in words)
        except (TypeError, ValueError):
            raise ValueError(f"bad_words_ids={words!r}: expected a list of token-id lists, "
                             f"e.g. [[5], [7, 8]]") from None
    return controls


def _bad_word_id(t) -> int:
    if isinstance(t, (str, bytes)) or not is_int(t) and not (isinstance(t, numbers.Real) and int(t) == t):
        raise TypeError(t)
    return int(t)
