"""Supervised multi-task fine-tuning: one shared trunk, one head per target column (run_clm.py's job).

    cfg = TrainConfig(train_file="train.jsonl", heads=["reading", "pos"], base="rinna/japanese-gpt2-small")
    result = train(cfg)            # or: python -m gpt2mh.train run.toml [--resume]
                                   #     torchrun --nproc_per_node=2 -m gpt2mh.train run.toml

Batch semantics: `batch_size` is the number of examples per optimizer step, whatever the hardware.
It is split into `gradient_accumulation_steps` micro-steps and each micro-step across the processes
of a torchrun launch; every head's loss is normalised by its label count over the whole step, so
accumulated and data-parallel runs compute the same loss and gradients as one big batch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import difflib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import tomllib
from dataclasses import asdict, dataclass
from typing import NamedTuple
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .atomic import atomic_write_text
from .config import GPT2Config
from .data import Example, read_examples, split_examples
from .model import GPT2, check_head_names
from .packing import TRUNCATION, PackedExample, PackedLoss, collate, pack_examples
from .prompt import check_vocab
from .tokenizer import Tokenizer
from .evaluate import DEFAULT_MAX_NEW_TOKENS, PROGRESS_SECONDS, evaluate
from .weights import load_model, read_meta

logger = logging.getLogger(__name__)
SCHEDULES = ("cosine", "linear", "constant")
METRICS_FILE = "metrics.jsonl"


# ---- configuration -------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """One run's settings, by concern (the flat fields are the TOML/JSON file's keys). Checked by `check`."""
    # data
    train_file: str
    validation_file: str | None = None
    validation_fraction: float = 0.0           # held out of train_file when no validation_file
    input_column: str = "input"
    columns: dict[str, str] | None = None      # head -> column (default: the head's name)
    max_length: int | None = None              # per input + target; None: the model's n_positions
    truncation: str = "truncate"               # or "drop" (see gpt2mh.packing)
    # model and heads
    base: str | None = None                    # HF folder / hub id / gpt2mh checkpoint; None: from scratch
    model_config: dict | None = None           # GPT2Config fields for a model from scratch
    heads: list[str] | None = None             # the model's heads; None: those of a gpt2mh base
    add_heads: list[str] | None = None         # new heads on the base, initialised from its LM head
    train_heads: list[str] | None = None       # only these heads get a loss and change; None: all
    tokenizer: str | None = None               # None: the base's spiece.model, else the packaged rinna one
    freeze_trunk: bool = False
    freeze_embeddings: bool = False
    dropout: float | None = None               # overrides embd/attn/resid dropout of the base
    gradient_checkpointing: bool = False
    # optimisation
    batch_size: int = 8                        # examples per optimizer step, over all processes
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    epochs: float | None = None                # when set, max_steps = ceil(epochs * examples / batch_size)
    learning_rate: float = 5e-5
    weight_decay: float = 0.01                 # not on biases and LayerNorm
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "cosine"                # cosine | linear | constant (after the warmup)
    min_lr_ratio: float = 0.0                  # where cosine/linear decay ends, as a fraction of the lr
    max_grad_norm: float | None = 1.0
    loss_weights: dict[str, float] | None = None  # head -> weight (default 1.0): Σ_k w_k · mean CE_k
    seed: int = 42
    # evaluation
    eval_every: int = 200                      # steps; 0: only at the end
    eval_samples: int = 32                     # validation rows generated greedily for EM / char acc
    eval_max_new_tokens: int | dict = DEFAULT_MAX_NEW_TOKENS  # or {head: int}; also what `gpt2mh eval` uses
    eval_batch_size: int | None = None         # None: batch_size
    metric_for_best: str = "loss"              # an evaluate() key, e.g. "reading/char_accuracy"
    greater_is_better: bool | None = None      # None: False for losses and perplexities
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    # checkpoints and logs
    output_dir: str = "runs/gpt2mh"
    save_every: int = 500                      # steps; 0: only at the end (and at a new best)
    keep_last: int | None = 3                  # newest checkpoints kept (the best is always kept)
    resume: bool | str = False                 # True: the latest checkpoint in output_dir; or a folder
    log_every: int = 10
    progress: bool = True                      # tqdm bar on a terminal, else a log line every ~15 s (rank 0)
    # hardware
    device: str | None = None                  # None: cuda if available, else cpu
    bf16: bool | None = None                   # None: bf16 autocast on CUDA when supported

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _plain(getattr(self, f.name)))
            _check_type(f.name, getattr(self, f.name), f.type)
        for name in ("heads", "train_heads", "add_heads"):
            names = getattr(self, name)
            if names is not None:
                setattr(self, name, [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names))
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        self.check()

    def check(self, model: GPT2 | None = None, device: torch.device | None = None, world: int = 1,
              validation: bool | None = None) -> None:
        """Every check of the settings, in this one place. Alone (at construction): what the
        settings decide by themselves. With the model, the device and the process count (setup):
        head names, lengths, bf16, the batch split. With `validation` (does the run have a
        validation set?): the settings that need one."""
        limits = self.eval_max_new_tokens
        budgets = list(limits.values()) if isinstance(limits, dict) else [limits]
        unknown = sorted(set(limits) - set(self.heads or limits)) if isinstance(limits, dict) else []
        checks = [
            (self.truncation in TRUNCATION, f"truncation must be one of {TRUNCATION}, got {self.truncation!r}"),
            (self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}"),
            (self.batch_size >= 1 and self.gradient_accumulation_steps >= 1,
             f"batch_size and gradient_accumulation_steps must be >= 1, got batch_size={self.batch_size}, "
             f"gradient_accumulation_steps={self.gradient_accumulation_steps}"),
            (self.gradient_accumulation_steps < 1 or self.batch_size % self.gradient_accumulation_steps == 0,
             f"batch_size={self.batch_size} is not divisible by gradient_accumulation_steps="
             f"{self.gradient_accumulation_steps} (batch_size counts the examples of a whole optimizer step)"),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.epochs is None or 0 < self.epochs < math.inf, f"epochs must be finite and > 0, got {self.epochs}"),
            (0 < self.learning_rate < math.inf, f"learning_rate must be finite and > 0, got {self.learning_rate}"),
            (0 <= self.weight_decay < math.inf, f"weight_decay must be finite and >= 0, got {self.weight_decay}"),
            (0 < self.adam_eps < math.inf, f"adam_eps must be finite and > 0, got {self.adam_eps}"),
            (len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
             f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.max_grad_norm is None or 0 <= self.max_grad_norm < math.inf,
             f"max_grad_norm must be None or 0 (no clipping) or a finite number > 0, got {self.max_grad_norm}"),
            (0 <= self.seed < SEED_LIMIT, f"seed must be an integer in [0, 2**32), got {self.seed}"),
            (0.0 <= self.validation_fraction < 1.0, f"validation_fraction must be in [0, 1), got {self.validation_fraction}"),
            (not (self.validation_file and self.validation_fraction),
             "give validation_file or validation_fraction, not both"),
            (self.dropout is None or 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.keep_last is None or self.keep_last >= 1, f"keep_last must be >= 1 or None, got {self.keep_last}"),
            (min(self.eval_every, self.save_every, self.eval_samples, self.warmup_steps) >= 0,
             "eval_every, save_every, eval_samples and warmup_steps must be >= 0"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1,
             f"eval_batch_size must be >= 1 or None (None: batch_size), got {self.eval_batch_size}"),
            (all(isinstance(n, int) and n >= 1 for n in budgets),
             f"eval_max_new_tokens must be >= 1 (an int, or {{head: int}}), got {self.eval_max_new_tokens!r}"),
            (not unknown, f"eval_max_new_tokens names head(s) {unknown} that are not in heads={self.heads}"),
            (self.early_stopping_patience is None or self.early_stopping_patience >= 1,
             f"early_stopping_patience must be >= 1 or None (None: no early stopping), "
             f"got {self.early_stopping_patience}"),
            (self.train_heads != [], "train_heads=[] trains no head; give the heads to train, or None for all"),
            (self.max_length is None or self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}"),
            (self.base is not None or self.model_config is not None or self.resume,
             "set base (a HF folder or hub id such as rinna/japanese-gpt2-small, or a gpt2mh checkpoint) "
             "or model_config (GPT2Config fields) to train from scratch"),
            (not (self.base is not None and self.model_config is not None),
             "model_config describes a model from scratch; it cannot be combined with base"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("train_file", "input_column", "output_dir", "validation_file", "base", "tokenizer", "resume"):
            if isinstance(getattr(self, name), str) and not getattr(self, name).strip():
                raise ValueError(f"{name} is an empty string; give a value" + ("" if name in
                                 ("train_file", "input_column", "output_dir") else " or leave it unset"))
        bad = {h: c for h, c in (self.columns or {}).items() if not (isinstance(c, str) and c.strip())}
        if bad:
            raise ValueError(f"columns maps each head to a column name (a non-empty string): {bad}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device={self.device!r} is not a torch device ({str(e).splitlines()[0][:60]}...); "
                                 f"use e.g. 'cpu', 'cuda' or 'cuda:1', or None for cuda when available") from None
        for name in ("heads", "train_heads", "add_heads"):
            if getattr(self, name):  # None / []: not given
                try:
                    check_head_names(getattr(self, name))
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        for name in ("heads", "add_heads"):  # new heads: names the command line can address
            odd = [n for n in getattr(self, name) or [] if n != n.strip() or any(c in n for c in ",:")]
            if odd:
                raise ValueError(f"{name}: head name(s) {odd} contain ',' or ':' or start or end with a space; the "
                                 f"command line could not name them (--heads a,b / --head NAME:key=value): "
                                 f"rename them")
        bad = {h: w for h, w in (self.loss_weights or {}).items()
               if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"loss_weights must be finite numbers >= 0: {bad}")
        if model is not None:
            self._check_against(model, device, world)
        if validation is not None:
            self._check_validation(model, validation)

    def _check_against(self, model: GPT2, device: torch.device, world: int) -> None:
        names = list(model.head_names)
        for option in ("loss_weights", "columns"):
            unknown = sorted(set(getattr(self, option) or {}) - set(names))
            if unknown:
                raise ValueError(f"{option} names unknown heads {unknown}; the model's heads: {names}")
        trained = [names[i] for i in model.head_index(self.train_heads)]
        if not any((self.loss_weights or {}).get(h, 1.0) for h in trained):
            raise ValueError(f"loss_weights {self.loss_weights} give every trained head weight 0: nothing to learn")
        if self.bf16 and device.type != "cuda":
            raise ValueError("bf16 autocast is for CUDA; on CPU train in fp32 (bf16=false)")
        n_positions = model.config.n_positions
        if (self.max_length or n_positions) > n_positions:
            raise ValueError(f"max_length={self.max_length} exceeds the model's n_positions={n_positions}")
        need = self.gradient_accumulation_steps * world
        if self.batch_size % need:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by gradient_accumulation_steps x "
                             f"processes = {need}")

    def _check_validation(self, model: GPT2, validation: bool) -> None:
        if not validation and (self.early_stopping_patience or self.metric_for_best != "loss"):
            raise ValueError("early stopping and metric_for_best need a validation set "
                             "(validation_file or validation_fraction)")
        trained = [model.head_names[i] for i in model.head_index(self.train_heads)]
        kinds = ["loss", "perplexity", "tokens"] + (["exact_match", "char_accuracy"] if self.eval_samples else [])
        known = ["loss"] + kinds[3:] + [f"{h}/{k}" for h in trained for k in kinds]
        if validation and self.metric_for_best not in known:
            close = difflib.get_close_matches(self.metric_for_best, known, n=1)
            raise ValueError(f"metric_for_best={self.metric_for_best!r} is not an evaluation metric"
                             + (f" (did you mean {close[0]!r}?)" if close else "") + f"; one of {known}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1, cutoff=0.6)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown training setting(s) {', '.join(hints)}; valid settings: {', '.join(names)}")
        if "train_file" not in d:
            raise ValueError("train_file is required")
        return cls(**d)

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        """A TOML or JSON file of TrainConfig fields (omit a key for its default; TOML has no null)."""
        path = Path(path)
        if path.suffix not in (".toml", ".json"):
            raise ValueError(f"{path}: a training config is a .toml or .json file")
        try:
            if path.suffix == ".toml":
                d = tomllib.loads(path.read_text(encoding="utf-8"))
            else:
                d = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from None
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a table of settings")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


SEED_LIMIT = 2**32  # the CLI's --seed range too (the data order multiplies the seed by 1_000_003)


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate key(s) {dup}: each setting may appear once (JSON keeps only the last)")
    return dict(pairs)


def _plain(value):
    """pathlib paths -> str, numpy scalars -> Python numbers (np.int64(4) is not an int)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return value.tolist()  # heads=np.array(["a", "b"]): a list of str
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),),
          "list": (list, tuple), "dict": (dict,), "tuple": (list, tuple)}


