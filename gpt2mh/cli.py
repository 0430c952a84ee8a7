"""The `gpt2mh` command: download, convert, train, generate, eval, export-hf, bench, quickstart."""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from .hub import DEFAULT_REPO, download, looks_like_path, resolve_checkpoint

DEFAULT_RUN = Path("runs/quickstart")


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


# ---- subcommands --------------------------------------------------------------------------------
def cmd_download(args) -> None:
    if looks_like_path(args.repo) or Path(args.repo).expanduser().exists():
        raise UsageError(f"download {args.repo}: expected a hub repo id such as {DEFAULT_REPO}; a local folder "
                         f"needs no download: pass it to --model or --base as it is")
    try:
        folder = download(args.repo, revision=args.revision, cache_dir=args.cache_dir)
    except FileNotFoundError as e:
        if not hub_offline():
            raise
        # the generic advice ("run gpt2mh download") is this very command: say what to do instead
        raise FileNotFoundError(
            f"could not get {args.repo!r}: HF_HUB_OFFLINE is set and it is not in the HF cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}). Unset HF_HUB_OFFLINE on a machine that "
            f"reaches huggingface.co and run this again, or copy the model folder (config.json + weights) "
            f"here and pass its path to --model/--base") from e
    print(f"downloaded {args.repo} into {folder}", file=sys.stderr)
    print(folder)


def hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def cmd_convert(args) -> None:
    from .weights import PYTORCH_BIN, convert_bin

    src = Path(args.src)
    if src.is_dir():
        src = src / PYTORCH_BIN
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such .bin file")
    out = Path(args.out) if args.out else src.with_name("model.safetensors")
    if out.is_dir():  # like SRC, a folder means the file in it
        out = out / "model.safetensors"
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    print(convert_bin(src, out, overwrite=True))  # atomic: the old file stays until the new one is complete


def model_folder(src: str | None, revision: str | None = None) -> Path:
    """--model: a checkpoint folder, a training output folder (its newest checkpoint) or a hub id;
    None: the quickstart's result in runs/quickstart."""
    from .checkpoint import latest_checkpoint

    if src is None:
        if latest_checkpoint(DEFAULT_RUN) is None:
            raise UsageError(f"no --model given and no quickstart result in {DEFAULT_RUN}: "
                             "run `gpt2mh quickstart` first or pass --model FOLDER_OR_HUB_ID")
        src = str(DEFAULT_RUN)
    check_local(src, "--model")
    if revision is not None and Path(src).expanduser().exists():  # it would be ignored
        raise UsageError(f"--revision {revision}: pins a commit of a hub repo, but --model {src} is a local "
                         f"folder; leave --revision out")
    folder = resolve_checkpoint(src, revision=revision)
    if not (folder / "config.json").is_file() and latest_checkpoint(folder) is not None:
        folder = latest_checkpoint(folder)  # a training output folder: its newest checkpoint
    return folder


def check_local(src: str, flag: str) -> None:
    """`runs/quikstart` has the shape of a hub id (owner/name), but when `runs/` is a local folder it is
    a mistyped path: report the missing folder instead of asking the hub for it."""
    path = Path(src).expanduser()
    if path.exists() or looks_like_path(src):  # a path-shaped src: resolve_checkpoint reports it
        return
    parent = path.parent
    if parent.is_dir():
        import difflib

        near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir() if p.is_dir()], n=1)
        hint = f"; did you mean {parent / near[0]}?" if near else ""
        raise FileNotFoundError(f"{flag} {src}: no such local folder ({parent}/ exists here, so it is read as "
                                f"a path, not a hub id{hint})")


def load_model_and_tokenizer(src: str | None, device: str | None, revision: str | None = None):
    from .api import MultiHeadGPT2
    from .tokenizer import Tokenizer

    folder = model_folder(src, revision)
    model = MultiHeadGPT2.from_pretrained(folder, device=pick_device(device))
    tok = Tokenizer.for_model(folder)
    return model, tok


