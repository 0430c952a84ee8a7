"""`gpt2mh generate --file IN --output OUT.jsonl`: a data file of any size through the engine.

- Each row is written to OUT (`{"line": n, "input": ..., head: output, ...}`) and flushed as soon as
  all of its heads have finished, so a run killed at any moment keeps every row it finished;
  `--resume` continues it, skipping the lines already in OUT (a torn last line is cut off first).
  When every line is done, OUT is rewritten in input order.
- IN is text, one input per line, or (IN ending in .jsonl) `{"input": ..., "heads": [...]}` per line,
  each row naming the heads it wants (rows wanting different heads share the engine's slots).
- A bad row never sinks the run: an empty line, a line that is not UTF-8, a line longer than the
  context, a bad JSON row or an unknown head gets `{"line": n, "error": "..."}`; the summary counts
  them and the exit code is 3.
- Progress: a tqdm bar on a terminal (rows/s, tokens/s, ETA), else a log line every 15 s.
- Past one process: under `torchrun --nproc-per-node P -m gpt2mh generate ...` rank r takes the
  lines n with (n - 1) % P == r into its own part (OUT.rank<r>-of-<P>), resumable the same way; at
  the end rank 0 merges the parts into OUT in input order (the process group of training:
  gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import BinaryIO, Iterator

from ..atomic import atomic_write_text
from ..inference.generate import generate_rows
from ..train.distributed import setup_distributed
from .args import UsageError

logger = logging.getLogger("gpt2mh.generate")
PROGRESS_SECONDS = 15.0
ROWS_FAILED = 3  # exit code: the run finished, some rows are errors in OUT


def read_lines(stream: BinaryIO) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error) per line of a binary stream: UTF-8, a BOM before the first line
    dropped; only `\\n` ends a line (a `\\r` before it is dropped). Empty or blank lines and
    lines that are not UTF-8 come with an error instead of a text."""
    for n, raw in enumerate(stream, 1):
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, None, f"not UTF-8 text ({e.reason} at byte {e.start})"
            continue
        yield (n, None, "empty line") if not text.strip() else (n, text, None)


def json_row(line: str) -> tuple[str | None, list[str] | None, str | None]:
    """A line of a .jsonl input: {"input": text, "heads": [names]?} -> (text, heads or None, error)."""
    try:
        row = json.loads(line)
    except ValueError as e:
        return None, None, f"not a JSON object ({e})"
    if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not row["input"].strip():
        return None, None, 'expected {"input": "text", "heads": ["name", ...]} (heads optional)'
    heads = row.get("heads")
    if heads is not None and (not isinstance(heads, list) or not heads or not all(isinstance(h, str) for h in heads)):
        return None, None, f'"heads" must be a non-empty list of head names, got {heads!r}'
    return row["input"], heads, None


def finished_lines(out: Path) -> set[int]:
    """Line numbers already in OUT; a last line cut off by a kill is removed from the file."""
    done, good = set(), 0
    with open(out, "rb") as f:
        for raw in f:
            try:
                done.add(int(json.loads(raw)["line"]))
            except (ValueError, KeyError, TypeError):
                break  # torn (no newline, partial JSON): everything from here is rewritten
            if not raw.endswith(b"\n"):
                break
            good += len(raw)
    if good != out.stat().st_size:
        with open(out, "r+b") as f:
            f.truncate(good)
    return done