def _check_type(name: str, value, annotation: str) -> None:
    allowed = [a.strip().split("[")[0] for a in str(annotation).split("|")]
    for a in allowed:
        if isinstance(value, _TYPES[a]) and not (a in ("int", "float") and isinstance(value, bool)):
            return
    raise TypeError(f"{name} must be {annotation}, got {value!r} ({type(value).__name__})")


@dataclass
class TrainResult:
    steps: int                          # optimizer steps done (the run's final step)
    metrics: dict                       # the last evaluation ({} without a validation set)
    losses: list[float]                 # training loss of every step this call ran
    best_checkpoint: str | None         # by metric_for_best (None without a validation set)
    best_metric: float | None
    last_checkpoint: str | None
    output_dir: str
    stopped_early: bool = False
    interrupted: bool = False


class TrainingDiverged(FloatingPointError):
    """The loss or the gradients became NaN/inf; the message names the step and the head(s)."""


# ---- processes -----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owned: bool = False  # this call started the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str | None) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: gloo on CPU, nccl on CUDA; one process otherwise."""
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return Dist(device=torch.device(device or ("cuda" if cuda else "cpu")))
    owned = not dist.is_initialized()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"), owned)


# ---- model, tokenizer, data ----------------------------------------------------------------------
def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[GPT2, list[str]]:
    """The model to fine-tune and the names of its new heads."""
    add = cfg.add_heads or []
    if cfg.base is None:
        names = _merge(cfg.heads, add)
        if not names:
            raise ValueError("training from scratch needs heads=[...]")
        defaults = dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        try:
            config = GPT2Config(**{**defaults, **cfg.model_config})
        except TypeError as e:
            valid = [f.name for f in dataclasses.fields(GPT2Config)]
            raise ValueError(f"model_config: {e}; valid fields: {', '.join(valid)}") from None
        except ValueError as e:
            raise ValueError(f"model_config: {e}") from None
        return GPT2(config, names), list(names)
    folder = base_folder(cfg.base)
    meta = read_meta(folder)
    saved = list(meta["head_names"]) if meta else []
    names = _merge(cfg.heads or saved, add)
    if not names:
        raise ValueError(f"{cfg.base} is a plain GPT-2 checkpoint: set heads=[...] (one per target)")
    return load_model(folder, names), [n for n in names if n not in saved]


