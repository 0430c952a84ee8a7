"""Sampling controls: HF-equivalent logits processors, one setting per stream, compile-clean.

A generate call runs S streams (prompt x head x return sequence). Each stream carries its own
settings as tensors (`Controls`), so heads with different configs share one compiled decode step;
`Plan` holds only static flags and picks which processors exist in that graph. `process` and `sample`
never sync with the host, never branch on tensor values and never make data-dependent shapes.

Order and maths follow transformers 4.57.6: `GenerationMixin._get_logits_processor`
(generation/utils.py:1141-1192 processors, 1251-1284 warpers, sampling only) and the classes in
generation/logits_process.py:
    repetition_penalty -> no_repeat_ngram -> bad_words -> min_new_tokens (EOS ban)
    -> [do_sample streams only] temperature -> top_k -> top_p -> min_p -> typical_p
A setting that is "off" is encoded as a value that makes its step an exact no-op (x / 1.0,
x < -inf, cumulative prob <= -1, ...), so such streams get bit-for-bit what HF gives without that
processor. top_p and typical_p sort exactly the tensors HF sorts, so even tied tokens at a cut fall
the same way in eager mode (a compiled sort may order ties differently).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

_INT_FIELDS = ("top_k", "no_repeat_ngram_size", "min_new_tokens", "max_new_tokens", "num_return_sequences")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty")
_TYPICAL_OFF = 2.0  # typical mass > 1: every cumulative prob is below it, so nothing is removed
_TOP_P_OFF = -1.0  # cut below any cumulative prob: nothing is removed
_NEG_INF = float("-inf")


def _tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else x


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range: {allowed}")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


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

    def __post_init__(self):
        words = self.bad_words_ids if self.bad_words_ids is not None else ()
        object.__setattr__(self, "bad_words_ids", tuple(_tuple(w) for w in _tuple(words)))
        object.__setattr__(self, "eos_token_id", _tuple(self.eos_token_id))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def validate(self, vocab_size: int | None = None) -> None:
        for name in _INT_FIELDS:
            _require(_is_int(getattr(self, name)), name, getattr(self, name), "must be an integer")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            _require(isinstance(v, numbers.Real) and not isinstance(v, bool), name, v, "must be a number")
        _require(isinstance(self.do_sample, bool), "do_sample", self.do_sample, "must be True or False")
        if self.do_sample:  # `not x > 0` also catches NaN
            _require(self.temperature > 0, "temperature", self.temperature,
                     "must be > 0 with do_sample=True (use do_sample=False for greedy)")
        for name in ("temperature", "repetition_penalty"):  # inf / inf = NaN: bans would be lost
            _require(math.isfinite(getattr(self, name)), name, getattr(self, name), "must be a finite number")
        _require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 = off)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1] (1 = off)")
        _require(0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1] (0 = off)")
        _require(0 < self.typical_p <= 1, "typical_p", self.typical_p, "must be in (0, 1] (1 = off)")
        _require(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty,
                 "must be > 0 (1 = off)")
        _require(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", self.no_repeat_ngram_size,
                 "must be >= 0 (0 = off)")
        _require(self.num_return_sequences >= 1, "num_return_sequences", self.num_return_sequences, "must be >= 1")
        _require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        _require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", self.min_new_tokens,
                 f"must be in [0, max_new_tokens={self.max_new_tokens}]")
        allowed = "token ids must be integers >= 0" + (f" and < vocab_size={vocab_size}" if vocab_size else "")

        def ok_id(t):
            return _is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size)

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
        changes = {}
        for item in spec.split(","):
            if not item.strip():
                continue
            key, sep, raw = (s.strip() for s in item.partition("="))
            if key not in valid:
                raise ValueError(f"unknown sampling key {key!r}; valid keys: {', '.join(valid)}")
            if not sep:
                raise ValueError(f"{key}: expected {key}=value, got {item.strip()!r}")
            try:
                changes[key] = _PARSERS[key](raw)
            except ValueError:
                raise ValueError(f"{key}: cannot parse value {raw!r}") from None
        return (base or cls()).replace(**changes)


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
    )
    return controls, plan


def _mask(ids: Tensor, V: int) -> Tensor:
    """[S, K] token ids -> [S, V] bool presence. Id V means "nothing": it lands in a dropped dump column."""
    return torch.zeros(ids.shape[0], V + 1, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)[:, :V]


def _ngram_bans(history: Tensor, cur_len: Tensor, n: Tensor, nmax: int, V: int) -> Tensor:
    """NoRepeatNGram: token at position t is banned if the n-1 tokens before t equal the last n-1."""
    S, L = history.shape
    pos = torch.arange(L, device=history.device)
    m = (n - 1)[:, None]  # prefix length per stream, [S, 1]
    hit = (pos >= m) & (pos < cur_len) & (n > 0)[:, None]  # [S, L]: complete n-grams ending at t
    for d in range(1, nmax):  # compare history[t - d] with history[cur_len - d]
        last = history.gather(1, (cur_len - d).clamp(min=0).expand(S, 1))  # [S, 1]
        hit = hit & ((m < d) | (history.roll(d, 1) == last))  # roll's wrap-around only hits t < d <= m
    return torch.where(hit, history, V)  # [S, L]


def _bad_word_bans(history: Tensor, cur_len: Tensor, c: Controls, V: int) -> Tensor:
    """Multi-token bad words: ban the last token of each word whose prefix ends the history."""
    P = c.bad_words.shape[1] - 1
    idx = (cur_len - P + torch.arange(P, device=history.device)).clamp(min=0)
    tail = history.index_select(1, idx)  # [S, P], the last P tokens
    prefix = c.bad_words[:, :-1]  # [W, P], -1 = no token there
    match = ((tail[:, None, :] == prefix) | (prefix < 0)).all(-1)  # [S, W]
    hit = match & c.bad_use & (c.bad_len <= cur_len)  # HF skips words longer than the context
    return torch.where(hit, c.bad_words[:, -1], V)  # [S, W]


def process(scores: Tensor, history: Tensor, cur_len: Tensor, step: Tensor, c: Controls, plan: Plan) -> Tensor:
    """Apply the HF processors, then (sampling streams only) the warpers. scores [S, V] f32."""
    scores = processors(scores, history, cur_len, step, c, plan)
    return _warp(scores, c, plan) if plan.any_sample else scores


def processors(scores: Tensor, history: Tensor, cur_len: Tensor, step: Tensor, c: Controls, plan: Plan) -> Tensor:
    """The HF processors (repetition_penalty .. min_new_tokens), not the warpers. scores [S, V] f32.

    history [S, L] long: history[:, :cur_len] holds each stream's tokens so far (prompt with its left
    padding, then generated tokens; all ids in [0, V)), like HF's input_ids; later positions are
    ignored. cur_len, step: 0-d long tensors (not ints, so new values do not recompile); step =
    tokens generated so far (for min_new_tokens).
    """
    V = scores.shape[1]
    if plan.repetition_penalty:
        seen = torch.arange(history.shape[1], device=history.device) < cur_len
        present = _mask(torch.where(seen, history, V), V)
        pen = c.repetition_penalty[:, None]
        scores = torch.where(present, torch.where(scores < 0, scores * pen, scores / pen), scores)
    # no_repeat_ngram, bad words and the min_new_tokens EOS ban are consecutive -inf fills: one mask
    ids = []
    if plan.no_repeat_ngram:
        ids.append(_ngram_bans(history, cur_len, c.ngram, plan.no_repeat_ngram, V))
    if plan.bad_words_multi:
        ids.append(_bad_word_bans(history, cur_len, c, V))
    ban = _mask(torch.cat(ids, 1), V) if ids else None
    if plan.bad_words_single:
        ban = c.ban if ban is None else ban | c.ban
    if plan.min_new_tokens:
        eos = c.eos_mask & (step < c.min_new)[:, None]
        ban = eos if ban is None else ban | eos
    if ban is not None:
        scores = scores.masked_fill(ban, _NEG_INF)
    return scores


def _warp(scores: Tensor, c: Controls, plan: Plan) -> Tensor:
    if plan.temperature:
        scores = scores / c.temperature[:, None]
    if plan.top_k:  # k-th largest of each stream from one top-(max k); the extra -inf column is "off"
        top = F.pad(scores.topk(plan.top_k).values, (0, 1), value=_NEG_INF)
        scores = scores.masked_fill(scores < top.gather(1, c.top_k_index[:, None]), _NEG_INF)
    if plan.top_p:  # sort exactly what HF sorts, so tied tokens at the cut fall the same way
        asc, order = scores.sort(-1)
        drop = asc.softmax(-1).cumsum(-1) <= c.top_p_cut[:, None]
        drop[:, -1] = False  # min_tokens_to_keep=1: the most likely token stays
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), _NEG_INF)
    if plan.min_p:  # the top token has probs == top >= min_p * top, so it always stays
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < c.min_p[:, None] * probs.amax(-1, keepdim=True), _NEG_INF)
    if plan.typical_p:
        logp = scores.log_softmax(-1)
        ent = -(logp * logp.exp()).nansum(-1, keepdim=True)
        shifted, order = (-logp - ent).abs().sort(-1)
        cum = scores.gather(1, order).softmax(-1).cumsum(-1)
        last = (cum < c.typical_p[:, None]).sum(1, keepdim=True).clamp(max=scores.shape[1] - 1)
        drop = shifted > shifted.gather(1, last)  # never the first: HF's min_tokens_to_keep=1 fill is moot
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), _NEG_INF)
    return scores


def sample(scores: Tensor, noise: Tensor, c: Controls) -> Tensor:
    """Next token per stream: exact draw from softmax(scores) for sampling streams, argmax otherwise.

    noise [S, V] ~ Exponential(1), drawn by the caller outside the graph with a torch.Generator:
    argmax(p / E) is a sample from p (the exponential race: E_i / p_i ~ Exp(p_i), smallest wins).
    """
    probs = scores.softmax(-1)
    race = torch.where(probs > 0, probs / noise, 0.0)  # p = 0 never wins, even if E = 0 (0/0 = nan)
    return torch.where(c.do_sample, race.argmax(-1), scores.argmax(-1))


def noise_width(plan: Plan, vocab_size: int) -> int:
    """Columns of Exponential(1) noise `draw` takes per stream: the top-k candidates, the tied group
    and its pick (plan.top_k_bounds), else one per vocab entry."""
    return plan.top_k + 2 if plan.top_k_bounds else vocab_size


def draw(scores: Tensor, noise: Tensor | None, c: Controls, plan: Plan) -> Tensor:
    """Next token per stream from `processors`' scores: the warpers, then `sample`; argmax for greedy
    streams (and for all streams when noise is None: no stream samples).

    noise [S, noise_width(plan, V)]. When top-k bounds every sampling stream, only its candidates
    are read, weighted and drawn (`_sample_top_k`): no [S, V] noise and no [S, V] sort."""
    if noise is None:
        return scores.argmax(-1)
    if plan.top_k_bounds:
        return _sample_top_k(scores, noise, c, plan)
    return sample(_warp(scores, c, plan), noise, c)


def _sample_top_k(scores: Tensor, noise: Tensor, c: Controls, plan: Plan) -> Tensor:
    """Exact draw from HF's temperature -> top_k -> top_p -> min_p filtered softmax, read from the
    top-(plan.top_k) candidates only. noise [S, K + 2] ~ Exponential(1), K = plan.top_k.

    HF keeps every token >= t, the k-th largest: the candidates above t, plus all m tokens equal to t
    (m may exceed what fits in the K candidates when scores tie). The m tied tokens are one group of
    weight (survivors) * exp(t) in the race (min of m Exp(1) is Exp(m)); if it wins, one of the m is
    picked uniformly. Ascending, the group comes first, so top-p cuts j of its members before any
    candidate: which j HF cuts depends on its (unstable) sort, here each tied token is equally likely.
    Weights are exp(score - max), unnormalised: top-p compares against cut * total, min-p against
    min_p (the top token's weight is 1)."""
    x = scores / c.temperature[:, None] if plan.temperature else scores
    K = plan.top_k
    vals, idx = x.topk(K)  # (S, K) descending
    t = F.pad(vals, (0, 1), value=_NEG_INF).gather(1, c.top_k_index[:, None])  # (S, 1); -inf for greedy streams
    counts, chunks = _chunk_counts(x == t)
    m = counts[:, -1:].float()  # (S, 1) tokens equal to t
    top = vals[:, :1].nan_to_num(0.0, 0.0, 0.0)  # (S, 1); a dead row (all -inf) gets weights 0, not NaN
    w = torch.where(vals > t, (vals - top).exp(), 0.0)  # (S, K) candidates above t
    wt = (t - top).exp()  # (S, 1) one tied token; 0 when t = -inf
    keep_all = (w[:, :1] == 0).float()  # no candidate above t: the group holds the top token, keep one
    r = m
    if plan.top_p:  # HF: drop where the ascending cumulative prob <= cut, never the top token
        cut = c.top_p_cut[:, None] * (w.sum(-1, keepdim=True) + m * wt)
        j = torch.where(wt > 0, (cut / wt).floor(), 0.0).clamp(min=0.0)
        r = m - torch.minimum(j, m - keep_all)
        above = m * wt + w.flip(-1).cumsum(-1).flip(-1)  # (S, K) ascending cumulative mass at each candidate
        drop = above <= cut
        drop[:, 0] = False
        w = w.masked_fill(drop, 0.0)
    if plan.min_p:  # HF: drop where prob < min_p * top prob, i.e. weight < min_p
        w = w.masked_fill(w < c.min_p[:, None], 0.0)
        wt = wt.masked_fill(wt < c.min_p[:, None], 0.0)
    weights = torch.cat([w, r * wt], 1)  # (S, K + 1)
    race = torch.where(weights > 0, weights / noise[:, :-1], 0.0)
    win = race.argmax(-1, keepdim=True)  # (S, 1); K = the tied group
    pick = (noise[:, -1:].neg().exp() * m).floor().clamp(max=m - 1)  # (S, 1) uniform in [0, m): exp(-E) ~ U
    member = _nth_true(counts, chunks, pick.long() + 1).clamp(max=x.shape[1] - 1)  # the (pick + 1)-th tied token
    tok = torch.where(win < K, idx.gather(1, win.clamp(max=K - 1)), member)[:, 0]
    return torch.where(c.do_sample, tok, scores.argmax(-1))


_CHUNK = 256  # columns per chunk in _chunk_counts: a [S, V] cumsum costs ~10 vocab-wide passes on CPU


def _chunk_counts(mask: Tensor) -> tuple[Tensor, Tensor]:
    """mask (S, V) bool -> (cumulative True count per chunk of _CHUNK columns (S, n), the chunks (S, n, _CHUNK))."""
    S, V = mask.shape
    n = -(-V // _CHUNK)
    chunks = F.pad(mask, (0, n * _CHUNK - V)).view(S, n, _CHUNK)
    return chunks.sum(-1).cumsum(-1), chunks


def _nth_true(counts: Tensor, chunks: Tensor, k: Tensor) -> Tensor:
    """(S, 1) column of the k-th True per row (k >= 1, (S, 1) long), from `_chunk_counts`."""
    c = torch.searchsorted(counts, k).clamp(max=counts.shape[1] - 1)  # (S, 1) the chunk that holds it
    before = torch.where(c > 0, counts.gather(1, (c - 1).clamp(min=0)), 0)
    inside = chunks.gather(1, c[:, :, None].expand(-1, 1, chunks.shape[2]))[:, 0].cumsum(-1)  # (S, _CHUNK)
    return c * chunks.shape[2] + torch.searchsorted(inside, k - before)


def has_nonfinite(scores: Tensor) -> Tensor:
    """[S] bool: True where a row holds a NaN or +inf (unusable; the caller raises outside the graph)."""
    return (scores.isnan() | scores.isposinf()).any(-1)