class Progress:
    """A tqdm bar on a terminal, else a log line every PROGRESS_SECONDS."""

    def __init__(self, total: int | None, done: int):
        self.total, self.rows, self.errors, self.tokens = total, done, 0, 0
        self.start = self.last = time.monotonic()
        self.first = done
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="row", file=sys.stderr, dynamic_ncols=True)

    def update(self, tokens: int, error: bool) -> None:
        self.rows += 1
        self.errors += error
        self.tokens += tokens
        now = time.monotonic()
        rate = self.tokens / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(tok_s=f"{rate:.0f}", errors=self.errors, refresh=False)
        elif now - self.last >= PROGRESS_SECONDS:
            self.last = now
            logger.info("generate: %s", self.line(now))

    def line(self, now: float) -> str:
        rows_s = (self.rows - self.first) / max(now - self.start, 1e-9)
        total = f"/{self.total}" if self.total is not None else ""
        eta = ""
        if self.total is not None and rows_s > 0:
            eta = f", ETA {int((self.total - self.rows) / rows_s)} s"
        return (f"{self.rows}{total} rows ({self.errors} errors), {rows_s:.2f} rows/s, "
                f"{self.tokens / max(now - self.start, 1e-9):.0f} tokens/s{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_file_job(args, model, tok, heads, kwargs) -> None:
    """The whole job (see the module docstring); raises SystemExit(ROWS_FAILED) when rows failed."""
    out = Path(args.output)
    if out.is_dir():
        raise UsageError(f"--output {out}: is a folder; give a .jsonl file")
    dist = setup_distributed(args.device if args.device not in (None, "auto") else str(model.device))
    part = out if dist.world == 1 else out.with_name(f"{out.name}.rank{dist.rank}-of-{dist.world}")
    if out.exists() and not (args.resume or args.overwrite):
        raise UsageError(f"--output {out} exists: pass --resume to continue it, or --overwrite to start over")
    if args.overwrite and not args.resume:
        for p in [out, *out.parent.glob(f"{out.name}.rank*-of-*")]:
            if dist.main or p == part:
                p.unlink(missing_ok=True)
    dist.barrier()
    done = finished_lines(part) if part.exists() else set()
    if dist.world > 1 and out.exists():
        done |= {n for n in finished_lines(out) if (n - 1) % dist.world == dist.rank}
    source = open(args.file, "rb") if args.file else sys.stdin.buffer
    total = _count_lines(args.file) if args.file else None
    mine = total if total is None or dist.world == 1 else len(range(dist.rank, total, dist.world))
    progress = Progress(mine, len(done))
    pending: dict[int, str] = {}  # line -> input text, for rows in flight
    errors: list[int] = []

    jsonl = bool(args.file) and args.file.endswith(".jsonl")

    def rows() -> Iterator[tuple]:
        for n, text, error in read_lines(source):
            if (n - 1) % dist.world != dist.rank or n in done:
                continue
            want = None
            if not error and jsonl:
                text, want, error = json_row(text)
            if error:
                write({"line": n, "error": error})
                continue
            pending[n] = text
            yield (n, text) if want is None else (n, text, want)

    with open(part, "ab") as f:
        def write(record: dict, used: dict | None = None) -> None:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()  # the row survives a kill of this process from now on
            if "error" in record:
                errors.append(record["line"])
            progress.update(sum(v for k, v in (used or {}).items() if k != "prompt_tokens" and isinstance(v, int)),
                            "error" in record)

        try:
            for n, got, used in generate_rows(model, tok, rows(), heads, usage=True, slots=args.slots, **kwargs):
                text = pending.pop(n)
                if isinstance(got, str):
                    write({"line": n, "input": text, "error": got})
                else:
                    logprobs = {"logprobs": used["logprobs"]} if "logprobs" in used else {}  # choices' answers
                    write({"line": n, "input": text, **got, **logprobs}, used)
            os.fsync(f.fileno())
        finally:
            progress.close()
            if source is not sys.stdin.buffer:
                source.close()
    failed = dist.gather(len(errors))
    dist.barrier()
    if dist.main:
        parts = [out.with_name(f"{out.name}.rank{r}-of-{dist.world}") for r in range(dist.world)] \
            if dist.world > 1 else [out]
        n_rows = _merge_in_order(parts, out)
        for p in parts:
            if p != out:
                p.unlink(missing_ok=True)
        print(f"wrote {out}: {n_rows} rows, {sum(failed)} with an error"
              + (f" (lines {', '.join(map(str, sorted(errors)[:10]))}{', ...' if len(errors) > 10 else ''})"
                 if errors else ""), file=sys.stderr)
    dist.barrier()
    if dist.owned:
        import torch.distributed as td

        td.destroy_process_group()
    if sum(failed):
        raise SystemExit(ROWS_FAILED)


def _merge_in_order(parts: list[Path], out: Path) -> int:
    """Every row of the parts (and of OUT) once, sorted by line, written atomically to OUT."""
    rows: dict[int, str] = {}
    for p in ([out] if out.exists() and out not in parts else []) + parts:
        if p.exists():
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if line.endswith("\n"):
                        rows[int(json.loads(line)["line"])] = line
    atomic_write_text(out, "".join(rows[n] for n in sorted(rows)))
    return len(rows)


def _count_lines(path: str) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")
