"""`gpt2mh train` and `gpt2mh eval`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .args import (
    UsageError,
    at_least,
    check_local,
    folder_arg,
    head_list,
    load_model_and_tokenizer,
    model_folder,
    pick_device,
    seed_arg,
)

DEFAULT_EVAL_TOKENS = 128  # gpt2mh.train.config.DEFAULT_MAX_NEW_TOKENS (not imported: --help stays torch-free)


TRAIN_EPILOG = """\
from scratch: give model_config (GPT2Config fields; n_inner defaults to 4 * n_embd) in the config file
  [model_config]
  n_embd = 256
  n_layer = 4
  n_head = 4
  n_positions = 256
or on the command line: --set 'model_config={"n_embd": 256, "n_layer": 4, "n_head": 4}'
(vocab_size and the special ids default to the tokenizer's).

resume: gpt2mh train --resume --output-dir RUN   continues RUN's newest checkpoint with its settings
"""


TRAIN_FLAGS = ("train_file", "validation_file", "heads", "output_dir", "base", "max_steps", "batch_size",
               "learning_rate", "seed", "device", "resume")


def cmd_train(args) -> None:
    from .._checks import merge_settings
    from ..train.config import TrainConfig, parse_set
    from ..train.loop import train

    if args.config and not Path(args.config).is_file():
        what = "is a folder" if Path(args.config).is_dir() else "no such file"
        raise UsageError(f"--config {args.config}: {what}; expected a TOML or JSON file of training settings")
    if args.resume and not (args.config or args.output_dir or args.train_file):
        raise UsageError("--resume: name the run to continue with --output-dir RUN (its newest checkpoint and "
                         "settings are used)")
    folder_arg(args.output_dir, "--output-dir")
    if args.device not in (None, "auto"):
        pick_device(args.device)
    try:
        cfg = TrainConfig.from_file(args.config) if args.config else None
    except ValueError as e:  # TrainConfig.from_file names the file: "PATH: not UTF-8 text (...)"
        if "not UTF-8 text" in str(e):
            raise UsageError(f"--config {e}") from None
        raise
    flags = {k: v for k, v in vars(args).items() if k in TRAIN_FLAGS and v is not None}
    try:  # a flag and a --set of one setting: the one rule (`_checks.merge_settings`)
        overrides = merge_settings([(lambda k, v: f"--{k.replace('_', '-')} {v}", flags),
                                    ("--set {key}={value}", parse_set(args.set or []))])
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg is None and args.resume and args.output_dir:
        cfg = saved_config(Path(args.output_dir))  # `train --resume --output-dir RUN`: the run's own settings
    if overrides.get("base"):
        check_local(overrides["base"], "--base")
    cfg = TrainConfig.from_dict({**(cfg.to_dict() if cfg else {}), **overrides})
    result = train(cfg)
    print(f"wrote {result.last_checkpoint} (step {result.steps})", file=sys.stderr)
    print(json.dumps({"best_checkpoint": result.best_checkpoint, "last_checkpoint": result.last_checkpoint,
                      "steps": result.steps, "metrics": result.metrics}, ensure_ascii=False, indent=2))
    if result.interrupted:
        raise SystemExit(130)  # stopped by SIGINT/SIGTERM: resumable, but not done


def saved_config(output_dir: Path):
    """The TrainConfig stored with the newest checkpoint of a training output folder."""
    from ..train.checkpoint import CONFIG_JSON
    from ..train.config import TrainConfig
    from ..weights.hub import latest_checkpoint

    last = latest_checkpoint(output_dir)
    if last is None or not (last / CONFIG_JSON).is_file():
        raise FileNotFoundError(f"--resume --output-dir {output_dir}: no checkpoint with a {CONFIG_JSON} there; "
                                f"start the run with --config FILE or --train-file ... first")
    return TrainConfig.from_file(last / CONFIG_JSON)


def cmd_eval(args) -> None:
    from ..train.evaluate import evaluate_file

    at_least("--samples", args.samples, 0, " (0: losses only; leave it out for every example)")
    at_least("--batch-size", args.batch_size, 1)
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    model, tok = load_model_and_tokenizer(args.model, args.device)
    heads = head_list(args.heads) or list(model.head_names)
    metrics, _, _ = evaluate_file(model, tok, model_folder(args.model), args.data, heads, samples=args.samples,
                                  max_new_tokens=args.max_new_tokens, input_column=args.input_column,
                                  batch_size=args.batch_size)
    print(json.dumps(metrics, ensure_ascii=False, indent=2))


def add_parsers(add) -> None:
    s = add("train", help="multi-task fine-tuning (flags, or a TOML/JSON config file)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    s.add_argument("--config", help="TOML or JSON file of TrainConfig fields")
    s.add_argument("--train-file", dest="train_file")
    s.add_argument("--validation-file", dest="validation_file")
    s.add_argument("--heads", type=lambda v: v.split(","), help="comma-separated head names")
    s.add_argument("--output-dir", dest="output_dir")
    s.add_argument("--base", help="HF/gpt2mh checkpoint folder, training output folder (its newest checkpoint) "
                   "or hub id, e.g. rinna/japanese-gpt2-small; without --base give model_config (below) "
                   "to train from scratch")
    s.add_argument("--max-steps", dest="max_steps", type=int)
    s.add_argument("--batch-size", dest="batch_size", type=int)
    s.add_argument("--learning-rate", dest="learning_rate", type=float)
    s.add_argument("--seed", type=seed_arg)
    s.add_argument("--device")
    s.add_argument("--resume", action="store_const", const=True,
                   help="continue from the latest checkpoint in --output-dir (with its saved settings, "
                        "unless --config is given)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other TrainConfig field; VALUE is read as JSON (5, 1e-4, true, null, [\"a\"], "
                        "{\"n_embd\": 256}), anything that is not JSON is a string (gpt2mh.train.parse_set)")
    s.set_defaults(func=cmd_train)
    s = add("eval", help="per-head metrics of a checkpoint on a data file")
    s.add_argument("data", help="CSV/TSV/JSONL with an input column and one column per head")
    s.add_argument("--model")
    s.add_argument("--heads")
    s.add_argument("--input-column", dest="input_column", default=None,
                   help="default: the run's input_column (train_config.json), else 'input'; target columns "
                        "follow the run's `columns` mapping")
    s.add_argument("--samples", type=int, default=None, help="examples whose generations are scored (default: all)")
    s.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None,
                   help="per scored generation (default: the run's eval_max_new_tokens from train_config.json, "
                        f"else {DEFAULT_EVAL_TOKENS})")
    s.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    s.add_argument("--device")
    s.set_defaults(func=cmd_eval)