def base_folder(base: str) -> Path:
    """`base`: a checkpoint folder, a hub id, or a training output folder (its newest checkpoint),
    as --model accepts for generate, eval and export-hf."""
    from .hub import resolve_checkpoint

    folder = resolve_checkpoint(base)
    if not (folder / "config.json").is_file():
        newest = ckpt.latest_checkpoint(folder)
        if newest is not None:
            logger.info("base %s: a training output folder; using its newest checkpoint %s", base, newest)
            return newest
    return folder


def check_resume_heads(cfg: TrainConfig, folder: Path, saved: list[str]) -> None:
    """A resumed run trains the checkpoint's heads: other heads= / add_heads= are refused, not ignored."""
    want = _merge(cfg.heads or saved, cfg.add_heads or [])
    if set(want) != set(saved):
        raise ValueError(f"resume: {folder} was trained with heads {saved}, but this run asks for {want}; "
                         f"resume with the same heads, or start a new run (another output_dir) with "
                         f"base={str(folder)!r} and the heads you want")


def _merge(names, more) -> list[str]:
    names = list(names or [])
    return names + [n for n in more if n not in names]


def build_tokenizer(cfg: TrainConfig) -> Tokenizer:
    if cfg.tokenizer is not None:
        return Tokenizer.from_pretrained(cfg.tokenizer)
    if cfg.base is not None:
        return Tokenizer.for_model(base_folder(cfg.base))
    return Tokenizer.from_pretrained(None)  # rinna's, packaged


