"""Beam search inside the decode step, with transformers 4.57.6's semantics (`GenerationMixin._beam_search`
and its helpers `_get_top_k_continuations`, `_get_running_beams_for_next_iteration`,
`_update_finished_beams`, `_check_early_stop_heuristic`).

A head's beams are streams: an input searching with b beams holds a block of W >= b consecutive
slots (W: the engine's beam width), beam j in slot j of the block; the blocks' row indices are
`blocks` (nb, W). Each block also keeps its best finished hypotheses, best first, one per slot
(`Beams.fin_*`, HF's `sequences` / `beam_scores` / `is_sent_finished`). One call of `beam_step`
advances every block by one token: the accumulated log-probs of all its beams, the top
max(2, 1 + #EOS) x b continuations (or as many drawn without replacement: beam sampling), the best b
that did not stop continue, those that stopped among the first b enter the finished set, and the
block ends when it cannot improve (early_stopping) or reaches max_new_tokens. It returns, per row,
the row each new beam continues (`src`): the caller gathers history and KV-cache rows by it, inside
the step. Ranks beyond a block's own b (W > b) are -inf and never chosen, so a block gets what HF
gives its input searched alone with num_beams=b.

HF pads a batch's prompts and counts lengths from the padded prompt; generated lengths (what the
length penalty uses) are the same for every row, so per-input blocks give the batch's results.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

_NEG_INF = float("-inf")
_BIG = -1.0e9  # HF's "very large negative" (finite: an addition, not a mask)


class Beams(NamedTuple):
    """Per slot: its running beam's score and its block's finished hypotheses (slot j = the j-th best)."""
    score: Tensor      # (S,) f32: the running beam's sum of processed log-probs
    fin_tok: Tensor    # (S, G) long: a finished hypothesis' generated ids (its EOS included)
    fin_logp: Tensor   # (S, G) f32: their processed log-probs
    fin_len: Tensor    # (S,) long
    fin_score: Tensor  # (S,) f32: sum log-probs / len ** length_penalty; -1e9 when empty
    fin_done: Tensor   # (S,) bool: HF's is_sent_finished
    improvable: Tensor  # (S,) bool: HF's is_early_stop_heuristic_unsatisfied, the same for a block


def empty_beams(S: int, G: int, device) -> Beams:
    return Beams(torch.zeros(S, device=device), torch.zeros(S, G, dtype=torch.long, device=device),
                 torch.zeros(S, G, device=device), torch.zeros(S, dtype=torch.long, device=device),
                 torch.full((S,), _BIG, device=device), torch.zeros(S, dtype=torch.bool, device=device),
                 torch.ones(S, dtype=torch.bool, device=device))


def first_scores(num_beams: Tensor, W: int) -> Tensor:
    """(n, W) initial running scores of n new blocks: 0 for beam 0, -1e9 for the others (HF: only
    beam 0's continuations count at the first step), -inf past the block's own num_beams."""
    j = torch.arange(W, device=num_beams.device)
    s = torch.where(j == 0, 0.0, _BIG).expand(num_beams.numel(), W)
    return torch.where(j < num_beams[:, None], s, _NEG_INF)


class Step(NamedTuple):
    tok: Tensor         # (nb, W) each new beam's token
    src: Tensor         # (nb, W) the row (index into the caller's rows) each new beam continues
    tok_logp: Tensor    # (nb, W) the token's processed log-prob
    beams: Beams        # per row of blocks, flattened (nb * W)
    done: Tensor        # (nb,) bool: the block's search has ended


def beam_step(lp: Tensor, blocks: Tensor, n_gen: Tensor, history_gen: Tensor, logp_gen: Tensor, beams: Beams,
              eos: Tensor, max_new: Tensor, num_beams: Tensor, length_penalty: Tensor, early: Tensor,
              keep: Tensor, do_sample: Tensor, gumbel: Tensor | None) -> Step:
    """One token for every block. lp (M, V): each row's processed (and, sampling, warped) log-probs;
    blocks (nb, W) row indices; per row (M,): n_gen (tokens generated so far, the same in a block) and
    the settings; history_gen / logp_gen (M, G): generated ids / log-probs so far; beams: per row;
    do_sample (M,) bool and gumbel (M, V) -log Exp(1) noise (None: no block samples): beam sampling
    takes the top-k of the perturbed accumulated scores, which draws k without replacement from their
    softmax in the order drawn, as HF's multinomial does."""
    nb, W = blocks.shape
    V = lp.size(1)
    lead = blocks[:, 0]  # (nb,) the settings of a block are its beam 0's
    b, n = num_beams[lead], n_gen[lead]  # (nb,)
    active = torch.arange(W, device=lp.device) < b[:, None]  # (nb, W)
    score = torch.where(active, beams.score[blocks], _NEG_INF)  # (nb, W); a slot past b holds no beam
    acc = (lp[blocks] + score[..., None]).view(nb, W * V)  # (nb, W*V) accumulated
    Kmax = max(2, 1 + eos.size(1)) * W  # eos (M, E): each row's EOS ids, -1 padding
    pick = acc.topk(Kmax).indices
    if gumbel is not None:
        drawn = (acc + gumbel[blocks].view(nb, W * V)).topk(Kmax).indices
        pick = torch.where(do_sample[lead][:, None], drawn, pick)
    vals = acc.gather(1, pick)  # (nb, Kmax) HF's topk_log_probs
    beam, tok = pick // V, pick % V  # (nb, Kmax)
    rank = torch.arange(Kmax, device=lp.device)
    valid = rank < (keep[lead] * b)[:, None]  # HF keeps max(2, 1 + #EOS) * num_beams candidates
    length = n + 1  # generated tokens with the new one
    hits = (tok[:, :, None] == eos[lead][:, None, :]).any(-1) | (length >= max_new[lead])[:, None]  # (nb, Kmax)

    # the running beams: the best b candidates that did not stop
    run = torch.where(valid, vals + hits.to(torch.float32) * _BIG, _NEG_INF)
    nxt = run.topk(W).indices  # (nb, W)
    new_score = torch.where(active, run.gather(1, nxt), _NEG_INF)
    new_src = blocks.gather(1, beam.gather(1, nxt))  # (nb, W) rows
    new_tok = tok.gather(1, nxt)

    # the candidates' sequences: their beam's generated ids with the new token at column n
    src_rows = blocks.gather(1, beam)  # (nb, Kmax)
    col = torch.arange(history_gen.size(1), device=lp.device) == n[:, None, None]  # (nb, 1, G)
    cand_tok = torch.where(col, tok[..., None], history_gen[src_rows])  # (nb, Kmax, G)
    tok_lp = lp[src_rows, tok]  # (nb, Kmax) the token's own processed log-prob
    cand_logp = torch.where(col, tok_lp[..., None], logp_gen[src_rows])

    # the finished hypotheses: merge those that just stopped among the first b with the kept ones
    lpen = length_penalty[lead]
    did = hits & (rank < b[:, None]) & valid
    fin_score = beams.fin_score[blocks]  # (nb, W)
    fin_done = beams.fin_done[blocks] & active
    cand = vals / (length.double() ** lpen).float()[:, None]
    full = fin_done.eq(active).all(-1) & (early[lead] == 1)  # every one of the b slots holds a hypothesis
    cand = cand + full[:, None].to(torch.float32) * _BIG
    cand = cand + (~beams.improvable[lead])[:, None].to(torch.float32) * _BIG
    cand = cand + (~did).to(torch.float32) * _BIG
    cand = torch.where(valid, cand, _NEG_INF)
    fin_score = torch.where(active, fin_score, _NEG_INF)
    merged = torch.cat([fin_score, cand], 1).topk(W).indices  # (nb, W) HF's topk over finished + candidates

    def top(old, new):  # (nb, W, ...) and (nb, Kmax, ...) -> the merged best W
        idx = merged.view(nb, W, *[1] * (old.dim() - 2)).expand(nb, W, *old.shape[2:])
        return torch.cat([old, new], 1).gather(1, idx)

    fin = Beams(
        new_score.reshape(-1),
        top(beams.fin_tok[blocks], cand_tok).reshape(nb * W, -1),
        top(beams.fin_logp[blocks], cand_logp).reshape(nb * W, -1),
        top(beams.fin_len[blocks], length[:, None].expand(nb, Kmax)).reshape(-1),
        top(fin_score, cand).reshape(-1),
        top(fin_done, did).reshape(-1),
        beams.improvable[blocks].reshape(-1),
    )

    # can the block still improve? (HF's heuristic, after the step: cur_len is now prompt + length)
    fin_score_b = fin.fin_score.view(nb, W)
    fin_done_b = fin.fin_done.view(nb, W) & active
    best_len = torch.where((early[lead] == 2) & (lpen > 0), max_new[lead], length)
    best = new_score[:, 0] / (best_len.double() ** lpen).float()  # (nb,)
    worst = torch.where(active, fin_score_b, float("inf")).amin(-1)  # (nb,) min over the b slots
    worst_each = torch.where(fin_done_b, worst[:, None], _BIG)  # (nb, W)
    improvable = beams.improvable[lead] & ((best[:, None] > worst_each) & active).any(-1)
    all_done = (fin_done_b == active).all(-1)
    done = ~improvable | (all_done & (early[lead] == 1)) | (hits | ~valid).all(-1)
    fin = fin._replace(improvable=improvable[:, None].expand(nb, W).reshape(-1))
    return Step(new_tok, new_src, lp[new_src, new_tok], fin, done)
