"""Scoring: the log-likelihood of given continuations under every head (heads as rankers/classifiers)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..inputs import check_vocab, encode_prompts, encode_target, prompt_batch
from ..model import GPT2, padded_causal_mask, position_ids_from_mask


@torch.no_grad()
def score(model: GPT2, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
          target_ids: torch.Tensor, target_mask: torch.Tensor | None = None,
          heads: Sequence[str] | None = None) -> torch.Tensor:
    """Sum of log p(target | prompt) per head and row: (N, B).

    input_ids (B, T) left-padded prompts; target_ids (B, U) right-padded continuations. The trunk
    runs once; head logits are computed only at the positions that predict a target token, all
    heads in one batched matmul."""
    V = model.config.vocab_size
    # Any padding side in, left-padded prompts and right-padded continuations out (see gpt2mh.inputs).
    input_ids, attention_mask = prompt_batch(input_ids, attention_mask, V)
    target_ids, target_mask = prompt_batch(target_ids, target_mask, V, side="right", allow_empty_rows=True,
                                           name="target_ids", mask_name="target_mask")
    B, T = input_ids.shape
    if T == 0:
        raise ValueError("input_ids is empty (length 0): a continuation is scored after a prompt of at least one token")
    if target_ids.size(0) != B:
        raise ValueError(f"{B} prompts but {target_ids.size(0)} continuations")
    if T + target_ids.size(1) > model.config.n_positions:
        raise ValueError(f"prompt + continuation = {T + target_ids.size(1)} tokens exceeds n_positions={model.config.n_positions}")
    dev = model.device
    ids = torch.cat([input_ids, target_ids], 1).to(dev)  # (B, T+U)
    mask = torch.cat([attention_mask, target_mask], 1).to(dev)
    idx = model.head_index(heads)
    # (N, C, V), or their int8 form (model.quantize); first, as it checks the int8 trunk before it is used
    sel = model.head_weights(idx)
    was_training = model.training
    model.eval()  # scores are a property of the weights: no dropout, even mid fine-tune
    try:
        h = model.hidden(ids, position_ids_from_mask(mask), padded_causal_mask(mask))  # (B, T+U, C)
    finally:
        model.train(was_training)
    rows, cols = target_mask.to(dev).nonzero(as_tuple=True)  # target tokens, (M,)
    h_sel = h[rows, T + cols - 1]  # the hidden state that predicts each target token, (M, C)
    logp = F.log_softmax(model.head_logits(h_sel, sel).float(), -1)  # (N, M, V)
    tok_logp = logp.gather(-1, target_ids.to(dev)[rows, cols].expand(len(idx), -1)[..., None])[..., 0]  # (N, M)
    return torch.zeros(len(idx), B, device=dev).index_add_(1, rows, tok_logp)


def score_text(model: GPT2, tokenizer, inputs: Sequence[str], continuations: Sequence[str],
               heads: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Strings in (one continuation per input), per head the log-likelihoods out, in the training format."""
    check_vocab(tokenizer, model)
    if isinstance(inputs, str) != isinstance(continuations, str):
        raise TypeError("score_text takes one continuation per input: both strings, or both lists of strings "
                        f"(got {type(inputs).__name__} and {type(continuations).__name__})")
    if isinstance(inputs, str):  # one pair (not its characters)
        inputs, continuations = [inputs], [continuations]
    inputs, continuations = list(inputs), list(continuations)
    if len(inputs) != len(continuations):
        raise ValueError(f"{len(inputs)} inputs but {len(continuations)} continuations")
    input_ids, mask = encode_prompts(tokenizer, inputs, model)
    targets = [encode_target(tokenizer, c) for c in continuations]
    U = max(len(t) for t in targets)
    target_ids = torch.full((len(targets), U), tokenizer.pad_id, dtype=torch.long)
    target_mask = torch.zeros(len(targets), U, dtype=torch.long)
    for i, t in enumerate(targets):
        target_ids[i, : len(t)] = torch.tensor(t)
        target_mask[i, : len(t)] = 1
    out = score(model, input_ids, mask, target_ids, target_mask, heads)
    names = [model.head_names[i] for i in model.head_index(heads)]
    return {name: out[n].tolist() for n, name in enumerate(names)}
