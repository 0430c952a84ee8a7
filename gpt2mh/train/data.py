"""Supervised multi-task data: one input column, one target column per head (CSV, TSV, JSONL)."""
from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json-lines": "jsonl"}
EMPTY_INPUT = "empty input"
NO_TARGETS = "no targets"
_SHOWN_PER_REASON = 3  # path:line examples kept per skip reason


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file (and line, column)."""


@dataclass(frozen=True)
class Example:
    input: str
    targets: dict[str, str]  # only heads with a non-empty target in this row get a loss
    source: str  # "path:line", line 1-based where the row starts


@dataclass
class DataReport:
    rows: int
    kept: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_at: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "path:line"
    targets: dict[str, int] = field(default_factory=dict)  # head -> kept rows with a target
    ignored_columns: list[str] = field(default_factory=list)
    path: str = ""

    def skip(self, reason: str, source: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.skipped_at.setdefault(reason, [])
        if len(shown) < _SHOWN_PER_REASON:
            shown.append(source)

    def summary(self) -> str:
        heads = ", ".join(f"{h} {n}" for h, n in self.targets.items())
        text = f"{self.path}: {self.rows} rows, {self.kept} kept (targets: {heads})"
        for reason, n in self.skipped.items():
            more = ", ..." if n > len(self.skipped_at[reason]) else ""
            text += f"; skipped {n} {reason} ({', '.join(self.skipped_at[reason])}{more})"
        if self.ignored_columns:
            text += f"; ignored columns: {', '.join(self.ignored_columns)}"
        return text


def read_examples(
    path,
    heads: list[str],
    input_column: str = "input",
    columns: dict[str, str] | None = None,
    format: str | None = None,
) -> tuple[list[Example], DataReport]:
    head_columns = _head_columns(heads, columns)
    if input_column in head_columns and input_column not in (columns or {}):  # a head named like the input
        raise ValueError(f"head {input_column!r} would read the input column as its target; rename the head "
                         f"or map it explicitly with columns={{{input_column!r}: 'COLUMN'}}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a data file ({', '.join(FORMATS)})")
    fmt = _format(path, format)
    text = _decode(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if fmt == "jsonl":
        found, rows = _read_jsonl(path, text)
    else:
        found, rows = _read_table(path, text, fmt)
    report = DataReport(rows=len(rows), kept=0, targets={h: 0 for h in head_columns}, path=str(path))
    report.ignored_columns = _check_columns(path, found, input_column, head_columns)
    examples = []
    for line, record in rows:
        source = f"{path}:{line}"
        text_in = _value(path, line, input_column, record.get(input_column))
        if text_in is None:
            report.skip(EMPTY_INPUT, source)
            continue
        targets = {}
        for head, column in head_columns.items():
            target = _value(path, line, column, record.get(column))
            if target is not None:
                targets[head] = target
        if not targets:
            report.skip(NO_TARGETS, source)
            continue
        for head in targets:
            report.targets[head] += 1
        examples.append(Example(text_in, targets, source))
    report.kept = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable rows ({report.summary()})")
    blank = [h for h, n in report.targets.items() if n == 0]
    if blank:  # that head would get no loss (or no evaluation) at all
        raise DataError(f"{path}: the target column of head(s) {blank} "
                        f"({', '.join(repr(head_columns[h]) for h in blank)}) is empty in every row; fill it, "
                        f"map another column with columns={{head: 'COLUMN'}}, or leave the head out of heads")
    return examples, report


def split_examples(
    examples: list[Example], validation_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    # Rows are ordered by a seeded hash of their input, so the split does not depend on file order,
    # stays put when rows are added, and identical inputs never straddle train and validation.
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    want = round(len(examples) * validation_fraction)
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.input] = counts.get(ex.input, 0) + 1

    def key(text: str) -> bytes:
        return hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()

    val_inputs, n_val = set(), 0
    for text in sorted(counts, key=key):
        if n_val >= want:
            break
        val_inputs.add(text)
        n_val += counts[text]
    train = [ex for ex in examples if ex.input not in val_inputs]
    val = [ex for ex in examples if ex.input in val_inputs]
    if not train or not val:
        side = "validation" if not val else "training"
        raise ValueError(
            f"validation_fraction {validation_fraction} of {len(examples)} examples "
            f"({len(counts)} distinct inputs) leaves the {side} set empty"
        )
    return train, val


def write_jsonl(path, examples: list[Example]) -> Path:
    lines = []
    for ex in examples:
        if "input" in ex.targets:
            raise ValueError(f"{ex.source}: a head named 'input' clashes with the input column")
        lines.append(json.dumps({"input": ex.input, **ex.targets}, ensure_ascii=False) + "\n")
    # Readers never see half a file; an output that is one of the examples' source files is refused.
    sources = {ex.source.rsplit(":", 1)[0] for ex in examples if ex.source}
    return atomic_write_text(path, "".join(lines), inputs=sorted(sources))


def _head_columns(heads: list[str], columns: dict[str, str] | None) -> dict[str, str]:
    if heads is None or not hasattr(heads, "__iter__"):
        raise TypeError(f"heads must be a head name or a list of head names (the target columns), got {heads!r}")
    heads = [heads] if isinstance(heads, str) else [str(h) if isinstance(h, str) else h for h in heads]
    if not heads:
        raise ValueError("at least one head is needed")
    for head in heads:
        if not isinstance(head, str) or not head.strip():
            raise ValueError(f"head names must be non-empty strings, got {head!r}")
    dupes = sorted({h for h in heads if heads.count(h) > 1})
    if dupes:
        raise ValueError(f"duplicate head names: {', '.join(dupes)}")
    columns = columns or {}
    if not isinstance(columns, dict):
        raise TypeError(f"columns must be a dict head -> column name, got {columns!r}")
    unknown = sorted(set(columns) - set(heads))
    if unknown:
        raise ValueError(f"columns= names heads that are not in heads: {', '.join(unknown)}")
    return {h: columns.get(h, h) for h in heads}


def _format(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in ("csv", "tsv", "jsonl"):
            raise ValueError(f"format must be 'csv', 'tsv' or 'jsonl', got {format!r}")
        return format
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            f"use one of {', '.join(FORMATS)} or pass format='csv'|'tsv'|'jsonl'"
        )
    return fmt


def read_lines(path: Path | None = None, data: bytes | None = None, name: str | None = None) -> list[tuple[int, str]]:
    """A text input of one item per line (`gpt2mh generate --file FILE` or stdin) -> (line number, text) of
    its non-blank lines, read as data files are: UTF-8 bytes (never the locale's encoding, stdin too), a
    UTF-8 BOM dropped, lines split at "\n" only ("\r\n" tolerated; U+2028, U+0085, form feeds and lone
    "\r" are text), line numbers counted from 1 over every physical line (blank ones too), the numbers
    `_decode`'s errors give. `name` labels stdin in messages."""
    text = _decode(path, data, name)
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]


