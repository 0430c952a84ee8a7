"""`MultiHeadGPT2`: the network of `gpt2mh.model` with the HF-style methods users know.

The methods are thin: each calls the free function of the module that owns it (loading
`gpt2mh.weights`, generation `gpt2mh.inference.generate`, scoring `gpt2mh.inference.score`, int8 `gpt2mh.kernels.int8`).
They live here, above all of those, so that `gpt2mh.model` imports nothing but torch and config."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .inference.generate import generate
from .inference.score import score
from .kernels.int8 import quantize_model
from .model import GPT2
from .weights.folder import check_load_args, load_model, save_model
from .weights.hub import resolve_model


class MultiHeadGPT2(GPT2):
    """One GPT-2 trunk and N output heads (see `gpt2mh.model.GPT2`), with HF-style methods."""

    @classmethod
    def from_pretrained(cls, src: str | Path, heads: Sequence[str] | None = None, *, revision: str | None = None,
                        device=None, dtype: torch.dtype | None = None,
                        quantize: str | None = None) -> "MultiHeadGPT2":
        """Load a HF GPT-2 checkpoint or a gpt2mh checkpoint from a folder or a hub repo id.

        heads=None keeps a gpt2mh checkpoint's heads, or gives one head "lm" for a HF checkpoint;
        a list of names gives those heads, each new name an untied copy of the pretrained LM head;
        quantize="int8": inference with int8 weights (see `quantize`)."""
        heads, device, dtype = check_load_args(heads, device, dtype, revision=revision, quantize=quantize, src=src)
        model = load_model(resolve_model(src, revision=revision), heads, device=device, dtype=dtype, cls=cls)
        return model.quantize(quantize) if quantize else model

    def save_pretrained(self, folder: str | Path, **kwargs) -> Path:
        return save_model(self, folder, **kwargs)

    def generate(self, input_ids, attention_mask=None, heads=None, **kwargs) -> dict[str, torch.Tensor]:
        """Continue every prompt with every selected head in one pass (see `gpt2mh.inference.generate`).

        Controls (HF names) apply to all heads; `per_head={"name": {...}}` overrides them per head.
        Returns {head: LongTensor (B * num_return_sequences, new_tokens)}, pad after a stream ends."""
        return generate(self, input_ids, attention_mask, heads, **kwargs)

    def score(self, input_ids, attention_mask, target_ids, target_mask=None, heads=None) -> torch.Tensor:
        """log p(target | prompt) summed per row, for every head: (N, B) (see `gpt2mh.inference.score`)."""
        return score(self, input_ids, attention_mask, target_ids, target_mask, heads)

    def quantize(self, mode: str | None = "int8") -> "MultiHeadGPT2":
        """Inference with int8 weights: every trunk linear and every head stored as int8 with a
        per-output-channel scale (embeddings, LayerNorms, biases stay fp32). The fp32 parameters
        are kept (saving and training use them); a changed weight drops back to its fp32 kernel.
        mode=None: back to exact fp32. Error vs fp32: benchmarks/README.md (int8 error)."""
        return quantize_model(self, mode)
