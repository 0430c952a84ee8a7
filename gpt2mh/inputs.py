"""Token-id inputs as users pass them -> the one layout generation and scoring compute with.

Accepted: torch tensors, numpy arrays (any integer dtype, uint16 included), (nested) lists of ints, an
HF `BatchEncoding` / dict with "input_ids" (and "attention_mask"); 1-D for one row. Padding may sit on
either side, or anywhere (`attention_mask` 0 marks it): each row's real tokens are moved together,
in order, to the side the computation needs (prompts: left padding, so the last real token is at
T-1; continuations: right padding). Columns that are padding in every row are dropped. Since the
positions and the attention come from the mask alone, this gives exactly what the unpadded rows give.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Sequence

import torch


def _tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if type(x).__module__.startswith("numpy"):
        import numpy as np

        a = np.asarray(x)
        if a.dtype.kind in "iu":  # torch has no uint16/uint32/uint64 kernels for comparisons
            if a.size and (int(a.max()) > torch.iinfo(torch.long).max):
                raise ValueError(f"{name} holds the value {int(a.max())}, too large for a token id")
            return torch.from_numpy(a.astype(np.int64))
        if a.dtype.kind == "b":
            return torch.from_numpy(a)
        raise TypeError(f"{name} must hold integer token ids, got a numpy array of dtype {a.dtype}")
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} is a {type(x).__name__}, not token ids: encode text with the tokenizer first "
                        f"(or use generate_text / score_text, which take strings)")
    if isinstance(x, (list, tuple)):
        rows = list(x)
        if rows and all(isinstance(r, (list, tuple)) or hasattr(r, "tolist") for r in rows):
            rows = [r.tolist() if hasattr(r, "tolist") else list(r) for r in rows]
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise ValueError(f"{name}: rows have different lengths {sorted(lengths)}; pad them to one length "
                                 f"and pass an attention_mask (0 on the padding), e.g. tokenizer(..., padding=True)")
            flat = [v for r in rows for v in r]
        else:
            flat = rows
        for v in flat:
            if isinstance(v, (str, bytes)):
                raise TypeError(f"{name} holds the string {v!r}, not a token id: encode text with the tokenizer first")
            if not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must hold integer token ids, got {v!r} ({type(v).__name__})")
        return torch.tensor(rows, dtype=torch.bool if flat and all(isinstance(v, bool) for v in flat) else torch.long)
    raise TypeError(f"{name} must be a torch.LongTensor, a numpy integer array or a list of token-id lists, "
                    f"got {type(x).__name__}")


def _unpack(input_ids, attention_mask, name: str, mask_name: str):
    # HF BatchEncoding (a Mapping) or a plain dict of the two.
    if isinstance(input_ids, Mapping):
        if "input_ids" not in input_ids:
            raise TypeError(f"{name} is a mapping without 'input_ids' (keys: {list(input_ids)[:10]})")
        if attention_mask is not None and "attention_mask" in input_ids:
            raise ValueError(f"{mask_name} given twice: in {name} (a BatchEncoding/dict) and as an argument")
        attention_mask = input_ids.get("attention_mask", attention_mask)
        input_ids = input_ids["input_ids"]
    return input_ids, attention_mask


def to_ids(x, vocab_size: int, name: str = "input_ids") -> torch.Tensor:
    """Any accepted form of token ids -> a (B, T) LongTensor, every id checked against the vocabulary."""

    ids = _tensor(x, name)
    check_ids(ids, vocab_size, name)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"{name} must be (B, T) or (T,), got shape {tuple(ids.shape)}")
    return ids.long()


def to_mask(mask, ids: torch.Tensor, name: str = "attention_mask", ids_name: str = "input_ids") -> torch.Tensor:
    if mask is None:
        return torch.ones_like(ids)
    m = _tensor(mask, name)
    if m.dim() == 1 and ids.size(0) == 1:
        m = m[None]
    if tuple(m.shape) != tuple(ids.shape):
        raise ValueError(f"{ids_name} must be (B, T) with {name} of the same shape; got {tuple(ids.shape)} and "
                         f"{tuple(m.shape)} ({name}: 1 on real tokens, 0 on padding)")
    if m.dtype.is_floating_point or m.dtype.is_complex:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{name} must hold only 0 and 1 (1 on real tokens, 0 on padding)")
    elif m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
        bad = sorted(set(m[(m != 0) & (m != 1)].tolist()))[:5]
        raise ValueError(f"{name} must hold only 0 and 1 (1 on real tokens, 0 on padding); found {bad}")
    return m.to(device=ids.device).bool().long()


def align_padding(ids: torch.Tensor, mask: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real tokens of each row together, order kept, padding on `side` ("left" or "right");
    columns that are padding in every row dropped."""
    key = mask.bool().long() if side == "left" else 1 - mask.bool().long()  # pads sort first on the left
    order = torch.sort(key, dim=1, stable=True).indices
    ids, mask = ids.gather(1, order), mask.gather(1, order)
    width = int(mask.sum(1).max()) if mask.numel() else 0
    keep = slice(ids.size(1) - width, None) if side == "left" else slice(0, width)
    return ids[:, keep], mask[:, keep]


def prompt_batch(input_ids, attention_mask, vocab_size: int, *, side: str = "left", allow_empty_rows: bool = False,
                 name: str = "input_ids", mask_name: str = "attention_mask") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) in any accepted form -> (B, T) LongTensors, padding on `side` only.

    A row with no real token (mask all 0) is refused unless allow_empty_rows (an empty continuation
    has log-likelihood 0). A (B, 0) input stays (B, 0): generation starts such prompts from <s>."""
    input_ids, attention_mask = _unpack(input_ids, attention_mask, name, mask_name)
    ids = to_ids(input_ids, vocab_size, name)
    mask = to_mask(attention_mask, ids, mask_name, name)
    if ids.size(0) == 0:
        raise ValueError(f"{name} holds no prompt (batch size 0)")
    if ids.size(1) == 0:
        return ids, mask
    empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty and not allow_empty_rows:
        raise ValueError(f"{mask_name} row(s) {empty[:10]} are all 0: those rows have no token to start from; "
                         f"drop them, or pass an empty prompt as a (B, 0) tensor")
    return align_padding(ids, mask, side)


def prompt_width(input_ids) -> int:
    """The padded length T the user passed (what HF's max_length counts), before any repacking."""
    if isinstance(input_ids, Mapping) and "input_ids" in input_ids:
        input_ids = input_ids["input_ids"]
    shape = getattr(input_ids, "shape", None)
    if shape is not None:
        return int(shape[-1]) if len(shape) else 0
    if isinstance(input_ids, (list, tuple)):
        if input_ids and isinstance(input_ids[0], (list, tuple)) or (input_ids and hasattr(input_ids[0], "__len__")):
            return len(input_ids[0])
        return len(input_ids)
    return 0


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
