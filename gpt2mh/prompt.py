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


def encode_prompts(tokenizer, texts: Sequence[str], model) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) of the inputs, ready for `generate`."""
    check_vocab(tokenizer, model)
    if isinstance(texts, str) or not len(texts):
        raise ValueError("expected a non-empty list of input strings")
    return tokenizer.batch_encode(list(texts), add_eos=True, max_length=model.config.n_positions)  # as encode_input
