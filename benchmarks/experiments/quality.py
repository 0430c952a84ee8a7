"""Hard parameter sharing against separate models: held-out quality, training time, storage.

On the quickstart's data (hironsancorpus, gpt2mh.demo.corpus; or --train/--test files and --heads), with
the quickstart's model, optimizer settings and generation budgets, for each seed:
  shared         one trunk with N heads, `steps` optimizer steps (what `gpt2mh quickstart` trains)
  separate       N single-head models, `steps` steps each (the same steps per task: N x the trunk work)
  separate-1/N   N single-head models, steps // N each (the same number of examples through a trunk
                 as `shared`: the same compute budget, split over N models)
Every model is trained by `gpt2mh.train.train` and scored by `gpt2mh.train.evaluate.evaluate_file` (what
`gpt2mh eval` prints) on every test row: per-head char accuracy and exact match, then mean and
standard deviation over the seeds; beside them each head's trivial answer (gpt2mh.demo.baselines).
Training time is measured; parameters stored and checkpoint bytes are those of what a user keeps
(one folder for `shared`, N for the others).

    python benchmarks/experiments/quality.py                      # 3 seeds, the quickstart's steps
    python benchmarks/experiments/quality.py --seeds 0 && python benchmarks/experiments/quality.py --seeds 1 --add
    python benchmarks/experiments/quality.py --base rinna/japanese-gpt2-small   # from a pretrained checkpoint

--base needs that checkpoint (HF cache or hub); it was not run for the published figures (no network
to fetch rinna's weights where they were measured). Writes JSON and a plot (benchmarks/results/)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402  (the harness in benchmarks/)

SYSTEMS = ("shared", "separate", "separate-1/N")


def train_and_score(cfg, heads, test_file, train_examples, tokenizer) -> dict:
    from gpt2mh import MultiHeadGPT2
    from gpt2mh.train.evaluate import evaluate_file
    from gpt2mh.train.loop import train

    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    folder = Path(result.last_checkpoint)
    model = MultiHeadGPT2.from_pretrained(folder)
    metrics, _, _ = evaluate_file(model, tokenizer, folder, test_file, heads, progress=False)
    return {"seconds": seconds, "parameters": sum(p.numel() for p in model.parameters()),
            "bytes": (folder / "model.safetensors").stat().st_size,
            "scores": {h: {"char_accuracy": metrics[f"{h}/char_accuracy"], "exact_match": metrics[f"{h}/exact_match"]}
                       for h in heads}}


def run_system(system: str, base_cfg, heads, test_file, train_examples, tokenizer, work: Path) -> dict:
    """One system, one seed: {seconds, parameters, bytes, scores: {head: {...}}} summed over its models."""
    if system == "shared":
        cfg = dataclasses.replace(base_cfg, heads=list(heads), output_dir=str(work / "shared"))
        return train_and_score(cfg, heads, test_file, train_examples, tokenizer)
    steps = base_cfg.max_steps if system == "separate" else max(1, base_cfg.max_steps // len(heads))
    total = {"seconds": 0.0, "parameters": 0, "bytes": 0, "scores": {}}
    for h in heads:
        budget = base_cfg.eval_max_new_tokens
        cfg = dataclasses.replace(base_cfg, heads=[h], max_steps=steps, output_dir=str(work / system.replace("/", "") / h),
                                  eval_max_new_tokens={h: budget[h]} if isinstance(budget, dict) else budget)
        one = train_and_score(cfg, [h], test_file, train_examples, tokenizer)
        for key in ("seconds", "parameters", "bytes"):
            total[key] += one[key]
        total["scores"][h] = one["scores"][h]
    total["steps_per_model"] = steps
    return total


def summarise(runs: list[dict], heads) -> dict:
    def stats(xs):
        return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}

    return {"seconds": stats([r["seconds"] for r in runs]), "parameters": runs[0]["parameters"],
            "bytes": runs[0]["bytes"],
            "scores": {h: {m: stats([r["scores"][h][m] for r in runs]) for m in ("char_accuracy", "exact_match")}
                       for h in heads}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, systems = result["heads"], list(result["systems"])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / (len(systems) + 1)
    for i, s in enumerate(systems):
        sc = result["systems"][s]["scores"]
        ax.bar([k + i * width for k in range(len(heads))], [sc[h]["char_accuracy"]["mean"] for h in heads], width,
               yerr=[sc[h]["char_accuracy"]["std"] for h in heads], capsize=3, label=s)
    ax.bar([k + len(systems) * width for k in range(len(heads))],
           [result["trivial"][h]["char_accuracy"] for h in heads], width, color="lightgray", label="trivial answer")
    ax.set_xticks([k + width * len(systems) / 2 for k in range(len(heads))], heads)
    ax.set_ylabel("held-out char accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"shared trunk vs separate models ({result['steps']} steps, {len(result['seeds'])} seeds, "
                 f"{result['n_test']} test rows)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(result: dict) -> str:
    heads = result["heads"]
    lines = ["| system | " + " | ".join(f"{h} char / exact" for h in heads) + " | train s | parameters | checkpoint MB |",
             "|---|" + "---|" * (len(heads) + 3)]
    for s, r in result["systems"].items():
        cells = [f"{r['scores'][h]['char_accuracy']['mean']:.3f}±{r['scores'][h]['char_accuracy']['std']:.3f} / "
                 f"{r['scores'][h]['exact_match']['mean']:.3f}" for h in heads]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {r['seconds']['mean']:.0f} | {r['parameters'] / 1e6:.2f}M | "
                     f"{r['bytes'] / 1e6:.1f} |")
    t = result["trivial"]
    lines.append("| trivial answer | " + " | ".join(f"{t[h]['char_accuracy']:.3f} / {t[h]['exact_match']:.3f}"
                                                  for h in heads) + " | – | – | – |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from gpt2mh.demo import quickstart as qs
    from gpt2mh.demo.baselines import trivial_scores
    from gpt2mh.demo.corpus import HEADS, write_dataset
    from gpt2mh.tokenizer import Tokenizer
    from gpt2mh.train.config import TrainConfig
    from gpt2mh.train.data import read_examples

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the shared model (default: the quickstart's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base", default=None, help="a pretrained checkpoint (hub id or folder) instead of from scratch")
    p.add_argument("--train", default=None, help="training file (default: the quickstart's)")
    p.add_argument("--test", default=None, help="held-out file (default: the quickstart's)")
    p.add_argument("--heads", default=None, help="comma-separated heads (default: the quickstart's)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--out", default=str(common.RESULTS / "quality-cpu.json"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--add", action="store_true", help="add these seeds' runs to an existing --out file")
    args = p.parse_args(argv)
    heads = args.heads.split(",") if args.heads else list(HEADS)
    tokenizer = Tokenizer.from_pretrained(args.base if args.base and Path(args.base).is_dir() else None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.train is None:
            files = write_dataset(work / "data")
            args.train, args.test = str(files["train"]), args.test or str(files["test"])
        train_examples, _ = read_examples(args.train, heads)
        test_examples, _ = read_examples(args.test, heads)
        base_cfg = TrainConfig(**{**qs.train_settings(args.base, args.steps), "train_file": args.train,
                                  "heads": heads, "device": args.device, "progress": False,
                                  "eval_max_new_tokens": qs.generation_budgets(train_examples, heads, tokenizer)})
        result = {"benchmark": "quality", "machine": common.machine_info(common.torch.device(args.device)),
                  "base": args.base, "model_config": base_cfg.model_config, "steps": base_cfg.max_steps,
                  "batch_size": base_cfg.batch_size, "learning_rate": base_cfg.learning_rate, "seeds": args.seeds,
                  "heads": heads, "n_train": len(train_examples), "n_test": len(test_examples),
                  "trivial": trivial_scores(test_examples, train_examples, heads), "systems": {}, "runs": []}
        old = json.loads(Path(args.out).read_text(encoding="utf-8")) if args.add and Path(args.out).is_file() else None
        if old is not None:  # --add: more seeds for the same settings, in a later process
            same = ("base", "model_config", "steps", "batch_size", "learning_rate", "heads")
            if any(old[k] != result[k] for k in same):
                raise SystemExit(f"--add: {args.out} was run with other settings ({', '.join(same)})")
            result["runs"], result["seeds"] = old["runs"], sorted(set(old["seeds"]) | set(args.seeds))
        systems = args.systems.split(",")
        for seed in args.seeds:  # seeds outermost: a benchmark cut off keeps whole seeds
            for system in systems:
                common.log(f"{system}, seed {seed}")
                cfg = dataclasses.replace(base_cfg, seed=seed)
                r = run_system(system, cfg, heads, args.test, train_examples, tokenizer,
                               work / f"{system}-{seed}".replace("/", ""))
                result["runs"].append({"system": system, "seed": seed, **r})
                common.log(f"  {r['seconds']:.0f} s: " + ", ".join(
                    f"{h} {v['char_accuracy']:.3f}/{v['exact_match']:.3f}" for h, v in r["scores"].items()))
                result["systems"] = {s: summarise([r for r in result["runs"] if r["system"] == s], heads)
                                     for s in systems if any(r["system"] == s for r in result["runs"])}
                out = common.write_json(args.out, result)  # after every run: a cut-off benchmark keeps its figures
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
