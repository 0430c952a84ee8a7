"""The `gpt2mh` command: download, convert, train, generate, eval, export-hf, bench, quickstart."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .hub import DEFAULT_REPO

DEFAULT_RUN = Path("runs/quickstart")


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


# ---- subcommands --------------------------------------------------------------------------------
def cmd_download(args) -> None:
    from .hub import download

    folder = download(args.repo, revision=args.revision, cache_dir=args.cache_dir)
    print(folder)


def cmd_convert(args) -> None:
    from .weights import PYTORCH_BIN, convert_bin

    src = Path(args.src)
    if src.is_dir():
        src = src / PYTORCH_BIN
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such .bin file")
    out = Path(args.out) if args.out else src.with_name("model.safetensors")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    print(convert_bin(src, out, overwrite=True))  # atomic: the old file stays until the new one is complete


def model_folder(src: str | None, revision: str | None = None) -> Path:
    """--model: a checkpoint folder, a training output folder (its newest checkpoint) or a hub id;
    None: the quickstart's result in runs/quickstart."""
    from .checkpoint import latest_checkpoint
    from .hub import resolve_checkpoint

    if src is None:
        if latest_checkpoint(DEFAULT_RUN) is None:
            raise UsageError(f"no --model given and no quickstart result in {DEFAULT_RUN}: "
                             "run `gpt2mh quickstart` first or pass --model FOLDER_OR_HUB_ID")
        src = str(DEFAULT_RUN)
    folder = resolve_checkpoint(src, revision=revision)
    if not (folder / "config.json").is_file() and latest_checkpoint(folder) is not None:
        folder = latest_checkpoint(folder)  # a training output folder: its newest checkpoint
    return folder


def load_model_and_tokenizer(src: str | None, device: str | None, revision: str | None = None):
    from .model import MultiHeadGPT2
    from .tokenizer import Tokenizer

    folder = model_folder(src, revision)
    model = MultiHeadGPT2.from_pretrained(folder, device=pick_device(device))
    tok = Tokenizer.from_pretrained(folder if (folder / "spiece.model").is_file() else None)
    return model, tok


def pick_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def parse_head_controls(specs: list[str], names) -> dict:
    """`--head reading:temperature=0,max_new_tokens=40` -> {"reading": {...}}."""
    from .sampling import SamplingConfig

    per_head = {}
    for spec in specs or []:
        name, sep, rest = spec.partition(":")
        if not sep:
            raise UsageError(f"--head {spec!r}: expected NAME:key=value,... (e.g. reading:do_sample=false)")
        if name not in names:
            raise UsageError(f"--head {spec!r}: unknown head {name!r}; the model has {list(names)}")
        per_head[name] = control_dict(SamplingConfig.from_string(rest))
    return per_head


def control_dict(cfg) -> dict:
    from dataclasses import fields

    from .sampling import SamplingConfig

    default = SamplingConfig()
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def read_inputs(args) -> list[str]:
    if args.text:
        return list(args.text)
    if args.file:
        path = Path(args.file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such input file") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not UTF-8 text ({e})") from None
    else:
        lines = sys.stdin.read().splitlines()
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise UsageError("no input text: give TEXT arguments, --file FILE or lines on stdin")
    return texts


def cmd_generate(args) -> None:
    from .generate import generate_text, stream
    from .prompt import encode_prompts
    from .sampling import SamplingConfig

    model, tok = load_model_and_tokenizer(args.model, args.device, args.revision)
    heads = args.heads.split(",") if args.heads else None
    names = [model.head_names[i] for i in model.head_index(heads)]
    controls = control_dict(SamplingConfig.from_string(args.controls)) if args.controls else {}
    if args.max_new_tokens:
        controls["max_new_tokens"] = args.max_new_tokens
    kwargs = dict(per_head=parse_head_controls(args.head, names), compile=args.compile, seed=args.seed, **controls)
    texts = read_inputs(args)
    if args.stream:
        ids, mask = encode_prompts(tok, texts, model)
        current = None
        for head, row, piece in stream(model, tok, ids, mask, heads, **kwargs):
            if (head, row) != current:
                print(("\n" if current else "") + f"[{head} #{row}] ", end="")
                current = (head, row)
            print(piece, end="", flush=True)
        print()
        return
    out = generate_text(model, tok, texts, heads, **kwargs)
    for i, text in enumerate(texts):
        row = {"input": text, **{h: out[h][i] for h in names}}
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(text)
            for h in names:
                print(f"  {h:>{max(map(len, names))}}: {row[h]}")


def cmd_export(args) -> None:
    from .export import export_hf_from_checkpoint

    # like generate and eval, --model may be a training output folder (runs/quickstart): its newest checkpoint
    print(export_hf_from_checkpoint(model_folder(args.model), args.head, args.out, overwrite=args.overwrite))


def cmd_bench(args) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"bench_{args.which}.py"
    if not script.is_file():
        raise UsageError(f"{script} not found: the benchmarks ship with the source checkout of gpt2mh")
    sys.exit(subprocess.call([sys.executable, str(script), *args.rest]))