def pick_device(device: str | None) -> str:
    import torch

    from .weights import check_device

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)  # `--device nope` is refused by name before any data is read or written
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
        cfg = SamplingConfig.from_string(rest)
        # every key given, default values too: `--controls do_sample=true --head h:do_sample=false` makes h greedy
        controls = {key: getattr(cfg, key) for key in given_keys(rest)}
        merged = per_head.setdefault(name, {})  # `--head h:a=1 --head h:b=2` is h:a=1,b=2
        clash = sorted(k for k in controls if k in merged and merged[k] != controls[k])
        if clash:
            raise UsageError(f"--head {spec!r}: {name}'s {', '.join(clash)} already set by an earlier --head "
                             f"{name}:... to another value; give each control once")
        merged.update(controls)
    return per_head


def given_keys(spec: str) -> list[str]:
    """The keys of a `key=value,...` spec (SamplingConfig.from_string has checked it)."""
    return [item.partition("=")[0].strip() for item in spec.split(",") if item.strip()]


def head_list(value: str | None, flag: str = "--heads") -> list[str] | None:
    """`--heads a,b` -> ["a", "b"]; None: every head. An empty name (`--heads ''`, `--heads a,`) is refused,
    not read as "all heads"."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise UsageError(f"{flag} {value!r}: expected comma-separated head names, e.g. {flag} reading,pos "
                         f"(leave {flag} out for every head)")
    return names


def at_least(flag: str, value: int | None, low: int, meaning: str = "") -> None:
    if value is not None and value < low:
        raise UsageError(f"{flag} {value}: must be >= {low}{meaning}")


def seed_arg(text: str) -> int:
    """--seed: an integer torch's generators and the training data order both take."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is out of range: a seed is an integer in [0, 2**32)")
    return value


def folder_arg(path: str | None, flag: str) -> None:
    """An output folder given as the path of an existing file: say so before any work."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a folder; give a folder for the outputs")


def control_dict(cfg) -> dict:
    from dataclasses import fields

    from .sampling import SamplingConfig

    default = SamplingConfig()
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def read_inputs(args) -> list[str]:
    if args.text and args.file:
        raise UsageError(f"got TEXT arguments and --file {args.file}: give the inputs one way (the other would be "
                         f"ignored)")
    if args.text:
        return list(args.text)
    if args.file:
        path = Path(args.file)
        if path.is_dir():
            raise UsageError(f"--file {path}: is a folder; expected a UTF-8 text file with one input per line")
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
    heads = head_list(args.heads)
    names = [model.head_names[i] for i in model.head_index(heads)]
    controls = control_dict(SamplingConfig.from_string(args.controls)) if args.controls else {}
    if args.stream and args.json:
        raise UsageError("--stream prints text as it is produced, --json whole outputs as JSON lines: "
                         "give one of them")
    if args.max_new_tokens is not None:  # 0 and negatives too: refused by name, never ignored
        if controls.get("max_new_tokens", args.max_new_tokens) != args.max_new_tokens:
            raise UsageError(f"--max-new-tokens {args.max_new_tokens} and --controls max_new_tokens="
                             f"{controls['max_new_tokens']} disagree: give one of them")
        controls["max_new_tokens"] = args.max_new_tokens
    kwargs = dict(per_head=parse_head_controls(args.head, names), compile=args.compile, seed=args.seed, **controls)
    texts = read_inputs(args)
    if args.stream:
        print_stream(stream(model, tok, *encode_prompts(tok, texts, model), heads, **kwargs), texts, names)
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


def print_stream(pieces, texts: list[str], names: list[str]) -> None:
    """--stream in the layout of the plain output (each input, then one line per head). The first
    output streams live; the others are held back and follow in order, so no line is ever interleaved
    with another: with several heads or inputs the rest appears when generation ends."""
    width = max(map(len, names))
    order = [(row, h) for row in range(len(texts)) for h in names]
    got = {key: "" for key in order}
    live = 0  # the (row, head) being printed live

    def start(k: int) -> None:
        row, h = order[k]
        if h == names[0]:
            print(texts[row])
        print(f"  {h:>{width}}: ", end="")

    pieces = iter(pieces)
    first = next(pieces, None)  # settings are checked when generation starts: no header before that
    start(0)
    for head, row, piece in itertools.chain([first] if first else [], pieces):
        got[row, head] += piece
        if (row, head) == order[live]:
            print(piece, end="", flush=True)
    print(flush=True)
    for k in range(live + 1, len(order)):
        start(k)
        print(got[order[k]], flush=True)


def cmd_export(args) -> None:
    from .export import export_hf_from_checkpoint

    # like generate and eval, --model may be a training output folder (runs/quickstart): its newest checkpoint
    out = export_hf_from_checkpoint(model_folder(args.model), args.head, args.out, overwrite=args.overwrite)
    slow = f"""tokenizer = AutoTokenizer.from_pretrained("{out}", use_fast=False)
  tokenizer.do_lower_case = True  # rinna's tokenizer lowercases; T5Tokenizer does not read that from its files"""
    if (Path(out) / "tokenizer.json").is_file():  # written when the `tokenizers` package is installed
        tokenizer = f"""tokenizer = AutoTokenizer.from_pretrained("{out}")  # fast: tokenizer.json lowercases as gpt2mh
  or, with the slow tokenizer:
  {slow}"""
    else:
        tokenizer = slow + "\n  (rinna's model card sets the same flag; without it, Latin capitals become <unk>)"
    print(f"""wrote {out}: head {args.head!r} as a transformers GPT2LMHeadModel. Use it as gpt2mh does:
  model = AutoModelForCausalLM.from_pretrained("{out}")
  {tokenizer}""", file=sys.stderr)
    print(out)


