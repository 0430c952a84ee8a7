"""The offline demo: one Japanese sentence in, three outputs of different kinds out.

hironsancorpus (450 train / 50 test sentences) becomes a multi-task set — the katakana reading,
the named entities, the part-of-speech sequence — and one small GPT-2 trunk with three heads is
fine-tuned on it with the real rinna tokenizer. `--base rinna/japanese-gpt2-small` fine-tunes the
real model instead (from the HF cache or the hub)."""
from __future__ import annotations

from pathlib import Path

from .corpus import HEADS, char_accuracy, write_dataset
from .data import read_examples

# A fresh model small enough to train in a few minutes on 2 CPU cores; the vocabulary is rinna's.
SMALL_MODEL = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=32000,
                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
SMALL_STEPS = 300
BASE_STEPS = 300


def quickstart(output_dir: Path = Path("runs/quickstart"), base: str | None = None, steps: int | None = None,
               device: str = "cpu", show: int = 5, progress: bool = True) -> dict:
    from .generate import generate_text
    from .model import MultiHeadGPT2
    from .tokenizer import Tokenizer
    from .evaluate import evaluate
    from .train import TrainConfig, train

    output_dir = Path(output_dir)
    data = write_dataset(output_dir / "data")
    print(f"dataset: {data['train']} and {data['test']} (hironsancorpus, MIT) -> heads {', '.join(HEADS)}")
    cfg = TrainConfig(
        train_file=str(data["train"]), validation_file=str(data["test"]), heads=list(HEADS),
        output_dir=str(output_dir), base=base, model_config=None if base else dict(SMALL_MODEL),
        max_steps=steps or (BASE_STEPS if base else SMALL_STEPS), batch_size=8,
        learning_rate=5e-5 if base else 5e-3, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1,
        weight_decay=0.01 if base else 0.0,
        dropout=0.0 if base is None else None, eval_every=0, eval_samples=0, save_every=0, keep_last=1,
        max_length=192, seed=0, device=device, progress=progress,
    )
    result = train(cfg)
    best = result.last_checkpoint
    model = MultiHeadGPT2.from_pretrained(best, device=device)
    tok = Tokenizer.from_pretrained(best)

    test, _ = read_examples(data["test"], list(HEADS))
    metrics = evaluate(model, tok, test, list(HEADS), samples=None, max_new_tokens=160)
    shown = test[:show]
    outputs = generate_text(model, tok, [e.input for e in shown], compile=False, max_new_tokens=160)
    print(f"\nheld-out sentences ({len(shown)} of {len(test)}), every head's greedy output:")
    for i, ex in enumerate(shown):
        print(f"\n  input     {ex.input}")
        for h in HEADS:
            print(f"  {h:<9} {outputs[h][i]}")
            print(f"  {'(ref)':<9} {ex.targets[h]}")
    print(f"\nper-head held-out scores on all {len(test)} test sentences (greedy generation):")
    print(f"  {'head':<9} {'loss':>7} {'char acc':>9} {'exact':>7}")
    for h in HEADS:
        print(f"  {h:<9} {metrics[f'{h}/loss']:7.3f} {metrics[f'{h}/char_accuracy']:9.3f} {metrics[f'{h}/exact_match']:7.3f}")
    cross = cross_task_scores(outputs, shown)
    print("\neach head's outputs scored against every task's references (char accuracy; rows: head, cols: task):")
    print("  " + " " * 9 + "".join(f"{t:>10}" for t in HEADS))
    for h in HEADS:
        print(f"  {h:<9}" + "".join(f"{cross[h][t]:10.3f}" for t in HEADS))
    print(f"\ncheckpoint: {best}\ntry: gpt2mh generate --model {output_dir} 今日は東京で会議がありました。")
    return {"metrics": metrics, "cross": cross, "checkpoint": best}


def cross_task_scores(outputs: dict[str, list[str]], examples) -> dict[str, dict[str, float]]:
    """Head h's outputs scored on task t: high on the diagonal only if the heads learned different jobs."""
    return {h: {t: sum(char_accuracy(o, e.targets[t]) for o, e in zip(outputs[h], examples)) / len(examples)
                for t in HEADS} for h in HEADS}
