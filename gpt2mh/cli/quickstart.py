"""`gpt2mh quickstart`: the offline demo."""
from __future__ import annotations

from pathlib import Path

from .args import DEFAULT_RUN, UsageError, at_least, folder_arg, pick_device


def cmd_quickstart(args) -> None:
    from ..demo.quickstart import quickstart

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


def add_parsers(add) -> None:
    s = add("quickstart", help="offline demo: fine-tune N heads on hironsancorpus, show every head's output")
    s.add_argument("--base", help="start from this checkpoint (e.g. rinna/japanese-gpt2-small) instead of a small fresh model")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: enough for a few minutes on CPU)")
    s.add_argument("--output-dir", dest="output_dir", default=str(DEFAULT_RUN))
    s.add_argument("--show", type=int, default=5, help="held-out sentences to print (0: only the scores)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its newest checkpoint (default: start over)")
    s.add_argument("--device")
    s.set_defaults(func=cmd_quickstart)