def cmd_bench(args) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"bench_{args.which}.py"
    if not script.is_file():
        raise UsageError(f"{script} not found: the benchmarks ship with the source checkout of gpt2mh")
    rest = list(args.rest)
    if "-h" not in rest and "--help" not in rest and not any(a == "--out" or a.startswith("--out=") for a in rest):
        # benchmarks/results/*.json are the project's published figures: a user's run goes elsewhere
        out = Path("runs") / "bench" / f"{args.which}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        rest += ["--out", str(out)]
        print(f"gpt2mh bench: writing {out} (pass --out PATH to choose; benchmarks/results/ holds the "
              f"published figures)", file=sys.stderr)
    sys.exit(subprocess.call([sys.executable, str(script), *rest]))


def cmd_train(args) -> None:
    from .train import TrainConfig, parse_set, train

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
    overrides = {k: v for k, v in vars(args).items() if k in TRAIN_FLAGS and v is not None}
    try:
        overrides.update(parse_set(args.set or []))
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
    from .checkpoint import CONFIG_JSON, latest_checkpoint
    from .train import TrainConfig

    last = latest_checkpoint(output_dir)
    if last is None or not (last / CONFIG_JSON).is_file():
        raise FileNotFoundError(f"--resume --output-dir {output_dir}: no checkpoint with a {CONFIG_JSON} there; "
                                f"start the run with --config FILE or --train-file ... first")
    return TrainConfig.from_file(last / CONFIG_JSON)


def cmd_eval(args) -> None:
    from .evaluate import evaluate_file

    at_least("--samples", args.samples, 0, " (0: losses only; leave it out for every example)")
    at_least("--batch-size", args.batch_size, 1)
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    model, tok = load_model_and_tokenizer(args.model, args.device)
    heads = head_list(args.heads) or list(model.head_names)
    metrics, _, _ = evaluate_file(model, tok, model_folder(args.model), args.data, heads, samples=args.samples,
                                  max_new_tokens=args.max_new_tokens, input_column=args.input_column,
                                  batch_size=args.batch_size)
    print(json.dumps(metrics, ensure_ascii=False, indent=2))


def cmd_quickstart(args) -> None:
    from .quickstart import quickstart

    if args.show < 0:
        raise UsageError(f"--show {args.show}: the number of held-out sentences to print must be >= 0")
    at_least("--steps", args.steps, 1, " (leave it out for the default)")  # checked before a run is replaced
    folder_arg(args.output_dir, "--output-dir")
    result = quickstart(output_dir=Path(args.output_dir), base=args.base, steps=args.steps,
                        device=pick_device(args.device), show=args.show, resume=args.resume,
                        command=quickstart_command(args))
    if result.get("interrupted"):
        raise SystemExit(130)  # stopped by SIGINT/SIGTERM at a checkpoint; nothing evaluated


