"""A generate call's arguments -> what the engine runs: the heads, one SamplingConfig per head
(per_head overrides, HF aliases such as max_length), the seed, and an `Engine` sized for the call."""
from __future__ import annotations

import numbers
from typing import Mapping, Sequence

import torch

from .._checks import as_seed, is_int, merge_settings
from ..inputs import encode_target, prompt_width
from ..kernels.int8 import stale_layers
from ..model import GPT2
from .controls import SamplingConfig
from .engine import PREFILL_BATCH, Engine

LEN_BUCKET = 64  # compiled: cache lengths are rounded up to this, so new lengths reuse the compiled step
MAX_PREFILL = 64  # prompts prefilled in one trunk pass at most
DEFAULT_SLOTS = {"cpu": 64, "cuda": 256}  # streams decoded at once when the inputs need more


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def bucket_batch(b: int) -> int:
    return 1 << (b - 1).bit_length()  # next power of two: 1, 2, 4, 8, ...


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


def call_configs(model: GPT2, heads, controls: dict, per_head) -> tuple[list[str], list[SamplingConfig]]:
    """The heads a call generates and one filled, validated SamplingConfig per head."""
    cfg = model.config
    names = [model.head_names[i] for i in model.head_index(heads)]
    if not names or len(set(names)) < len(names):
        raise ValueError(f"heads={heads!r}: name each head to generate once (or heads=None for all "
                         f"of {list(model.head_names)})")
    pad_default = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    return names, head_configs(model, names, controls, per_head, cfg.eos_token_id, pad_default)


def check_room(model: GPT2, prompt_len: int, configs: list[SamplingConfig]) -> None:
    max_new = max(c.max_new_tokens for c in configs)
    n = model.config.n_positions
    if prompt_len + max_new > n:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new} = {prompt_len + max_new} exceeds the "
                         f"model's context n_positions={n}; shorten the prompt or max_new_tokens")


def make_engine(model: GPT2, names: list[str], configs: list[SamplingConfig], n_inputs: int | None, prompt_len: int,
                compile: bool, slots: int | None = None, tokenizer=None) -> Engine:
    """An engine for a call: every input's streams at once when they fit in `slots` (default:
    DEFAULT_SLOTS for the device), else slots split between heads by token budget. n_inputs None:
    unknown (a stream of inputs). Compiled, the shapes are bucketed so later calls reuse the graph."""
    cap = slots if slots is not None else DEFAULT_SLOTS.get(model.device.type, 64)
    if not is_int(cap) or cap < 1:
        raise ValueError(f"slots={slots!r}: expected a number of stream slots >= 1 (or None for the default)")
    W = max(c.num_beams for c in configs)  # rows per input: a block of the widest search, or its streams
    R = [W if c.num_beams > 1 else len(c.choices) or c.num_return_sequences for c in configs]
    want = [n_inputs * r for r in R] if n_inputs is not None else None
    if want is not None and sum(want) <= cap:
        sizes = {h: bucket_batch(w) if compile else w for h, w in zip(names, want)}
        rows = bucket_batch(n_inputs) if compile else n_inputs
    else:
        sizes = cap
        rows = None
    budgets = {h: max(len(encode_target(tokenizer, x)) for x in c.choices) if c.choices and tokenizer is not None
               else c.max_new_tokens for h, c in zip(names, configs)}  # a choices head: its longest choice
    Tp, G = prompt_len, max(budgets.values())
    if compile:
        Tp, G = round_up(Tp, LEN_BUCKET), round_up(G, LEN_BUCKET)
    return Engine(model, names, slots=sizes, returns=dict(zip(names, R)), budgets=budgets, prompt_rows=rows,
                  prompt_len=Tp, gen_len=G, compile=compile, beams={h: c.num_beams for h, c in zip(names, configs)},
                  tokenizer=tokenizer,
                  prefill_batch=min(n_inputs, MAX_PREFILL) if n_inputs else PREFILL_BATCH)


def call_seed(seed: int | None, generator: torch.Generator | None, device) -> int:
    """The 32-bit key of a call's sampling noise, drawn from `generator`, or from a generator seeded
    with `seed` (so seed=s and generator=torch.Generator().manual_seed(s) sample alike, and a reused
    generator advances), else from torch's global generator (torch.manual_seed makes a call
    reproducible, as in transformers)."""
    device = torch.device(device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r}: expected a torch.Generator (or pass seed=)")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}: sampling noise is "
                             f"drawn on the model's device; pass torch.Generator(device={str(device)!r}) or seed=")
    elif seed is not None:
        generator = torch.Generator(device=device).manual_seed(as_seed(seed))
    return int(torch.randint(0, 2**32, (), generator=generator, device=generator.device if generator else "cpu"))


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