def _decode(path: Path | None, data: bytes | None = None, name: str | None = None) -> str:
    if data is None:
        data = path.read_bytes()
    path = name or path
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line_start = data.rfind(b"\n", 0, offset) + 1
        line_end = data.find(b"\n", offset)
        line = data.count(b"\n", 0, offset) + 1
        msg = (
            f"{path}: line {line}: not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} "
            f"(column {offset - line_start + 1})"
        )
        err = DataError(msg + _encoding_hint(data, start, offset, data[line_start:line_end]))
        err.offset = offset  # the byte position, for callers that word the message their own way
        raise err from None


def _encoding_hint(data: bytes, start: int, offset: int, line_bytes: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "; the file looks like UTF-16, save it as UTF-8"
    mixed = any(b >= 0x80 for b in data[start:offset])  # non-ASCII text before it decoded fine
    hint = "; the file mixes encodings (text before this is valid UTF-8)" if mixed else ""
    try:
        line_bytes.decode("cp932")
        hint += "; this line decodes as Shift-JIS (CP932)"
    except UnicodeDecodeError:
        pass
    return hint + "; save the file as UTF-8"


def _read_table(path: Path, text: str, fmt: str) -> tuple[list[str], list[tuple[int, dict]]]:
    # Every cell fits in the whole text, so this limit admits any cell; csv's default is 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    if fmt == "tsv":  # TSV cells are literal: a '"' is just a character, never a quote
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, header_line, rows = None, 0, []
    line = 1  # reader.line_num counts physical lines read so far, so a row starts one after it
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path}: line {line}: malformed {fmt.upper()} ({e}; an unclosed quote?)") from None
        if row and not (len(row) == 1 and not row[0].strip()):  # blank lines are skipped
            if header is None:
                header, header_line = [c.strip() for c in row], line
            elif len(row) != len(header):
                raise DataError(
                    f"{path}: line {line}: expected {len(header)} fields like the header "
                    f"(line {header_line}), found {len(row)}"
                )
            else:
                rows.append((line, dict(zip(header, row))))
        line = reader.line_num + 1
    if not rows:
        raise DataError(f"{path}: only a header (line {header_line}), no data rows")
    dupes = sorted({c for c in header if c and header.count(c) > 1})
    if dupes:
        raise DataError(f"{path}: line {header_line}: columns appear more than once: {', '.join(dupes)}")
    return header, rows


def _read_jsonl(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict]]]:
    found: dict[str, None] = {}  # ordered set: columns in order of first appearance
    rows = []
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {line}, column {e.colno}: invalid JSON: {e.msg}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line}: expected a JSON object, found {type(record).__name__}")
        found.update(dict.fromkeys(record))
        rows.append((line, record))
    return list(found), rows


def _check_columns(path: Path, found: list[str], input_column: str, head_columns: dict[str, str]) -> list[str]:
    expected = [input_column, *head_columns.values()]
    extra = [c for c in found if c not in expected]
    listing = ", ".join(repr(c) for c in found)

    def typo_of(column: str) -> str:
        close = difflib.get_close_matches(column, extra, n=1, cutoff=0.75)
        return f"column {close[0]!r} is not used; did you mean {column!r}? " if close else ""

    if input_column not in found:
        raise DataError(
            f"{path}: {typo_of(input_column)}no input column {input_column!r}; columns found: {listing}"
        )
    for head, column in head_columns.items():
        if column not in found:
            raise DataError(
                f"{path}: {typo_of(column)}head {head!r} has no column {column!r}; columns found: {listing}"
            )
    return extra


_SURROGATE = re.compile("[\ud800-\udfff]")


def _value(path: Path, line: int, column: str, value) -> str | None:
    """A cell as text, or None when it holds nothing (missing, null, empty or whitespace)."""
    if value is None or (isinstance(value, float) and value != value):  # null, or pandas' NaN for "missing"
        return None
    if isinstance(value, (dict, list)):
        raise DataError(f"{path}: line {line}: column {column!r} holds a JSON {type(value).__name__}, not text")
    text = value if isinstance(value, str) else str(value)
    bad = _SURROGATE.search(text)
    if bad:  # JSON "\ud83d" without its pair: not Unicode text, no tokenizer can take it
        raise DataError(f"{path}: line {line}: column {column!r} holds a lone surrogate U+{ord(bad.group()):04X} "
                        f"at character {bad.start()} (half of a UTF-16 pair); fix the text at that line")
    return text if text.strip() else None