def set_dropout(model: GPT2, p: float) -> None:
    model.config = dataclasses.replace(model.config, embd_pdrop=p, attn_pdrop=p, resid_pdrop=p)
    for m in model.modules():
        if isinstance(m, nn.Dropout):  # every dropout, attention's included (Attention.attn_dropout)
            m.p = p


def load_data(cfg: TrainConfig, heads: list[str]) -> tuple[list[Example], list[Example]]:
    """Train and validation rows with targets for `heads` (the trained heads; other columns unused)."""
    columns = {h: c for h, c in (cfg.columns or {}).items() if h in heads}
    train, report = read_examples(cfg.train_file, heads, cfg.input_column, columns)
    _log_report(report.summary(), bool(report.skipped or report.ignored_columns))
    if cfg.validation_file:
        val, vreport = read_examples(cfg.validation_file, heads, cfg.input_column, columns)
        _log_report(vreport.summary(), bool(vreport.skipped or vreport.ignored_columns))
    elif cfg.validation_fraction:
        train, val = split_examples(train, cfg.validation_fraction, cfg.seed)
        logger.info("held out %d of %d rows of %s for validation", len(val), len(train) + len(val), cfg.train_file)
    else:
        val = []
    return train, val


def _log_report(text: str, problems: bool) -> None:
    logger.log(logging.WARNING if problems else logging.INFO, "%s", text)


# ---- optimisation --------------------------------------------------------------------------------
def freeze(model: GPT2, cfg: TrainConfig) -> list[int]:
    """Set requires_grad from the freeze options; returns the indices of the frozen heads."""
    for name, p in model.transformer.named_parameters():
        embedding = name.startswith(("wte.", "wpe."))
        p.requires_grad_(not (cfg.freeze_trunk or (cfg.freeze_embeddings and embedding)))
    train_idx = model.head_index(cfg.train_heads)
    return [k for k in range(len(model.head_names)) if k not in train_idx]


def make_optimizer(model: GPT2, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},  # biases, LayerNorm
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=cfg.adam_betas,
                             eps=cfg.adam_eps, fused=device.type in ("cpu", "cuda"))  # one kernel: ~9x faster on CPU


