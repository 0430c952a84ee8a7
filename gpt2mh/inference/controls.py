"""Sampling settings: `SamplingConfig` (one head's HF-named controls, validated) -> per-stream
tensors `Controls` and the static `Plan` that picks which processors exist in the compiled step.

A generate call runs S streams (prompt x head x return sequence). Each stream carries its own
settings as tensors, so heads with different configs share one compiled decode step. A setting
that is "off" is encoded as a value that makes its step an exact no-op (x / 1.0, x < -inf,
cumulative prob <= -1, ...), so such streams get bit-for-bit what HF gives without that processor
(`gpt2mh.inference.sampling` applies them)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import FLOAT32_MAX, float_setting, is_int, merge_settings, plain_number

_INT_FIELDS = ("top_k", "no_repeat_ngram_size", "min_new_tokens", "max_new_tokens", "num_return_sequences",
               "num_beams")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "length_penalty")
_TYPICAL_OFF = 2.0  # typical mass > 1: every cumulative prob is below it, so nothing is removed
_TOP_P_OFF = -1.0  # cut below any cumulative prob: nothing is removed
# Each float control's domain (low, high, low open?, note), checked by the one rule `_checks.float_setting`
# (not NaN, within float32's range: the controls live in float32 tensors). temperature (sampling) and
# repetition_penalty divide the scores, so they must be normal float32 numbers; a quotient beyond float32
# is handled (`sampling.divide`, the penalty held at float32's max), so that whole range is usable.
_FLOAT_DOMAINS = {
    "temperature": (-FLOAT32_MAX, FLOAT32_MAX, False, "must be a finite number (unused with do_sample=False)"),
    "top_p": (0.0, 1.0, True, "must be in (0, 1] (1 = off)"),
    "min_p": (0.0, 1.0, False, "must be in [0, 1] (0 = off)"),
    "typical_p": (0.0, 1.0, True, "must be in (0, 1] (1 = off)"),
    "repetition_penalty": (0.0, FLOAT32_MAX, True, "must be > 0 (1 = off)"),
    "length_penalty": (-FLOAT32_MAX, FLOAT32_MAX, False, "must be a finite number (beam search only)"),
}
_EARLY_STOPPING = {False: 0, True: 1, "never": 2}  # transformers' values, as Controls.early_stopping codes


def _tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else x


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range: {allowed}")


@dataclass(frozen=True)
class SamplingConfig:
    """One head's sampling settings, with transformers' names and meanings.

    do_sample=False is greedy (argmax; the warpers temperature..typical_p are then ignored).
    temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repetition_penalty=1.0,
    no_repeat_ngram_size=0, bad_words_ids=(), min_new_tokens=0 all mean "off". Unlike
    transformers there is no implicit top_k=50. bad_words_ids holds token-id sequences: a 1-token
    sequence bans that token everywhere (except an EOS id, as in HF), a longer one bans its last
    token when the stream's last tokens equal the rest. eos_token_id / pad_token_id None are filled
    by the generation code with the model's ids. Construction does not check ranges: call
    `validate` (or use `replace` / `from_string`, which do).

    Beam search (`gpt2mh.inference.beam`): num_beams > 1, with length_penalty, early_stopping
    (True / False / "never") and num_return_sequences <= num_beams as in transformers; do_sample=True
    with beams is beam sampling. stop_strings end a stream when its decoded text ends with one of them
    (the engine's caller decodes). output_scores: keep each generated token's log-probability (and a
    beam hypothesis' score). choices: the head answers one of these strings (`gpt2mh.inference.choices`).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    min_new_tokens: int = 0
    max_new_tokens: int = 64
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    num_return_sequences: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop_strings: tuple[str, ...] = ()
    output_scores: bool = False
    choices: tuple[str, ...] = ()

    def __post_init__(self):
        words = self.bad_words_ids if self.bad_words_ids is not None else ()
        object.__setattr__(self, "bad_words_ids", tuple(_tuple(w) for w in _tuple(words)))
        object.__setattr__(self, "eos_token_id", _tuple(self.eos_token_id))
        for name in ("stop_strings", "choices"):  # HF also takes one string
            v = getattr(self, name)
            object.__setattr__(self, name, (v,) if isinstance(v, str) else _tuple(v) if v is not None else ())
        for name in _INT_FIELDS + _FLOAT_FIELDS:  # numpy / 0-d torch scalars -> Python numbers
            object.__setattr__(self, name, plain_number(getattr(self, name)))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def validate(self, vocab_size: int | None = None) -> None:
        for name in _INT_FIELDS:
            _require(is_int(getattr(self, name)), name, getattr(self, name), "must be an integer")
        _require(isinstance(self.do_sample, bool), "do_sample", self.do_sample, "must be True or False")
        for name, (low, high, low_open, allowed) in _FLOAT_DOMAINS.items():
            if name == "temperature" and self.do_sample:
                low, low_open, allowed = 0.0, True, "must be > 0 with do_sample=True (use do_sample=False for greedy)"
            normal = name == "repetition_penalty" or name == "temperature" and self.do_sample  # divisors
            float_setting(name, getattr(self, name), low, high, low_open=low_open, normal=normal, allowed=allowed)
        _require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 = off)")
        _require(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", self.no_repeat_ngram_size,
                 "must be >= 0 (0 = off)")
        _require(self.num_return_sequences >= 1, "num_return_sequences", self.num_return_sequences, "must be >= 1")
        _require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        _require(self.num_beams >= 1, "num_beams", self.num_beams, "must be >= 1 (1 = no beam search)")
        _require(self.num_beams == 1 or self.num_return_sequences <= self.num_beams, "num_return_sequences",
                 self.num_return_sequences, f"must be <= num_beams={self.num_beams} with beam search")
        _require(any(self.early_stopping is k for k in (True, False)) or self.early_stopping == "never",
                 "early_stopping", self.early_stopping, 'must be True, False or "never"')
        _require(isinstance(self.output_scores, bool), "output_scores", self.output_scores, "must be True or False")
        for name in ("stop_strings", "choices"):
            v = getattr(self, name)
            _require(isinstance(v, tuple) and all(isinstance(x, str) and x for x in v), name, v,
                     "must be a list of non-empty strings")
        _require(len(set(self.choices)) == len(self.choices), "choices", self.choices, "must not repeat a string")
        _require(not (self.choices and (self.num_beams > 1 or self.num_return_sequences > 1)), "choices",
                 self.choices, "answers with the one choice it scores highest: num_beams and num_return_sequences "
                 "do not apply (drop one of them)")
        _require(not (self.stop_strings and self.num_beams > 1), "stop_strings", self.stop_strings,
                 "are not supported with num_beams > 1 yet: cut the returned texts instead, or use num_beams=1")
        _require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", self.min_new_tokens,
                 f"must be in [0, max_new_tokens={self.max_new_tokens}]")
        allowed = "token ids must be integers >= 0" + (f" and < vocab_size={vocab_size}" if vocab_size else "")

        def ok_id(t):
            return is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size)

        for w in self.bad_words_ids:
            _require(isinstance(w, tuple) and len(w) > 0, "bad_words_ids", w, "each entry must be a non-empty "
                     "sequence of token ids, e.g. [[5], [7, 8]]")
            _require(all(ok_id(t) for t in w), "bad_words_ids", w, allowed)
        if self.eos_token_id is not None:
            eos = self.eos_ids
            _require(len(eos) > 0 and all(ok_id(t) for t in eos), "eos_token_id", self.eos_token_id,
                     "need one or more " + allowed)
        if self.pad_token_id is not None:
            _require(ok_id(self.pad_token_id), "pad_token_id", self.pad_token_id, allowed)

    def replace(self, **changes) -> SamplingConfig:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    @classmethod
    def from_string(cls, spec: str, base: SamplingConfig | None = None) -> SamplingConfig:
        """Parse a CLI spec like "do_sample=true,temperature=1.5,top_p=0.95,bad_words_ids=0;1;2;5 6".

        Pairs are `key=value`, separated by commas. Bools: true/false/1/0. bad_words_ids: sequences
        separated by ';' (or '|'), token ids inside a sequence by spaces, so "0;1;2;5 6" bans tokens
        0, 1, 2 and the pair (5, 6); an empty value clears the list. eos_token_id: one id or
        space-separated ids; eos_token_id / pad_token_id accept "none". Keys not given keep `base`'s
        values (default: SamplingConfig()).
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        sources = []  # each pair its own source: a key given twice must say one value (`merge_settings`)
        for item in spec.split(","):
            if not item.strip():
                continue
            key, sep, raw = (s.strip() for s in item.partition("="))
            if key not in valid:
                raise ValueError(f"unknown sampling key {key!r}; valid keys: {', '.join(valid)}")
            if not sep:
                raise ValueError(f"{key}: expected {key}=value, got {item.strip()!r}")
            try:
                sources.append((lambda k, v, item=item: repr(item.strip()), {key: _PARSERS[key](raw)}))
            except ValueError:
                raise ValueError(f"{key}: cannot parse value {raw!r}") from None
        return (base or cls()).replace(**merge_settings(sources))


def _parse_bool(s: str) -> bool:
    table = {"true": True, "1": True, "false": False, "0": False}
    if s.lower() not in table:
        raise ValueError(s)
    return table[s.lower()]


def _parse_ids(s: str) -> tuple[int, ...]:
    ids = tuple(int(t) for t in s.split())
    if not ids:
        raise ValueError(s)
    return ids


def _parse_words(s: str) -> tuple[tuple[int, ...], ...]:
    return tuple(_parse_ids(w) for w in s.replace("|", ";").split(";")) if s else ()


def _parse_eos(s: str):
    if s.lower() == "none":
        return None
    ids = _parse_ids(s)
    return ids[0] if len(ids) == 1 else ids


def _parse_pad(s: str):
    return None if s.lower() == "none" else int(s)


_PARSERS = {
    "do_sample": _parse_bool,
    **{k: int for k in _INT_FIELDS},
    **{k: float for k in _FLOAT_FIELDS},
    "bad_words_ids": _parse_words,
    "eos_token_id": _parse_eos,
    "pad_token_id": _parse_pad,
    "early_stopping": lambda s: "never" if s.lower() == "never" else _parse_bool(s),
    "stop_strings": lambda s: tuple(x for x in s.split("|") if x),
    "choices": lambda s: tuple(x for x in s.split("|") if x),
    "output_scores": _parse_bool,
}


@dataclass(frozen=True)
class Plan:
    """Static: which processors any stream uses. Part of the compiled graph's identity."""

    repetition_penalty: bool = False
    no_repeat_ngram: int = 0  # max n over streams, 0 = off
    bad_words_single: bool = False
    bad_words_multi: int = 0  # max length of a multi-token bad word, 0 = off
    min_new_tokens: bool = False
    any_sample: bool = False
    temperature: bool = False
    top_k: int = 0  # max min(top_k, V) over sampling streams, 0 = off
    top_p: bool = False
    min_p: bool = False
    typical_p: bool = False
    top_k_bounds: bool = False  # every sampling stream has a top_k and none a typical_p: see `draw`
    beams: bool = False  # some stream searches with num_beams > 1 (`gpt2mh.inference.beam`)
    logprobs: bool = False  # some stream keeps its tokens' log-probabilities (output_scores, beams, choices)
    forced: bool = False  # some stream's tokens are given: a choice being scored (`SamplingConfig.choices`)


