"""The offline demo: one Japanese sentence in, three outputs of completely different kinds out.

hironsancorpus (450 train / 50 test sentences) becomes a multi-task set (gpt2mh.demo.corpus): a sentence
label (`tense`), an extraction (`entities`), a tag sequence (`pos`). One small GPT-2 trunk with three
heads is trained on it from scratch with the real rinna tokenizer, and every head's held-out score is
printed beside its trivial answer (gpt2mh.demo.baselines). `--base rinna/japanese-gpt2-small` fine-tunes
the real model instead (from the HF cache or the hub)."""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

from ..api import MultiHeadGPT2
from ..tokenizer import Tokenizer
from ..train.config import TrainConfig
from ..train.evaluate import evaluate_file
from ..train.loop import METRICS_FILE, train
from ..train.metrics import char_accuracy
from ..weights.hub import list_checkpoints
from .baselines import score_answer, trivial_scores
from .corpus import HEADS, build_examples, entity_lookup, pos_lookup, write_dataset

# A fresh model that trains in under 4 minutes on 2 CPU cores; the vocabulary is rinna's (32000), so
# the three [n_embd, 32000] heads cost more than the trunk: logits are computed only at labels.
SMALL_MODEL = dict(n_embd=128, n_layer=3, n_head=4, n_inner=512, n_positions=256, vocab_size=32000,
                   bos_token_id=1, eos_token_id=2, pad_token_id=3)


SMALL_STEPS = 360
SMALL_BATCH = 16
BASE_STEPS = 300
BUDGET_FACTOR = 1.25  # a head generates at most 1.25 x its longest training target (in tokens)