def cmd_train(args) -> None:
    from .train import TrainConfig, train

    cfg = TrainConfig.from_file(args.config) if args.config else None
    overrides = {k: v for k, v in vars(args).items() if k in TRAIN_FLAGS and v is not None}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = parse_value(value)
    cfg = TrainConfig.from_dict({**(cfg.to_dict() if cfg else {}), **overrides})
    result = train(cfg)
    print(json.dumps({"best_checkpoint": result.best_checkpoint, "last_checkpoint": result.last_checkpoint,
                      "steps": result.steps, "metrics": result.metrics}, ensure_ascii=False, indent=2))
    if result.interrupted:
        raise SystemExit(130)  # stopped by SIGINT/SIGTERM: resumable, but not done


def cmd_eval(args) -> None:
    from .data import read_examples
    from .evaluate import evaluate

    model, tok = load_model_and_tokenizer(args.model, args.device)
    heads = args.heads.split(",") if args.heads else list(model.head_names)
    examples, report = read_examples(args.data, heads, input_column=args.input_column)
    print(report.summary(), file=sys.stderr)
    metrics = evaluate(model, tok, examples, heads, samples=args.samples, max_new_tokens=args.max_new_tokens)
    print(json.dumps(metrics, ensure_ascii=False, indent=2))


def cmd_quickstart(args) -> None:
    from .quickstart import quickstart

    quickstart(output_dir=Path(args.output_dir), base=args.base, steps=args.steps, device=pick_device(args.device),
               show=args.show)


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---- parser -------------------------------------------------------------------------------------
TRAIN_FLAGS = ("train_file", "validation_file", "heads", "output_dir", "base", "max_steps", "batch_size",
               "learning_rate", "seed", "device", "resume")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2mh", description="One GPT-2 trunk, N output heads: train, generate, export.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("download", help="fetch a hub checkpoint into the standard HF cache")
    s.add_argument("repo", nargs="?", default=DEFAULT_REPO, help=f"hub repo id (default {DEFAULT_REPO})")
    s.add_argument("--revision", help="branch, tag or commit hash to pin")
    s.add_argument("--cache-dir", help="cache folder (default: the HF cache, HF_HOME)")
    s.set_defaults(func=cmd_download)

    s = sub.add_parser("convert", help="pytorch_model.bin -> model.safetensors (read with weights_only=True)")
    s.add_argument("src", help="a .bin file or a folder holding pytorch_model.bin")
    s.add_argument("--out", help="output file (default: model.safetensors beside the .bin)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("train", help="multi-task fine-tuning (flags, or a TOML/JSON config file)")
    s.add_argument("--config", help="TOML or JSON file of TrainConfig fields")
    s.add_argument("--train-file", dest="train_file")
    s.add_argument("--validation-file", dest="validation_file")
    s.add_argument("--heads", type=lambda v: v.split(","), help="comma-separated head names")
    s.add_argument("--output-dir", dest="output_dir")
    s.add_argument("--base", help="HF/gpt2mh checkpoint folder or hub id (default: train from scratch)")
    s.add_argument("--max-steps", dest="max_steps", type=int)
    s.add_argument("--batch-size", dest="batch_size", type=int)
    s.add_argument("--learning-rate", dest="learning_rate", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--device")
    s.add_argument("--resume", action="store_const", const=True, help="continue from the latest checkpoint")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other TrainConfig field")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("generate", help="every head's output for each input text")
    s.add_argument("text", nargs="*", help="input text(s); else --file or stdin")
    s.add_argument("--model", help="checkpoint folder, training output folder or hub id (default: runs/quickstart)")
    s.add_argument("--revision")
    s.add_argument("--file", help="one input per line")
    s.add_argument("--heads", help="comma-separated subset of heads")
    s.add_argument("--controls", help="controls for all heads, e.g. do_sample=true,temperature=1.5,top_p=0.95")
    s.add_argument("--head", action="append", metavar="NAME:KEY=VALUE,...", help="controls for one head")
    s.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--json", action="store_true", help="one JSON object per input (JSONL)")
    s.add_argument("--stream", action="store_true", help="print text as it is produced")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step (pays off for long or repeated runs)")
    s.add_argument("--device")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("eval", help="per-head metrics of a checkpoint on a data file")
    s.add_argument("data", help="CSV/TSV/JSONL with an input column and one column per head")
    s.add_argument("--model")
    s.add_argument("--heads")
    s.add_argument("--input-column", dest="input_column", default="input")
    s.add_argument("--samples", type=int, default=50, help="examples whose generations are scored")
    s.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=128)
    s.add_argument("--device")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("export-hf", help="one head -> a transformers GPT2LMHeadModel folder")
    s.add_argument("--model", required=True)
    s.add_argument("--head", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("bench", help="run a benchmark script (benchmarks/bench_<which>.py)")
    s.add_argument("which", choices=["generate", "finetune"])
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("quickstart", help="offline demo: fine-tune N heads on hironsancorpus, show every head's output")
    s.add_argument("--base", help="start from this checkpoint (e.g. rinna/japanese-gpt2-small) instead of a small fresh model")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: enough for a few minutes on CPU)")
    s.add_argument("--output-dir", dest="output_dir", default=str(DEFAULT_RUN))
    s.add_argument("--show", type=int, default=5, help="held-out sentences to print")
    s.add_argument("--device")
    s.set_defaults(func=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("gpt2mh: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        print(f"gpt2mh {args.command}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, KeyError, FileNotFoundError, NotADirectoryError, TypeError)) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
