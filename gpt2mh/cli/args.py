"""Flag types and helpers the commands share: --model and --device, head lists, key=value controls,
--seed, and the one-line UsageError."""
from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from .._checks import SettingConflict, merge_settings
from ..weights.hub import latest_checkpoint, looks_like_path, resolve_model

DEFAULT_RUN = Path("runs/quickstart")


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def model_folder(src: str | None, revision: str | None = None) -> Path:
    """--model: a checkpoint folder, a training output folder (its newest checkpoint) or a hub id;
    None: the quickstart's result in runs/quickstart."""
    if src is None:
        if latest_checkpoint(DEFAULT_RUN) is None:
            raise UsageError(f"no --model given and no quickstart result in {DEFAULT_RUN}: "
                             "run `gpt2mh quickstart` first or pass --model FOLDER_OR_HUB_ID")
        src = str(DEFAULT_RUN)
    check_local(src, "--model")
    if revision is not None and Path(src).expanduser().exists():  # it would be ignored
        raise UsageError(f"--revision {revision}: pins a commit of a hub repo, but --model {src} is a local "
                         f"folder; leave --revision out")
    return resolve_model(src, revision=revision)


def check_local(src: str, flag: str) -> None:
    """`runs/quikstart` has the shape of a hub id (owner/name), but when `runs/` is a local folder it is
    a mistyped path: report the missing folder instead of asking the hub for it."""
    path = Path(src).expanduser()
    if path.exists() or looks_like_path(src):  # a path-shaped src: resolve_checkpoint reports it
        return
    parent = path.parent
    if parent.is_dir():
        near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir() if p.is_dir()], n=1)
        hint = f"; did you mean {parent / near[0]}?" if near else ""
        raise FileNotFoundError(f"{flag} {src}: no such local folder ({parent}/ exists here, so it is read as "
                                f"a path, not a hub id{hint})")


def load_model_and_tokenizer(src: str | None, device: str | None, revision: str | None = None):
    from ..api import MultiHeadGPT2
    from ..tokenizer import Tokenizer

    folder = model_folder(src, revision)
    model = MultiHeadGPT2.from_pretrained(folder, device=pick_device(device))
    tok = Tokenizer.for_model(folder)
    return model, tok


def pick_device(device: str | None) -> str:
    import torch

    from ..weights.folder import check_device

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)  # `--device nope` is refused by name before any data is read or written
    return device


def number_arg(kind, low, need: str):
    """An argparse type: `kind(text)` (int or float) at least `low`, else an error saying `need`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: {need}")
        return value
    return parse


def parse_head_controls(specs: list[str], names) -> dict:
    """`--head reading:temperature=0,max_new_tokens=40` -> {"reading": {...}}."""
    from ..inference.controls import SamplingConfig

    per_head = {}
    for spec in specs or []:
        name, sep, rest = spec.partition(":")
        if not sep:
            raise UsageError(f"--head {spec!r}: expected NAME:key=value,... (e.g. reading:do_sample=false)")
        if name not in names:
            raise UsageError(f"--head {spec!r}: unknown head {name!r}; the model has {list(names)}")
        # every key given, default values too: `--controls do_sample=true --head h:do_sample=false` makes h greedy
        controls = given_controls(SamplingConfig.from_string(rest), rest)
        try:  # `--head h:a=1 --head h:b=2` is h:a=1,b=2; the one rule for a control given twice
            per_head[name] = merge_settings([("earlier", per_head.get(name, {})), ("later", controls)])
        except SettingConflict as e:
            raise UsageError(f"--head {spec!r}: {name}'s {e.key} already set by an earlier --head "
                             f"{name}:... to another value; give each control once") from None
    return per_head


def given_controls(cfg, spec: str) -> dict:
    """The controls a `key=value,...` spec names, as `cfg` (its parse) holds them: default values included."""
    return {key: getattr(cfg, key) for key in given_keys(spec)}


def one_setting_each(controls: dict, max_new_tokens: int | None) -> dict:
    """generate's --controls and --max-new-tokens, merged by the one rule (`_checks.merge_settings`)."""
    flag = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    try:
        return merge_settings([("--controls {key}={value}", controls), ("--max-new-tokens {value}", flag)])
    except SettingConflict as e:
        raise UsageError(str(e)) from None


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
    from .._checks import SEED_RANGE

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not SEED_RANGE[0] <= value < SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"{value} is out of range: a seed is an integer in [0, 2**32)")
    return value


def folder_arg(path: str | None, flag: str) -> None:
    """An output folder given as the path of an existing file: say so before any work."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a folder; give a folder for the outputs")


def read_text_inputs(file: str | None) -> list[tuple[int, str]]:
    """generate's inputs from --file or stdin, by the data files' reader (`train.data.read_lines`): the same
    bytes, BOM, line breaks and line numbers. A file that is not UTF-8 is a usage error naming its line."""
    import sys

    from ..train.data import DataError, read_lines

    try:
        if file is not None:
            return read_lines(Path(file))
        return read_lines(data=sys.stdin.buffer.read(), name="<stdin>")
    except DataError as e:  # "PATH: line N: not valid UTF-8: ..." -> the CLI's wording, same line number
        label = file if file is not None else "<stdin>"
        detail = str(e).removeprefix(f"{label}: ")
        raise UsageError(f"{label}: not UTF-8 text ({detail}; position {getattr(e, 'offset', '?')})") from None


def stream_refusal(controls: dict, per_head: dict) -> None:
    """--stream prints one text per input and head, as the plain output does: a control that makes more
    (num_return_sequences > 1) is refused by name instead of failing inside the printer."""
    many = {h: c.get("num_return_sequences") for h, c in {"": controls, **per_head}.items()
            if isinstance(c, dict) and (c.get("num_return_sequences") or 1) > 1}
    if many:
        where = ", ".join(f"--head {h}:" if h else "--controls " for h in many)
        raise UsageError(f"--stream prints one output per input and head, but num_return_sequences="
                         f"{max(many.values())} ({where}num_return_sequences) asks for more: drop --stream "
                         f"(the plain and --json outputs list them) or num_return_sequences")
    beams = [h for h, c in {"": controls, **per_head}.items() if isinstance(c, dict) and (c.get("num_beams") or 1) > 1]
    if beams:  # a beam's text is final only when its search ends
        where = ", ".join(f"--head {h}:" if h else "--controls " for h in beams)
        raise UsageError(f"--stream: beam search ({where}num_beams) has no text before the search ends; "
                         f"drop --stream or num_beams")