def quickstart(output_dir: Path = Path("runs/quickstart"), base: str | None = None, steps: int | None = None,
               device: str = "cpu", show: int = 5, progress: bool = True, resume: bool = False,
               command: str = "gpt2mh quickstart --resume") -> dict:
    """Build the data, train, then score the result on the held-out file. A second run starts over
    (the previous run's checkpoints are removed) unless resume=True, which continues the newest
    checkpoint. Returns {"interrupted": True} when training is stopped by SIGINT/SIGTERM: the
    half-trained model is not evaluated; `command` is how to continue it."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a whole number >= 1 (None: the default), got {steps!r}")
    output_dir = Path(output_dir)
    previous = list_checkpoints(output_dir)
    if previous and not resume:
        if not (output_dir / "data" / "train.jsonl").is_file():
            raise FileExistsError(f"{output_dir} holds checkpoints that are not a quickstart's (no data/train.jsonl); "
                                  f"pick another --output-dir")
        print(f"{output_dir} holds a previous quickstart run ({previous[-1][1].name}): starting over "
              f"(pass --resume to continue it instead)", file=sys.stderr)
        for _, folder in previous:
            shutil.rmtree(folder)
        (output_dir / METRICS_FILE).unlink(missing_ok=True)
    elif resume:
        print(f"continuing {previous[-1][1]}" if previous else f"--resume: nothing in {output_dir} yet; starting",
              file=sys.stderr)
    tok = Tokenizer.from_pretrained(None)  # rinna's, as the run trains with (a --base brings the same one)
    data = write_dataset(output_dir / "data")
    train_examples = build_examples("train")
    print(f"dataset: {data['train']} and {data['test']} (hironsancorpus, MIT) -> heads {', '.join(HEADS)}")
    cfg = TrainConfig(
        **train_settings(base, steps), train_file=str(data["train"]), validation_file=str(data["test"]),
        heads=list(HEADS), output_dir=str(output_dir), device=device, progress=progress,
        resume=bool(resume and previous), eval_max_new_tokens=generation_budgets(train_examples, HEADS, tok),
    )
    result = train(cfg)
    if result.interrupted:
        print(f"stopped at step {result.steps} of {cfg.max_steps}; checkpoint {result.last_checkpoint}; "
              f"not evaluated. Continue with: {command}", file=sys.stderr)
        return {"interrupted": True, "checkpoint": result.last_checkpoint}
    best = result.last_checkpoint
    print(f"wrote {best}", file=sys.stderr)
    model = MultiHeadGPT2.from_pretrained(best, device=device)
    tok = Tokenizer.from_pretrained(best)

    # the same function, defaults and settings as `gpt2mh eval --model {output_dir} {test file}`
    metrics, test, outputs = evaluate_file(model, tok, best, data["test"], list(HEADS), progress=progress)
    n = len(test)
    if show:
        print(f"\nheld-out sentences ({min(show, n)} of {n}), every head's greedy output:")
    for i, ex in enumerate(test[:show]):
        print(f"\n  input     {ex.input}")
        for h in HEADS:
            print(f"  {h:<9} {outputs[h][i]}")
            print(f"  {'(ref)':<9} {ex.targets[h]}")
    trivial = trivial_scores(test, train_examples, HEADS)
    print(f"\nper-head held-out scores on all {n} test sentences (greedy generation), beside each head's "
          f"trivial answer on the same sentences:")
    print(f"  {'head':<9} {'loss':>7} {'char acc':>9} {'exact':>7}   {'trivial:':<8} {'char acc':>8} {'exact':>7}"
          f"  {'error cut':>9}  trivial answer")
    for h in HEADS:
        acc, t = metrics[f"{h}/char_accuracy"], trivial[h]
        cut = 1 - (1 - acc) / max(1 - t["char_accuracy"], 1e-9)  # how much of the trivial answer's error is gone
        print(f"  {h:<9} {metrics[f'{h}/loss']:7.3f} {acc:9.3f} {metrics[f'{h}/exact_match']:7.3f}   {'':<8} "
              f"{t['char_accuracy']:8.3f} {t['exact_match']:7.3f}  {cut:9.0%}  {t['answer']}")
    references = {"entities": score_answer(entity_lookup(), test, "entities"),
                  "pos": score_answer(pos_lookup(), test, "pos")}
    print("  references that need no model but know the training set (not trivial answers; what a model that "
          "learned the training set and aligned its output with its input could reach):")
    for h, how in (("entities", "every training entity looked up in the input"),
                   ("pos", "the input cut into training words, each with its most frequent tag")):
        print(f"  {h:<9} {'':>7} {references[h]['char_accuracy']:9.3f} {references[h]['exact_match']:7.3f}   {how}")
    cross = cross_task_scores(outputs, test)
    print(f"\neach head's outputs scored against every task's references on all {n} test sentences "
          f"(char accuracy; rows: head, cols: task):")
    print("  " + " " * 9 + "".join(f"{t:>10}" for t in HEADS))
    for h in HEADS:
        print(f"  {h:<9}" + "".join(f"{cross[h][t]:10.3f}" for t in HEADS))
    print(f"\ncheckpoint: {best}\nthe same scores: gpt2mh eval --model {output_dir} {data['test']}"
          f"\ntry: gpt2mh generate --model {output_dir} 今日は東京で会議がありました。")
    return {"metrics": metrics, "trivial": trivial, "references": references, "cross": cross, "checkpoint": best}


def train_settings(base: str | None = None, steps: int | None = None) -> dict:
    """The quickstart's TrainConfig fields other than data, heads and paths (benchmarks/experiments/quality.py uses them too)."""
    return dict(
        base=base, model_config=None if base else dict(SMALL_MODEL),
        max_steps=steps or (BASE_STEPS if base else SMALL_STEPS), batch_size=8 if base else SMALL_BATCH,
        learning_rate=5e-5 if base else 5e-3, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1,
        weight_decay=0.01 if base else 0.0, dropout=0.0 if base is None else None,
        eval_every=0, eval_samples=0, save_every=0, keep_last=1, max_length=192, seed=0,
    )


def generation_budgets(examples, heads, tokenizer) -> dict[str, int]:
    """{head: max_new_tokens}: BUDGET_FACTOR x the head's longest training target, </s> included."""
    return {h: math.ceil(BUDGET_FACTOR * max(len(tokenizer.encode(ex.targets[h])) for ex in examples
                                             if h in ex.targets)) for h in heads}


def cross_task_scores(outputs: dict[str, list[str]], examples) -> dict[str, dict[str, float]]:
    """Head h's outputs scored on task t: high on the diagonal only if the heads learned different jobs."""
    return {h: {t: sum(char_accuracy(o, e.targets[t]) for o, e in zip(outputs[h], examples)) / len(examples)
                for t in HEADS} for h in HEADS}