def lr_factor(step: int, warmup: int, total: int, schedule: str, floor: float) -> float:
    """Multiplier of the lr for optimizer step `step` (0-based): linear warmup to 1, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return floor + (1.0 - floor) * decay


def make_scheduler(optimizer, cfg: TrainConfig, total: int) -> LambdaLR:
    return LambdaLR(optimizer, partial(lr_factor, warmup=cfg.warmup_steps, total=total,
                                       schedule=cfg.lr_schedule, floor=cfg.min_lr_ratio))


# ---- data order ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # its own generator: resumable
    return tuple(torch.randperm(n, generator=g).tolist())


def step_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Examples of optimizer step `step` (0-based): a window of the endless stream of shuffled epochs.

    The data position is a function of the step alone, so resuming needs only the step."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        out += epoch_order(n, seed, epoch)[offset: offset + batch_size - len(out)]
    return out


def shard(indices: list[int], accumulation: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches: micro-step m, rank r takes a contiguous slice of the step."""
    micro = len(indices) // (accumulation * world)
    return [indices[(m * world + rank) * micro: (m * world + rank + 1) * micro] for m in range(accumulation)]


# ---- the run -------------------------------------------------------------------------------------
class StopSignal:
    """SIGINT/SIGTERM: finish the step, write a checkpoint, stop. A second signal stops at once."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, then writing a checkpoint "
                       "(send it again to stop at once)", self.received)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class HeadPlan:
    """The run's heads: all of them, the trained ones, the frozen ones, and each head's loss weight."""
    names: list[str]
    trained: list[str]
    frozen: list[int]                  # head indices; their weights are put back after every step
    frozen_copy: torch.Tensor | None   # (len(frozen), C, V)
    weights: torch.Tensor              # (N,) loss weight per head


@dataclass
class RunData:
    train: list[PackedExample]
    val: list[PackedExample]
    val_examples: list[Example]        # the validation rows themselves, for the generation metrics
    label_counts: torch.Tensor         # (n, N) labels of each training example per head


@dataclass
class Progress:
    """What changes from step to step; a checkpoint's training state restores it."""
    step: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0                 # evaluations without improvement
    last_checkpoint: Path | None = None


@dataclass
class Run:
    """A training run as `setup` builds it. `train_step` takes one optimizer step, `evaluate_run`
    scores the validation set, `save` writes a checkpoint; `fit` drives them."""
    cfg: TrainConfig
    d: Dist
    model: GPT2
    tokenizer: Tokenizer
    heads: HeadPlan
    data: RunData
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    loss_module: nn.Module             # PackedLoss, wrapped in DistributedDataParallel across processes
    bf16: bool
    max_steps: int
    progress: Progress

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)


class StepResult(NamedTuple):
    head_loss: torch.Tensor            # (N,) mean loss of each head over the step's labels
    grad_norm: float                   # before clipping
    labels: torch.Tensor               # (N,) labelled target tokens of each head in the step
    lengths: list[int]                 # packed length of each example of the step (all processes)


# ---- setup ---------------------------------------------------------------------------------------
def setup(cfg: TrainConfig, d: Dist) -> Run:
    """Model, tokenizer, data, optimiser, and the progress of the checkpoint resumed (if any)."""
    resume_from = resume_folder(cfg)
    _seed_all(cfg.seed)
    if resume_from is not None:
        tokenizer = Tokenizer.from_pretrained(resume_from)
        model, new_heads = load_model(resume_from), []
        check_resume_heads(cfg, resume_from, list(model.head_names))
        logger.info("resuming from %s", resume_from)
    else:
        tokenizer = build_tokenizer(cfg)
        model, new_heads = build_model(cfg, tokenizer)
    check_vocab(tokenizer, model)
    if new_heads and cfg.base is not None:
        logger.info("new heads %s start as copies of the base's LM head", new_heads)
    cfg.check(model, d.device, d.world)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.to(d.device).train()
    heads = head_plan(model, cfg)
    data = load_run_data(cfg, tokenizer, model, heads)
    cfg.check(model, d.device, d.world, validation=bool(data.val))
    max_steps = cfg.max_steps if cfg.epochs is None else math.ceil(cfg.epochs * len(data.train) / cfg.batch_size)
    optimizer = make_optimizer(model, cfg, d.device)
    loss_module = PackedLoss(model)
    if d.world > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    bf16 = (d.device.type == "cuda" and torch.cuda.is_bf16_supported()) if cfg.bf16 is None else cfg.bf16
    run = Run(cfg, d, model, tokenizer, heads, data, optimizer, make_scheduler(optimizer, cfg, max_steps),
              loss_module, bf16, max_steps, Progress())
    if resume_from is not None:
        restore(run, resume_from)
    else:
        torch.manual_seed(cfg.seed + d.rank)  # dropout: one stream per process, fixed by the seed
    return run


def resume_folder(cfg: TrainConfig) -> Path | None:
    out = Path(cfg.output_dir)
    if cfg.resume is False:
        if ckpt.list_checkpoints(out):
            raise FileExistsError(f"{out} already holds checkpoints; resume with --resume "
                                  f"(resume=True) or choose another output_dir")
        return None
    if cfg.resume is True:
        found = ckpt.latest_checkpoint(out)
        if found is None:
            logger.warning("resume: no checkpoint in %s yet; starting from the beginning", out)
        return found
    return Path(cfg.resume)


