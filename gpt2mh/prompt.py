"""The prompt format, in one place: training, evaluation, scoring and generation all use it.

An example is the input encoded as rinna users encode it (`tokenizer.encode(text)`, which ends in
`</s>`), followed by a head's target and `</s>`. Generation feeds the input part and each head
continues it; the head's `</s>` ends its stream."""
from __future__ import annotations

from typing import Sequence

import torch


def check_vocab(tokenizer, model) -> None:
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'model_file', '')} has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {model.config.vocab_size}: they do not belong together"
        )


def encode_input(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_eos=True)  # ... </s>


def encode_target(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_eos=True)  # the head's answer, then </s> to stop


def check_ids(ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Token ids must be an integer tensor with every id in [0, vocab_size): an embedding lookup would
    otherwise fail with an IndexError that names nothing."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.LongTensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero()
    if len(bad):
        where = tuple(bad[0].tolist())
        raise ValueError(f"{name}{list(where)} = {int(ids[where])} is not a token id of this model "
                         f"(vocab_size={vocab_size}); {len(bad)} id(s) out of range")


def encode_prompts(tokenizer, texts: Sequence[str], model) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) of the inputs, ready for `generate`.

    An empty string is a valid input: it encodes to [</s>], a one-token prompt."""
    check_vocab(tokenizer, model)
    if isinstance(texts, str) or not len(texts):
        raise ValueError("expected a non-empty list of input strings")
    input_ids, mask = tokenizer.batch_encode(list(texts), add_eos=True)  # as encode_input
    n = model.config.n_positions
    for i, length in enumerate(mask.sum(1).tolist()):
        if length >= n:  # the output needs room too: at least one new (or target) token
            raise ValueError(f"input {i} is {length} tokens long; the model's context is n_positions={n} tokens, "
                             f"the output included: shorten the input")
    return input_ids, mask
