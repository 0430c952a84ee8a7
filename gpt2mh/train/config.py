"""`TrainConfig`: one fine-tuning run's settings (the keys of its TOML/JSON file), read, checked and
written; `parse_set` reads the command line's `--set KEY=VALUE`."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tomllib
import torch

from .._checks import SEED_RANGE, float_setting, merge_settings
from ..model import GPT2, check_head_names
from .packing import TRUNCATION

SCHEDULES = ("cosine", "linear", "constant")
# Generation budget of the scored greedy outputs when neither the call nor the run sets one
# (eval_max_new_tokens): training-time evaluation, `gpt2mh eval` and the quickstart.
DEFAULT_MAX_NEW_TOKENS = 128


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
    truncation: str = "truncate"               # or "drop" (see gpt2mh.train.packing)
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
        self._check_floats()
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
            (len(self.adam_betas) == 2,
             f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}"),
            (SEED_RANGE[0] <= self.seed < SEED_RANGE[1], f"seed must be an integer in [0, 2**32), got {self.seed}"),
            (not (self.validation_file and self.validation_fraction),
             "give validation_file or validation_fraction, not both"),
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
        bad = {h: w for h, w in (self.loss_weights or {}).items() if not _float_ok(f"loss_weights[{h!r}]", w, 0.0)}
        if bad:
            raise ValueError(f"loss_weights must be finite numbers >= 0: {bad}")
        if model is not None:
            self._check_against(model, device, world)
        if validation is not None:
            self._check_validation(model, validation)

    def _check_floats(self) -> None:
        """Every float setting by the one rule of `_checks.float_setting` (finite in float32, in its range;
        a learning rate, adam_eps or a clipping norm a normal float32: in float32 1e-320 is 0, 1e39 inf)."""
        for name, (low, high, low_open, high_open, allowed) in _FLOAT_SETTINGS.items():
            value = getattr(self, name)
            if value is None:
                continue
            try:
                setattr(self, name, float_setting(name, value, low, high, low_open=low_open, high_open=high_open,
                                                  normal=name in _SCALES))
            except ValueError as e:
                reason = str(e).partition("is out of range: ")[2]
                raise ValueError(f"{name} must be {allowed}, got {value!r} ({reason})") from None
        if not all(_float_ok("adam_betas", b, 0.0, 1.0, high_open=True) for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")

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




# name -> (low, high, low open?, high open?, the domain in words)
_FLOAT_SETTINGS = {
    "learning_rate": (0.0, math.inf, True, False, "finite and > 0"),
    "weight_decay": (0.0, math.inf, False, False, "finite and >= 0"),
    "adam_eps": (0.0, math.inf, True, False, "finite and > 0"),
    "min_lr_ratio": (0.0, 1.0, False, False, "in [0, 1]"),
    "max_grad_norm": (0.0, math.inf, False, False, "None or 0 (no clipping) or a finite number > 0"),
    "validation_fraction": (0.0, 1.0, False, True, "in [0, 1)"),
    "dropout": (0.0, 1.0, False, True, "in [0, 1)"),
    "epochs": (0.0, math.inf, True, False, "finite and > 0"),
}


_SCALES = ("learning_rate", "adam_eps", "max_grad_norm")  # scale or divide float32 updates: normal float32s


def _float_ok(name, value, low, high=math.inf, *, high_open=False) -> bool:
    try:
        float_setting(name, value, low, high, high_open=high_open)
    except ValueError:
        return False
    return True


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


# ---- command line --------------------------------------------------------------------------------
SET_HELP = ("override a setting; VALUE is read as JSON (5, 1e-4, true, null, [\"a\"], {\"n_embd\": 256}); "
            "anything that is not JSON is a string")


def parse_set(items) -> dict:
    """`--set KEY=VALUE` items -> {key: value}: the one grammar of both training command lines
    (`gpt2mh train`). VALUE is JSON where it parses as JSON (numbers,
    true/false/null, lists, objects), else the text itself (`--set base=rinna/japanese-gpt2-small`)."""
    sources = []  # each item its own source: a key set twice must say one value (`merge_settings`)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        sources.append((lambda k, v, item=item: f"--set {item}", {key.strip(): parsed}))
    return merge_settings(sources)
