"""A `Run` from a `TrainConfig`: the model and its new heads, the tokenizer, the data, the
optimizer and schedule, the data order, and the state restored from a checkpoint."""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from ..config import GPT2Config
from ..inputs import check_vocab
from ..model import GPT2
from ..tokenizer import Tokenizer
from ..weights.folder import load_model, read_meta
from ..weights.hub import latest_checkpoint, list_checkpoints, resolve_model
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import Example, read_examples, split_examples
from .distributed import Dist
from .packing import PackedExample, PackedLoss, pack_examples

logger = logging.getLogger(__name__)


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
    folder = resolve_model(cfg.base)
    meta = read_meta(folder)
    saved = list(meta["head_names"]) if meta else []
    names = _merge(cfg.heads or saved, add)
    if not names:
        raise ValueError(f"{cfg.base} is a plain GPT-2 checkpoint: set heads=[...] (one per target)")
    return load_model(folder, names), [n for n in names if n not in saved]


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
        return Tokenizer.for_model(resolve_model(cfg.base))
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
        if list_checkpoints(out):
            raise FileExistsError(f"{out} already holds checkpoints; resume with --resume "
                                  f"(resume=True) or choose another output_dir")
        return None
    if cfg.resume is True:
        found = latest_checkpoint(out)
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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
