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

import torch
import torch.nn.functional as F
from torch import Tensor

from .controls import Controls, Plan

_NEG_INF = float("-inf")
_F32_MAX = torch.finfo(torch.float32).max


def divide(scores: Tensor, t: Tensor) -> Tensor:
    """scores / t per row (temperature), t a normal positive float32 [S, 1]. Where a finite score's
    quotient leaves float32 (a tiny t), that row is divided after subtracting its max instead: the same
    distribution (softmax, top-k/p, min-p and typical-p are shift-invariant), now finite, tending to
    greedy as t -> 0. Rows that stay finite get exactly HF's scores / t."""
    q = scores / t
    overflow = (q.isinf() & scores.isfinite()).any(-1, keepdim=True)
    shifted = (scores - scores.amax(-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)) / t
    return torch.where(overflow, shifted, q)


def _mask(ids: Tensor, V: int) -> Tensor:
    """[S, K] token ids -> [S, V] bool presence. Id V means "nothing": it lands in a dropped dump column."""
    return torch.zeros(ids.shape[0], V + 1, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)[:, :V]


def _ngram_bans(history: Tensor, cur_len: Tensor, n: Tensor, nmax: int, V: int) -> Tensor:
    """NoRepeatNGram: token at position t is banned if the n-1 tokens before t equal the last n-1.
    Padding (-1) matches nothing, so an n-gram never reaches into it."""
    S, L = history.shape
    pos = torch.arange(L, device=history.device)
    m = (n - 1)[:, None]  # prefix length per stream, [S, 1]
    hit = (pos >= m) & (pos < cur_len[:, None]) & (n > 0)[:, None] & (history >= 0)  # [S, L]: n-grams ending at t
    for d in range(1, nmax):  # compare history[t - d] with history[cur_len - d]
        last = history.gather(1, (cur_len - d).clamp(min=0)[:, None])  # [S, 1]
        same = (history.roll(d, 1) == last) & (last >= 0)  # roll's wrap-around only hits t < d <= m
        hit = hit & ((m < d) | same)
    return torch.where(hit, history, V)  # [S, L]


def _bad_word_bans(history: Tensor, cur_len: Tensor, c: Controls, V: int) -> Tensor:
    """Multi-token bad words: ban the last token of each word whose prefix ends the history."""
    P = c.bad_words.shape[1] - 1
    idx = cur_len[:, None] - P + torch.arange(P, device=history.device)  # [S, P]
    tail = torch.where(idx >= 0, history.gather(1, idx.clamp(min=0)), -2)  # the last P tokens; -2 before the start
    prefix = c.bad_words[:, :-1]  # [W, P], -1 = no token there
    match = ((tail[:, None, :] == prefix) | (prefix < 0)).all(-1)  # [S, W]; padding (-1) matches no token
    own = ((history >= 0) & (torch.arange(history.shape[1], device=history.device) < cur_len[:, None])).sum(1, keepdim=True)
    hit = match & c.bad_use & (c.bad_len <= own)  # HF skips words longer than the context (the row's own tokens)
    return torch.where(hit, c.bad_words[:, -1], V)  # [S, W]


def processors(scores: Tensor, history: Tensor, cur_len: Tensor, step: Tensor, c: Controls, plan: Plan) -> Tensor:
    """The HF processors (repetition_penalty .. min_new_tokens), not the warpers. scores [S, V] f32.

    history [S, L] long: history[s, :cur_len[s]] holds stream s's tokens so far (its prompt, then its
    generated tokens), like HF's input_ids of the unpadded row; -1 marks padding, which no processor
    sees (a padded row gets what it gets alone); later positions are ignored. cur_len, step: [S]
    (or 0-d) long tensors; step = tokens the stream has generated so far (for min_new_tokens).
    """
    V = scores.shape[1]
    cur_len = cur_len.expand(scores.shape[0])  # one length for every stream (0-d) or one each
    if plan.repetition_penalty:
        seen = (torch.arange(history.shape[1], device=history.device) < cur_len[:, None]) & (history >= 0)
        present = _mask(torch.where(seen, history, V), V)
        pen = c.repetition_penalty[:, None]
        penalised = torch.where(scores < 0, scores * pen, scores / pen).clamp(-_F32_MAX, _F32_MAX)
        scores = torch.where(present, penalised, scores)  # a quotient beyond float32 is held at its max
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


def warp(scores: Tensor, c: Controls, plan: Plan) -> Tensor:
    if plan.temperature:
        scores = divide(scores, c.temperature[:, None])
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
    return sample(warp(scores, c, plan), noise, c)


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
    x = divide(scores, c.temperature[:, None]) if plan.temperature else scores
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


# ---- counter-based noise: each stream's random numbers depend on its own key and step only --------------
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), with no int64 overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def hash32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def stream_noise(key: Tensor, step: Tensor, width: int) -> Tensor:
    """(S, width) Exponential(1) noise for `draw`: a hash of (stream key, step, column), so a stream's
    sample depends on its own key (seed, input, head, return sequence) and step, never on which
    streams share the batch or in which slot it runs. key, step: (S,) long in [0, 2**32)."""
    col = torch.arange(width, device=key.device)
    h = hash32(key ^ hash32((step * _GOLDEN) & _M32))  # (S,)
    h = hash32((h[:, None] + col * _GOLDEN) & _M32)  # (S, width)
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (0, 1), 24 bits: exact in fp32
    return -torch.log(u)


def stream_key(seed: int, row: int, head: int, r: int) -> int:
    """The 32-bit noise key of one stream (host side): seed, input row, head index, return sequence."""
    h = 0
    for v in (seed, row, head, r):
        h = _hash32_int((h ^ (v & _M32)) + ((v >> 32) & _M32) * _GOLDEN)
    return h


def _hash32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)