def head_plan(model: GPT2, cfg: TrainConfig) -> HeadPlan:
    frozen = freeze(model, cfg)
    names = list(model.head_names)
    return HeadPlan(names, [names[i] for i in model.head_index(cfg.train_heads)], frozen,
                    model.heads.detach()[frozen].clone() if frozen else None,
                    torch.tensor([(cfg.loss_weights or {}).get(h, 1.0) for h in names]))


def load_run_data(cfg: TrainConfig, tokenizer: Tokenizer, model: GPT2, heads: HeadPlan) -> RunData:
    max_length = cfg.max_length or model.config.n_positions
    train_rows, val_rows = load_data(cfg, heads.trained)
    train, rep = pack_examples(train_rows, tokenizer, heads.names, max_length, cfg.truncation)
    _log_report(f"{cfg.train_file}: {rep.summary()} (truncation={cfg.truncation!r})", not rep.clean)
    if not train:
        raise ValueError(f"{cfg.train_file}: no example fits max_length={max_length}")
    val, vrep = pack_examples(val_rows, tokenizer, heads.names, max_length, cfg.truncation)
    if val_rows:
        _log_report(f"validation: {vrep.summary()}", not vrep.clean)
    label_counts = torch.stack([p.head_counts(len(heads.names)) for p in train]).float()  # (n, N)
    return RunData(train, val, val_rows, label_counts)


def restore(run: Run, folder: Path) -> None:
    """The optimiser, scheduler, progress and RNG streams of the checkpoint at `folder`."""
    state, tensors = ckpt.load_training_state(folder)
    run.optimizer.load_state_dict(tensors["optimizer"])
    run.scheduler.load_state_dict(tensors["scheduler"])
    run.progress = Progress(state["step"], state.get("best_metric"), state.get("best_step"),
                            state.get("evals_without_improvement", 0), folder)
    step, d = run.progress.step, run.d
    logger.info("resumed from step %d (%s)", step, folder)
    for key in ("batch_size", "seed", "dataset_size"):
        now = len(run.data.train) if key == "dataset_size" else getattr(run.cfg, key)
        if state.get(key) != now:
            logger.warning("resume: %s was %s, now %s: the data order differs from the interrupted run",
                           key, state.get(key), now)
    rng = ckpt.rank_rng(state, tensors, d.rank)
    if rng is None or state.get("world_size") != d.world:
        logger.warning("resume: the checkpoint was written by %s process(es), this run has %d: "
                       "RNG streams are re-seeded", state.get("world_size"), d.world)
        torch.manual_seed(run.cfg.seed + d.rank + step)
    else:
        ckpt.set_rng_state(rng)


# ---- one optimizer step --------------------------------------------------------------------------
def train_step(run: Run) -> StepResult:
    """One optimizer step over `batch_size` examples (accumulated and data-parallel as configured)."""
    cfg, d, heads = run.cfg, run.d, run.heads
    N = len(heads.names)
    idx = step_indices(run.progress.step, len(run.data.train), cfg.batch_size, cfg.seed)
    denominators = run.data.label_counts[idx].sum(0)  # (N,) labels per head in the whole step
    micro = shard(idx, cfg.gradient_accumulation_steps, d.world, d.rank)
    sums = torch.zeros(N)
    for m, rows in enumerate(micro):
        batch = collate([run.data.train[i] for i in rows], run.tokenizer.pad_id, N).to(d.device)
        sync = m == len(micro) - 1 or d.world == 1
        with (contextlib.nullcontext() if sync else run.loss_module.no_sync()):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.bf16):
                loss, head_sums, _ = run.loss_module(batch, heads.weights, denominators, float(d.world))
            loss.backward()
        sums += head_sums
    head_loss = d.all_sum(sums) / denominators.clamp(min=1)
    bad = [h for k, h in enumerate(heads.names) if denominators[k] > 0 and not math.isfinite(head_loss[k])]
    if bad:
        diverged(run, "the loss", bad)
    params = [p for p in run.model.parameters() if p.requires_grad]
    if cfg.max_grad_norm:
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    if not math.isfinite(norm):
        diverged(run, "the gradient norm", nonfinite_grad_heads(run))
    run.optimizer.step()
    if heads.frozen:  # one tensor holds every head: put the frozen ones back (weight decay)
        with torch.no_grad():
            run.model.heads[heads.frozen] = heads.frozen_copy
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.progress.step += 1
    return StepResult(head_loss, norm, denominators, [len(run.data.train[i]) for i in idx])


def nonfinite_grad_heads(run: Run) -> list[str]:
    g = run.model.heads.grad
    bad = [h for k, h in enumerate(run.heads.names) if g is not None and not torch.isfinite(g[k]).all()]
    return bad or ["the trunk"]