class Controls(NamedTuple):
    """Per-stream settings as tensors (S streams, V vocab, W multi-token bad words).

    Warper fields hold their "off" value for greedy streams, so `process` needs no do_sample mask.
    """

    do_sample: Tensor  # [S] bool
    temperature: Tensor  # [S] f32, 1 = off
    top_k_index: Tensor  # [S] long: min(k, V) - 1, the k-th largest's index in a top-(plan.top_k); plan.top_k = off
    top_p_cut: Tensor  # [S] f32: HF's `1 - top_p`, cumulative probs <= cut are removed; -1 = off
    min_p: Tensor  # [S] f32, 0 = off
    typical_p: Tensor  # [S] f32 mass, 2 = off
    repetition_penalty: Tensor  # [S] f32, 1 = off
    ngram: Tensor  # [S] long no_repeat_ngram_size, 0 = off
    ban: Tensor  # [S, V] bool single-token bad words (EOS ids excluded, as HF does)
    bad_words: Tensor  # [W, plan.bad_words_multi] long, right-aligned, -1 left padding
    bad_len: Tensor  # [W] long length of each multi-token bad word
    bad_use: Tensor  # [S, W] bool: stream s bans word w
    eos: Tensor  # [S, E] long EOS ids, -1 padding (never matches a token)
    eos_mask: Tensor  # [S, V] bool
    min_new: Tensor  # [S] long min_new_tokens (0 when the stream has no EOS)
    max_new: Tensor  # [S] long
    pad: Tensor  # [S] long
    num_beams: Tensor  # [S] long, 1 = no beam search
    length_penalty: Tensor  # [S] f64 (HF divides by generated_len ** length_penalty computed in double)
    early_stopping: Tensor  # [S] long: 0 False, 1 True, 2 "never"
    beam_keep: Tensor  # [S] long: candidates kept per beam, max(2, 1 + number of EOS ids) (HF)
    forced: Tensor  # [S] bool: the stream's tokens are given (a choice being scored), not drawn


