"""`gpt2mh download`, `gpt2mh convert` and `gpt2mh export-hf`: model files in and out."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..weights.hub import DEFAULT_REPO, download, looks_like_path
from .args import UsageError, model_folder


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
    from ..weights.hf import PYTORCH_BIN, convert_bin

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


def cmd_export(args) -> None:
    from ..weights.export import FAST_TOKENIZER_GAP, export_hf_from_checkpoint

    # like generate and eval, --model may be a training output folder (runs/quickstart): its newest checkpoint
    out = export_hf_from_checkpoint(model_folder(args.model), args.head, args.out, overwrite=args.overwrite)
    print(f"""wrote {out}: head {args.head!r} as a transformers GPT2LMHeadModel. Use it as gpt2mh does:
  model = AutoModelForCausalLM.from_pretrained("{out}")
  tokenizer = AutoTokenizer.from_pretrained("{out}", use_fast=False)
  tokenizer.do_lower_case = True  # rinna's tokenizer lowercases; T5Tokenizer does not read that from its files
  (rinna's model card sets the same flag; without it, Latin capitals become <unk>. use_fast=False:
  {FAST_TOKENIZER_GAP}.)""", file=sys.stderr)
    print(out)


def add_parsers(add) -> None:
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
    s = add("export-hf", help="one head -> a transformers GPT2LMHeadModel folder")
    s.add_argument("--model", required=True)
    s.add_argument("--head", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)