def nonfinite_weights(run: Run) -> list[str]:
    """The heads (by name) and trunk parameters (the first 3) holding NaN/inf; [] when all are finite."""
    heads = run.model.heads.detach()
    bad = [h for k, h in enumerate(run.heads.names) if not torch.isfinite(heads[k]).all()]
    trunk = [n for n, t in run.model.transformer.named_parameters() if not torch.isfinite(t).all()]
    if trunk:
        bad.append(f"the trunk ({', '.join(f'transformer.{n}' for n in trunk[:3])}"
                   + (f" and {len(trunk) - 3} more" if len(trunk) > 3 else "") + ")")
    return bad


def diverged(run: Run, what: str, heads: list[str]) -> None:
    step = run.progress.step + 1
    last = run.progress.last_checkpoint
    last = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
    log(run, {"step": step, "event": "diverged", "heads": heads})
    raise TrainingDiverged(
        f"{what} became NaN/inf at step {step} for head(s) {', '.join(heads)}; training stopped and "
        f"{last}. Lower the learning rate, raise warmup_steps or check the data of those heads.")


# ---- evaluation, checkpoints, logs ---------------------------------------------------------------
def evaluate_run(run: Run) -> dict:
    cfg = run.cfg
    return evaluate(run.model, run.tokenizer, run.data.val_examples, run.heads.trained,
                    batch_size=cfg.eval_batch_size or cfg.batch_size, samples=cfg.eval_samples,
                    max_new_tokens=cfg.eval_max_new_tokens, loss_weights=cfg.loss_weights, bf16=run.bf16,
                    packed=run.data.val, progress=cfg.progress and run.d.main)


def improved(run: Run, metrics: dict) -> bool:
    """Record an evaluation in run.progress; True when it is the best so far by metric_for_best."""
    key, p = run.cfg.metric_for_best, run.progress
    if key not in metrics:
        raise KeyError(f"metric_for_best={key!r} is not among the evaluation metrics {sorted(metrics)}")
    value = metrics[key]
    greater = run.cfg.greater_is_better
    if greater is None:
        greater = not any(s in key for s in ("loss", "perplexity"))
    if p.best is None or (value > p.best if greater else value < p.best):
        p.best, p.best_step, p.bad_evals = value, p.step, 0
        return True
    p.bad_evals += 1
    return False


def save(run: Run) -> Path:
    """A checkpoint of the run. Every process calls it (RNG states are gathered); rank 0 writes."""
    cfg, d, p = run.cfg, run.d, run.progress
    rng = d.gather(ckpt.rng_state())
    path = run.out / f"{ckpt.PREFIX}{p.step}"
    if d.main:
        bad = nonfinite_weights(run)
        if bad:
            diverged(run, "the weights", bad)
        n = len(run.data.train)
        state = {"step": p.step, "epoch": p.step * cfg.batch_size // n,
                 "examples_seen": p.step * cfg.batch_size, "dataset_size": n,
                 "batch_size": cfg.batch_size, "seed": cfg.seed, "world_size": d.world,
                 "best_metric": p.best, "best_step": p.best_step,
                 "metric_for_best": cfg.metric_for_best, "evals_without_improvement": p.bad_evals,
                 "head_names": run.heads.names}
        path = ckpt.save_checkpoint(run.out, p.step, run.model, run.tokenizer, run.optimizer,
                                    run.scheduler, state, cfg.to_dict(), rng)
        protect = {p.best_step} if p.best_step is not None else set()
        ckpt.prune_checkpoints(run.out, cfg.keep_last, protect)
    d.barrier()
    p.last_checkpoint = path
    return path


def log(run: Run, record: dict) -> None:
    if run.d.main:
        with open(run.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def trim_log(run: Run) -> None:
    """On resume, forget lines the interrupted run wrote after its checkpoint."""
    path = run.out / METRICS_FILE
    if run.d.main and path.is_file():
        keep = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.strip() and json.loads(line).get("step", 0) <= run.progress.step]
        atomic_write_text(path, "".join(keep))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- the loop ------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> TrainResult:
    """Fine-tune (or train from scratch) a multi-head GPT-2; see TrainConfig. Returns the outcome."""
    d = setup_distributed(cfg.device)
    try:
        with StopSignal() as stop:
            run = setup(cfg, d)
            if d.main:
                run.out.mkdir(parents=True, exist_ok=True)
                ckpt.remove_stale_temp(run.out)
                trim_log(run)
            return fit(run, stop)
    finally:
        if d.owned:
            dist.destroy_process_group()