def build_controls(
    configs: list[SamplingConfig], stream_config: list[int] | Tensor, vocab_size: int, device
) -> tuple[Controls, Plan]:
    """Per-stream tensors for one generate call. stream_config[s] = index of the config stream s uses.

    Each config must have pad_token_id set (eos_token_id None means the stream has no EOS).
    """
    V = vocab_size
    which = torch.as_tensor(stream_config, dtype=torch.long).cpu()
    if which.ndim != 1 or which.numel() == 0:
        raise ValueError(f"stream_config must be a non-empty 1-d list of config indices, "
                         f"got shape {tuple(which.shape)}")
    if int(which.min()) < 0 or int(which.max()) >= len(configs):
        raise ValueError(f"stream_config indices must be in [0, {len(configs)}), got {which.tolist()}")
    for i, cfg in enumerate(configs):
        cfg.validate(V)
        if cfg.pad_token_id is None:
            raise ValueError(f"configs[{i}].pad_token_id is None: fill it (e.g. with the model's eos) first")
    used = [configs[i] for i in sorted(set(which.tolist()))]

    def sampled(cfg, on: bool, value, off):
        return value if cfg.do_sample and on else off

    def per_stream(values, dtype):  # one value per config -> [S, ...] on device
        return torch.tensor(values, dtype=dtype)[which].to(device)

    E = max(len(c.eos_ids) for c in configs) or 1
    ban = torch.zeros(len(configs), V, dtype=torch.bool)
    eos_mask = torch.zeros(len(configs), V, dtype=torch.bool)
    multi: dict[tuple[int, ...], int] = {}
    for i, cfg in enumerate(configs):
        eos_mask[i, list(cfg.eos_ids)] = True
        for w in cfg.bad_words_ids:
            if len(w) > 1 and cfg in used:
                multi.setdefault(w, len(multi))
            elif len(w) == 1 and w[0] not in cfg.eos_ids:  # HF drops [eos] from bad_words_ids
                ban[i, w[0]] = True
    Lmax = max((len(w) for w in multi), default=1)
    words = torch.full((len(multi), Lmax), -1, dtype=torch.long)
    use = torch.zeros(len(configs), len(multi), dtype=torch.bool)
    for w, j in multi.items():
        words[j, Lmax - len(w):] = torch.tensor(w)
        use[:, j] = torch.tensor([w in c.bad_words_ids for c in configs])

    sampling = [c for c in used if c.do_sample]
    kmax = max((min(c.top_k, V) for c in sampling), default=0)
    controls = Controls(
        do_sample=per_stream([c.do_sample for c in configs], torch.bool),
        temperature=per_stream([sampled(c, True, c.temperature, 1.0) for c in configs], torch.float32),
        top_k_index=per_stream([sampled(c, c.top_k > 0, min(c.top_k, V) - 1, kmax) for c in configs], torch.long),
        top_p_cut=per_stream([sampled(c, c.top_p < 1, 1 - c.top_p, _TOP_P_OFF) for c in configs], torch.float32),
        min_p=per_stream([sampled(c, True, c.min_p, 0.0) for c in configs], torch.float32),
        typical_p=per_stream([sampled(c, c.typical_p < 1, c.typical_p, _TYPICAL_OFF) for c in configs],
                             torch.float32),
        repetition_penalty=per_stream([c.repetition_penalty for c in configs], torch.float32),
        ngram=per_stream([c.no_repeat_ngram_size for c in configs], torch.long),
        ban=ban[which].to(device),
        bad_words=words.to(device),
        bad_len=torch.tensor([len(w) for w in multi], dtype=torch.long).to(device),
        bad_use=use[which].to(device),
        eos=per_stream([list(c.eos_ids) + [-1] * (E - len(c.eos_ids)) for c in configs], torch.long),
        eos_mask=eos_mask[which].to(device),
        min_new=per_stream([c.min_new_tokens if c.eos_ids else 0 for c in configs], torch.long),
        max_new=per_stream([c.max_new_tokens for c in configs], torch.long),
        pad=per_stream([c.pad_token_id for c in configs], torch.long),
        num_beams=per_stream([c.num_beams for c in configs], torch.long),
        length_penalty=per_stream([float(c.length_penalty) for c in configs], torch.float64),
        early_stopping=per_stream([_EARLY_STOPPING[c.early_stopping] for c in configs], torch.long),
        beam_keep=per_stream([max(2, 1 + len(c.eos_ids)) for c in configs], torch.long),
        forced=per_stream([bool(c.choices) for c in configs], torch.bool),
    )
    plan = Plan(
        repetition_penalty=any(c.repetition_penalty != 1 for c in used),
        no_repeat_ngram=max(c.no_repeat_ngram_size for c in used),
        bad_words_single=bool(ban[which].any()),
        bad_words_multi=max(len(w) for w in multi) if multi else 0,
        min_new_tokens=any(c.min_new_tokens > 0 and c.eos_ids for c in used),
        any_sample=bool(sampling),
        temperature=any(c.temperature != 1 for c in sampling),
        top_k=kmax,
        top_p=any(c.top_p < 1 for c in sampling),
        min_p=any(c.min_p > 0 for c in sampling),
        typical_p=any(c.typical_p < 1 for c in sampling),
        top_k_bounds=bool(sampling) and all(c.top_k > 0 and c.typical_p == 1 for c in sampling),
        beams=any(c.num_beams > 1 for c in used),
        logprobs=any(c.output_scores or c.num_beams > 1 or c.choices for c in used),
        forced=any(c.choices for c in used),
    )
    return controls, plan
