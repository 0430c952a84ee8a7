"""Validation metrics: per-head loss and perplexity, and per-head exact match / character accuracy
of greedy generations — used by training (every `eval_every` steps) and by `gpt2mh eval`."""
from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Sequence

import torch

from .corpus import char_accuracy, exact_match
from .data import Example
from .model import MultiHeadGPT2
from .packing import PackedExample, collate, pack_examples, packed_loss
from .prompt import check_vocab


@torch.no_grad()
def eval_loss(model: MultiHeadGPT2, packed: Sequence[PackedExample], pad_id: int, batch_size: int,
              autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and label counts per head over the packed examples: (N,), (N,)."""
    N = len(model.head_names)
    sums, counts = torch.zeros(N), torch.zeros(N)
    for i in range(0, len(packed), batch_size):
        batch = collate(packed[i: i + batch_size], pad_id, N).to(model.device)
        with autocast():
            out = packed_loss(model, batch)
        sums += out.head_sums
        counts += out.head_tokens
    return sums, counts


@torch.no_grad()
def generate_predictions(model: MultiHeadGPT2, tokenizer, examples: Sequence[Example], heads=None,
                         max_new_tokens: int = 128, batch_size: int = 32) -> dict[str, list[str]]:
    """Greedy output of each head for each example's input (all heads in one generate call)."""
    from .generate import generate_text

    names = [model.head_names[i] for i in model.head_index(heads)]
    out = {h: [] for h in names}
    for i in range(0, len(examples), batch_size):
        texts = [ex.input for ex in examples[i: i + batch_size]]
        longest = max(len(tokenizer.encode(t)) for t in texts)
        room = model.config.n_positions - longest
        if room < 1:
            raise ValueError(f"an input of {longest} tokens leaves no room to generate "
                             f"(n_positions={model.config.n_positions})")
        got = generate_text(model, tokenizer, texts, names, compile=False, max_new_tokens=min(max_new_tokens, room),
                            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        for h in names:
            out[h] += got[h]
    return out


def score_predictions(predictions: dict[str, list[str]], examples: Sequence[Example]) -> dict[str, float]:
    """Per head exact match and character accuracy (1 - edit distance / reference length) over the
    examples that have a reference for that head."""
    metrics = {}
    for head, preds in predictions.items():
        pairs = [(p, ex.targets[head]) for p, ex in zip(preds, examples) if head in ex.targets]
        if pairs:
            metrics[f"{head}/exact_match"] = sum(exact_match(p, r) for p, r in pairs) / len(pairs)
            metrics[f"{head}/char_accuracy"] = sum(char_accuracy(p, r) for p, r in pairs) / len(pairs)
    return metrics


def evaluate(model: MultiHeadGPT2, tokenizer, examples: Sequence[Example], heads: Sequence[str] | None = None, *,
             batch_size: int = 8, max_length: int | None = None, truncation: str = "truncate",
             samples: int | None = 32, max_new_tokens: int = 128, loss_weights: dict[str, float] | None = None,
             bf16: bool = False, packed: Sequence[PackedExample] | None = None) -> dict[str, float]:
    """Validation metrics: per head loss, perplexity and label count on all examples; per head exact
    match and char accuracy of greedy generations on the first `samples` examples (None: all, 0: none).

    Keys: "loss" (Σ_k w_k · loss_k, the training objective), "<head>/loss", "<head>/perplexity",
    "<head>/tokens", "<head>/exact_match", "<head>/char_accuracy", and the means over heads
    "exact_match", "char_accuracy"."""
    check_vocab(tokenizer, model)
    names = [model.head_names[i] for i in model.head_index(heads)]
    was_training = model.training
    model.eval()
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    try:
        with torch.random.fork_rng(devices=[]):  # evaluation never moves the training RNG
            if packed is None:
                chosen = [Example(e.input, {h: t for h, t in e.targets.items() if h in names}, e.source)
                          for e in examples]
                packed, _ = pack_examples([e for e in chosen if e.targets], tokenizer, model.head_names,
                                          max_length or model.config.n_positions, truncation)
            sums, counts = eval_loss(model, packed, tokenizer.pad_id, batch_size, autocast)
            metrics, total = {}, 0.0
            for h in names:
                k = model.head_names.index(h)
                if counts[k] == 0:
                    continue
                loss = float(sums[k] / counts[k])
                w = (loss_weights or {}).get(h, 1.0)
                total += w * loss
                metrics.update({f"{h}/loss": loss, f"{h}/perplexity": math.exp(min(loss, 700.0)),
                                f"{h}/tokens": int(counts[k])})
            metrics = {"loss": total, **metrics}
            sample = list(examples if samples is None else examples[:samples])
            if sample:
                metrics.update(score_predictions(
                    generate_predictions(model, tokenizer, sample, names, max_new_tokens, batch_size * 4), sample))
                for key in ("exact_match", "char_accuracy"):
                    vals = [v for k, v in metrics.items() if k.endswith("/" + key)]
                    if vals:
                        metrics[key] = sum(vals) / len(vals)
    finally:
        model.train(was_training)
    return metrics