def fit(run: Run, stop: StopSignal) -> TrainResult:
    """Step until max_steps (or early stopping, or a signal), evaluating, logging and saving on the way."""
    cfg, d, p = run.cfg, run.d, run.progress
    logger.info("training %s on %d examples (%d validation), %d steps of %d examples, heads %s",
                run.heads.names, len(run.data.train), len(run.data.val), run.max_steps, cfg.batch_size,
                run.heads.trained)
    bar = tqdm(total=run.max_steps, initial=p.step, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and d.main and sys.stderr.isatty()))
    log_lines = cfg.progress and d.main and bar.disable  # no terminal (a log file, CI): periodic lines instead
    losses, metrics, window, stopped_early = [], {}, [], False
    t0 = started = last_line = time.perf_counter()
    first = p.step
    while p.step < run.max_steps:
        head_loss, norm, _, _ = train_step(run)
        loss = float((run.heads.weights * head_loss).sum())
        losses.append(loss)
        window.append((loss, head_loss))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        now = time.perf_counter()
        if log_lines and (now - last_line >= PROGRESS_SECONDS or p.step in (first + 1, run.max_steps)):
            rate = (p.step - first) / max(now - started, 1e-9)
            logger.info("step %d/%d loss %.4f (%.2f steps/s, about %.0f s left)", p.step, run.max_steps,
                        loss, rate, (run.max_steps - p.step) / rate)
            last_line = now
        if p.step % cfg.log_every == 0 or p.step == run.max_steps:
            log(run, _train_record(run, window, norm, time.perf_counter() - t0))
            window, t0 = [], time.perf_counter()
        stop_now = bool(d.all_sum(torch.tensor([float(stop.received is not None)])) > 0)  # any process
        last = p.step == run.max_steps
        new_best = False
        if run.data.val and not stop_now and ((cfg.eval_every and p.step % cfg.eval_every == 0) or last):
            metrics = evaluate_run(run) if d.main else {}
            if d.main:
                new_best = improved(run, metrics)
                log(run, {"step": p.step, "split": "eval", **metrics})
                logger.info("step %d eval: %s", p.step, _short(metrics))
            new_best, p.best, p.best_step, p.bad_evals = d.broadcast((new_best, p.best, p.best_step, p.bad_evals))
            if cfg.early_stopping_patience and p.bad_evals >= cfg.early_stopping_patience:
                stopped_early = True
        if new_best or last or stop_now or stopped_early or (cfg.save_every and p.step % cfg.save_every == 0):
            save(run)
        if stop_now or stopped_early:
            break
    bar.close()
    if stop.received:
        logger.warning("stopped by %s at step %d; checkpoint written to %s. Continue with `--resume` "
                       "(TrainConfig(resume=True)) and the same output_dir.", stop.received, p.step,
                       p.last_checkpoint)
    elif stopped_early:
        logger.info("early stopping at step %d: %s did not improve for %d evaluations", p.step,
                    cfg.metric_for_best, cfg.early_stopping_patience)
    best = run.out / f"{ckpt.PREFIX}{p.best_step}" if p.best_step is not None else None
    return TrainResult(p.step, metrics, losses, str(best) if best else None, p.best,
                       str(p.last_checkpoint) if p.last_checkpoint else None, str(run.out),
                       stopped_early, stop.received is not None)


def _train_record(run: Run, window: list, norm: float, seconds: float) -> dict:
    n = len(window)
    record = {"step": run.progress.step, "split": "train", "loss": sum(w[0] for w in window) / n}
    head_loss = sum(w[1] for w in window) / n
    for k, h in enumerate(run.heads.names):
        if h in run.heads.trained:
            record[f"{h}/loss"] = float(head_loss[k])
    record.update(lr=run.scheduler.get_last_lr()[0], grad_norm=norm, steps_per_s=n / max(seconds, 1e-9))
    return record


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# ---- command line --------------------------------------------------------------------------------
SET_HELP = ("override a setting; VALUE is read as JSON (5, 1e-4, true, null, [\"a\"], {\"n_embd\": 256}); "
            "anything that is not JSON is a string")


def parse_set(items) -> dict:
    """`--set KEY=VALUE` items -> {key: value}: the one grammar of both training command lines
    (`gpt2mh train` and `python -m gpt2mh.train`). VALUE is JSON where it parses as JSON (numbers,
    true/false/null, lists, objects), else the text itself (`--set base=rinna/japanese-gpt2-small`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m gpt2mh.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a .toml or .json file of TrainConfig settings")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from the latest checkpoint in output_dir (or from CHECKPOINT)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    d = TrainConfig.from_file(args.config).to_dict()
    try:
        d.update(parse_set(args.set))
    except ValueError as e:
        parser.error(str(e))
    if args.resume is not None:
        d["resume"] = args.resume
    if args.no_progress:
        d["progress"] = False
    return TrainConfig.from_dict(d)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = parse_args(argv)
        if int(os.environ.get("RANK", "0")) != 0:
            logging.getLogger().setLevel(logging.WARNING)
        result = train(cfg)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, TrainingDiverged) as e:
        logger.error("%s", e)
        return 1
    if result.interrupted:
        return 130
    logger.info("done at step %d; last checkpoint %s; best %s (%s=%s)", result.steps, result.last_checkpoint,
                result.best_checkpoint, cfg.metric_for_best, result.best_metric)
    return 0


if __name__ == "__main__":
    sys.exit(main())
