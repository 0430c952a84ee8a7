"""Validation metrics: per-head loss and perplexity, and per-head exact match / character accuracy
of greedy generations — used by training (every `eval_every` steps) and by `gpt2mh eval`."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..inference.generate import generate_rows
from ..inputs import check_vocab, encode_input
from ..model import GPT2 as MultiHeadGPT2
from .checkpoint import CONFIG_JSON
from .config import DEFAULT_MAX_NEW_TOKENS, TrainConfig
from .data import Example, read_examples
from .metrics import char_accuracy, exact_match
from .packing import PackedExample, collate, pack_examples, packed_loss

logger = logging.getLogger(__name__)


PROGRESS_SECONDS = 15.0  # a progress log line at most this often (visible without a terminal)


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
                         max_new_tokens: int | Mapping[str, int] = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 32,
                         progress: bool = False) -> dict[str, list[str]]:
    """Greedy output of each head for each example's input, through the data-set engine (all heads
    at once, at most `batch_size` inputs in flight, each stream's slot reused as soon as it ends).
    max_new_tokens: one budget for every head, or {head: budget} (a head not named: DEFAULT_MAX_NEW_TOKENS),
    cut to the room the longest input leaves in the context.
    progress: log "generated k/n examples" lines (at most every PROGRESS_SECONDS, and the last)."""
    names = [model.head_names[i] for i in model.head_index(heads)]
    limits = head_limits(max_new_tokens, names)
    texts = [ex.input for ex in examples]
    longest = max(len(encode_input(tokenizer, t)) for t in texts)
    room = model.config.n_positions - longest
    if room < 1:
        raise ValueError(f"an input of {longest} tokens leaves no room to generate "
                         f"(n_positions={model.config.n_positions})")
    per_head = {h: {"max_new_tokens": min(limits[h], room)} for h in names}
    out = {h: [None] * len(texts) for h in names}
    if progress:
        logger.info("evaluation: generating examples 1-%d of %d", len(texts), len(texts))
    last_log, done = time.monotonic(), 0
    for i, got in generate_rows(model, tokenizer, texts, names, per_head=per_head, compile=False,
                                slots=batch_size * len(names), eos_token_id=tokenizer.eos_id,
                                pad_token_id=tokenizer.pad_id):
        if isinstance(got, str):
            raise ValueError(f"example {i}: {got}")
        for h in names:
            out[h][i] = got[h]
        done += 1
        if progress and (time.monotonic() - last_log >= PROGRESS_SECONDS or done == len(texts)):
            logger.info("evaluation: generated %d of %d examples", done, len(texts))
            last_log = time.monotonic()
    return out


def head_limits(max_new_tokens: int | Mapping[str, int], names: Sequence[str]) -> dict[str, int]:
    """{head: generation budget} from one int for all heads or a {head: int} mapping."""
    if isinstance(max_new_tokens, Mapping):
        return {h: int(max_new_tokens.get(h, DEFAULT_MAX_NEW_TOKENS)) for h in names}
    return {h: int(max_new_tokens) for h in names}


def score_predictions(predictions: dict[str, list[str]], examples: Sequence[Example],
                      tokenizer=None) -> dict[str, float]:
    """Per head exact match and character accuracy (1 - edit distance / reference length) over the
    examples that have a reference for that head. With the tokenizer, each reference is first put in
    the form the tokenizer gives every output (`reachable`): "ＡＢＣ" or "ｶﾞ" can never be generated."""
    metrics = {}
    for head, preds in predictions.items():
        pairs = [(p, ex.targets[head]) for p, ex in zip(preds, examples) if head in ex.targets]
        if tokenizer is not None:
            pairs = [(p, reachable(tokenizer, r)) for p, r in pairs]
        if pairs:
            metrics[f"{head}/exact_match"] = sum(exact_match(p, r) for p, r in pairs) / len(pairs)
            metrics[f"{head}/char_accuracy"] = sum(char_accuracy(p, r) for p, r in pairs) / len(pairs)
    return metrics


def reachable(tokenizer, text: str) -> str:
    """The text as the tokenizer outputs it: decode(encode(text)) — lowercased, NFKC-normalised (full-width
    and half-width forms folded), whitespace collapsed, unknown characters dropped."""
    return tokenizer.decode(tokenizer.encode(text, add_eos=False))


_WARNED: set[str] = set()  # data files already reported by warn_unreachable


def warn_unreachable(tokenizer, examples: Sequence[Example], heads: Sequence[str]) -> int:
    """Log once per data file how many references the tokenizer can never produce as they are written
    (they are scored in the tokenizer's form); returns that count for these examples."""
    per_file: dict[str, int] = {}
    for ex in examples:
        n = sum(1 for h in heads if h in ex.targets and reachable(tokenizer, ex.targets[h]) != ex.targets[h])
        if n:
            file = ex.source.rpartition(":")[0] or ex.source
            per_file[file] = per_file.get(file, 0) + n
    for file, n in per_file.items():
        if file not in _WARNED:
            _WARNED.add(file)
            logger.warning("%s: %d reference(s) hold text the tokenizer never outputs as written (capitals, "
                           "full/half-width forms, ...); they are scored in the tokenizer's form "
                           "(lowercased, NFKC)", file, n)
    return sum(per_file.values())


def evaluate(model: MultiHeadGPT2, tokenizer, examples: Sequence[Example], heads: Sequence[str] | None = None, *,
             batch_size: int = 8, max_length: int | None = None, truncation: str = "truncate",
             samples: int | None = 32, max_new_tokens: int | Mapping[str, int] = DEFAULT_MAX_NEW_TOKENS,
             loss_weights: dict[str, float] | None = None, bf16: bool = False,
             packed: Sequence[PackedExample] | None = None, progress: bool = False,
             predictions: dict[str, list[str]] | None = None) -> dict[str, float]:
    """Validation metrics: per head loss, perplexity and label count on all examples; per head exact
    match and char accuracy of greedy generations on the first `samples` examples (None: all, 0: none).
    predictions: those generations already made by generate_predictions (one row per sampled example).

    Keys: "loss" (Σ_k w_k · loss_k, the training objective), "<head>/loss", "<head>/perplexity",
    "<head>/tokens", "<head>/exact_match", "<head>/char_accuracy", and the means over heads
    "exact_match", "char_accuracy"; "samples", the number of examples the generation scores are over."""
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
                if predictions is None:
                    predictions = generate_predictions(model, tokenizer, sample, names, max_new_tokens,
                                                       batch_size * 4, progress)
                warn_unreachable(tokenizer, sample, names)
                metrics.update(score_predictions(predictions, sample, tokenizer))
                metrics["samples"] = len(sample)
                for key in ("exact_match", "char_accuracy"):
                    vals = [v for k, v in metrics.items() if k.endswith("/" + key)]
                    if vals:
                        metrics[key] = sum(vals) / len(vals)
    finally:
        model.train(was_training)
    return metrics


RUN_KEYS = ("input_column", "columns", "max_length", "truncation", "eval_max_new_tokens")


def run_settings(checkpoint: str | Path) -> dict:
    """How the run that wrote `checkpoint` reads and scores data: those of its train_config.json's
    RUN_KEYS that are set, TrainConfig's defaults for the others (and for a checkpoint without one).
    Training-time evaluation, `gpt2mh eval` and the quickstart all read them here, so they score
    the same outputs."""
    path = Path(checkpoint) / CONFIG_JSON
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {k: defaults[k] if saved.get(k) is None else saved[k] for k in RUN_KEYS}


def evaluate_file(model: MultiHeadGPT2, tokenizer, checkpoint: str | Path, data: str | Path,
                  heads: Sequence[str] | None = None, *, samples: int | None = None,
                  max_new_tokens: int | Mapping[str, int] | None = None, input_column: str | None = None, batch_size: int = 8,
                  progress: bool = True) -> tuple[dict[str, float], list[Example], dict[str, list[str]]]:
    """The held-out figures of a checkpoint on a data file, read and scored as its run did (columns,
    input column, max_length, truncation and eval_max_new_tokens from its train_config.json): what
    `gpt2mh eval` prints and the quickstart shows. Returns (metrics, examples, greedy predictions
    of the first `samples` examples; None: all)."""
    run = run_settings(checkpoint)
    names = [model.head_names[i] for i in model.head_index(heads)]
    columns = {h: c for h, c in (run["columns"] or {}).items() if h in names} or None
    examples, report = read_examples(data, names, input_column or run["input_column"], columns)
    logger.info("%s", report.summary())
    sample = list(examples if samples is None else examples[:samples])
    limit = run["eval_max_new_tokens"] if max_new_tokens is None else max_new_tokens
    predictions = generate_predictions(model, tokenizer, sample, names, limit, batch_size * 4, progress) if sample else {}
    metrics = evaluate(model, tokenizer, examples, names, batch_size=batch_size, max_length=run["max_length"],
                       truncation=run["truncation"], samples=samples, max_new_tokens=limit,
                       predictions=predictions or None)
    return metrics, examples, predictions