def quickstart_command(args) -> str:
    """The command that continues this quickstart (printed when it is interrupted)."""
    parts = ["gpt2mh quickstart", "--resume"]
    if args.output_dir != str(DEFAULT_RUN):
        parts += ["--output-dir", args.output_dir]
    if args.base:
        parts += ["--base", args.base]
    if args.steps is not None:
        parts += ["--steps", str(args.steps)]
    if args.device:
        parts += ["--device", args.device]
    return " ".join(parts)


# ---- parser -------------------------------------------------------------------------------------
DEFAULT_EVAL_TOKENS = 128  # gpt2mh.evaluate.DEFAULT_MAX_NEW_TOKENS (not imported: --help stays torch-free)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2mh", description="One GPT-2 trunk, N output heads: train, generate, export.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)  # --debug before or after the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    s = add("download", help="fetch a hub checkpoint into the standard HF cache")
    s.add_argument("repo", nargs="?", default=DEFAULT_REPO, help=f"hub repo id (default {DEFAULT_REPO})")
    s.add_argument("--revision", help="branch, tag or commit hash to pin")
    s.add_argument("--cache-dir", help="cache folder (default: the HF cache, HF_HOME)")
    s.set_defaults(func=cmd_download)

    s = add("convert", help="pytorch_model.bin -> model.safetensors (read with weights_only=True)")
    s.add_argument("src", help="a .bin file or a folder holding pytorch_model.bin")
    s.add_argument("--out", help="output file (default: model.safetensors beside the .bin)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_convert)

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

    s = add("generate", help="every head's output for each input text")
    s.add_argument("text", nargs="*", help="input text(s); else --file or stdin")
    s.add_argument("--model", help="checkpoint folder, training output folder or hub id (default: runs/quickstart)")
    s.add_argument("--revision")
    s.add_argument("--file", help="one input per line")
    s.add_argument("--heads", help="comma-separated subset of heads")
    s.add_argument("--controls", help="controls for all heads, e.g. do_sample=true,temperature=1.5,top_p=0.95")
    s.add_argument("--head", action="append", metavar="NAME:KEY=VALUE,...", help="controls for one head")
    s.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    s.add_argument("--seed", type=seed_arg)
    s.add_argument("--json", action="store_true", help="one JSON object per input (JSONL)")
    s.add_argument("--stream", action="store_true", help="print text as it is produced")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step (pays off for long or repeated runs)")
    s.add_argument("--device")
    s.set_defaults(func=cmd_generate)

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

    s = add("export-hf", help="one head -> a transformers GPT2LMHeadModel folder")
    s.add_argument("--model", required=True)
    s.add_argument("--head", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)

    s = add("bench", help="run a benchmark script (benchmarks/bench_<which>.py)")
    s.add_argument("which", choices=["generate", "finetune"])
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script")
    s.set_defaults(func=cmd_bench)

    s = add("quickstart", help="offline demo: fine-tune N heads on hironsancorpus, show every head's output")
    s.add_argument("--base", help="start from this checkpoint (e.g. rinna/japanese-gpt2-small) instead of a small fresh model")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: enough for a few minutes on CPU)")
    s.add_argument("--output-dir", dest="output_dir", default=str(DEFAULT_RUN))
    s.add_argument("--show", type=int, default=5, help="held-out sentences to print (0: only the scores)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its newest checkpoint (default: start over)")
    s.add_argument("--device")
    s.set_defaults(func=cmd_quickstart)
    return p


class _Stderr(logging.StreamHandler):
    """Log records to whatever sys.stderr is now (pytest swaps it per test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    """gpt2mh's log lines (progress, "resumed from step N", warnings) on stderr, as plain lines."""
    log = logging.getLogger("gpt2mh")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)  # records still propagate (pytest's caplog listens at the root)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
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
        usage = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
                 NotADirectoryError)  # what the user gave is wrong: the usage exit code, as argparse's
        return 2 if isinstance(e, usage) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
