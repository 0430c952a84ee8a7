"""Supervised multi-task fine-tuning: one shared trunk, one head per target column (run_clm.py's job).

    cfg = TrainConfig(train_file="train.jsonl", heads=["reading", "pos"], base="rinna/japanese-gpt2-small")
    result = train(cfg)            # or: gpt2mh train --config run.toml [--resume]
                                   #     torchrun --nproc-per-node 2 -m gpt2mh train --config run.toml

Batch semantics: `batch_size` is the number of examples per optimizer step, whatever the hardware.
It is split into `gradient_accumulation_steps` micro-steps and each micro-step across the processes
of a torchrun launch; every head's loss is normalised by its label count over the whole step, so
accumulated and data-parallel runs compute the same loss and gradients as one big batch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import setup_distributed
from .evaluate import PROGRESS_SECONDS, evaluate
from .packing import collate
from .setup import Run, StepResult, setup, shard, step_indices

logger = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


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
