"""Catalogue of bad inputs, part 4: training data files and training settings (issue 7). Errors name
the file and, where there is one, the line (and column). Related: test_data.py (readers, skip
reports, the train/validation split), test_train.py (TrainConfig errors).

Decisions recorded here:
- A column in the header that no head uses is ignored and reported, not an error; a row with more
  or fewer fields than the header is an error naming its line.
- An empty target means "no example for that head in this row" (the row still trains the other
  heads); a row with no target at all is skipped and counted with its path:line.
- A quoted newline is part of its cell; line numbers after it still count physical lines.
"""
from __future__ import annotations

import json

import pytest

from gpt2mh.train.config import TrainConfig
from gpt2mh.train.data import DataError, read_examples
from gpt2mh.train.loop import train


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# ---- every row of this table: (file name, content, heads, message after "<path>: ") ---------------------
FILE_CASES = {
    "latin-1": ("d.csv", "input,a\ncafé,x\n".encode("latin-1"), ["a"],
                r"line 2: not valid UTF-8: byte 0xe9 at byte offset 11 \(column 4\); save the file as UTF-8"),
    "shift-jis": ("d.csv", "input,a\n日本語,x\n".encode("cp932"), ["a"],
                  r"line 2: not valid UTF-8: byte 0x93 .*\(column 1\); this line decodes as Shift-JIS \(CP932\)"),
    "mixed-encodings": ("d.csv", "input,a\n日本,x\n".encode() + "語,y\n".encode("cp932"), ["a"],
                        r"line 3: not valid UTF-8: .*the file mixes encodings \(text before this is valid UTF-8\)"),
    "utf-16": ("d.jsonl", '{"input": "x", "a": "y"}\n'.encode("utf-16"), ["a"],
               r"line 1: not valid UTF-8: byte 0xff .*the file looks like UTF-16, save it as UTF-8"),
    "missing-input-column": ("d.csv", "inpt,a\nx,y\n", ["a"],
                             r"column 'inpt' is not used; did you mean 'input'\? no input column 'input'; "
                             r"columns found: 'inpt', 'a'"),
    "missing-head-column": ("d.csv", "input,b\nx,y\n", ["a"], r"head 'a' has no column 'a'; columns found: 'input', 'b'"),
    "extra-field-in-a-row": ("d.csv", "input,a\nx,y\nz,w,extra\n", ["a"],
                             r"line 3: expected 2 fields like the header \(line 1\), found 3"),
    "missing-field-in-a-row": ("d.csv", "input,a\nx,y\nz\n", ["a"], r"line 3: expected 2 fields .* found 1"),
    "every-target-empty": ("d.csv", "input,a\nx,\nz,  \n", ["a"],
                           r"no usable rows \(.*2 rows, 0 kept .*skipped 2 no targets \(.*d\.csv:2, .*d\.csv:3\)"),
    "error-after-quoted-newline": ("d.csv", 'input,a\n"one\ntwo",y\nz,w,extra\n', ["a"],
                                   r"line 4: expected 2 fields"),  # the row starts on physical line 4
    "unclosed-quote": ("d.csv", 'input,a\nx,y\n"abc,y\nz,w\n', ["a"],
                       r"line 3: malformed CSV \(unexpected end of data; an unclosed quote\?\)"),
    "duplicate-column": ("d.csv", "input,a,a\nx,y,z\n", ["a"], "line 1: columns appear more than once: a"),
    "header-only": ("d.csv", "input,a\n", ["a"], r"only a header \(line 1\), no data rows"),
    "empty-file": ("d.csv", "\n\n", ["a"], "file is empty"),
    "jsonl-invalid": ("d.jsonl", '{"input": "x", "a": "y"}\n{"input": "x", a}\n', ["a"],
                      r"line 2, column 16: invalid JSON: Expecting property name"),
    "jsonl-not-an-object": ("d.jsonl", '["x", "y"]\n', ["a"], "line 1: expected a JSON object, found list"),
    "jsonl-nested-target": ("d.jsonl", '{"input": "x", "a": {"b": 1}}\n', ["a"],
                            "line 1: column 'a' holds a JSON dict, not text"),
    "unknown-extension": ("d.txt", "input,a\nx,y\n", ["a"], r"cannot tell the format from the extension '\.txt'"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_data_file(tmp_path, case):
    name, content, heads, message = FILE_CASES[case]
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=rf"^{path}: {message}"):
        read_examples(path, heads)


# ---- cases that load, with what they load -----------------------------------------------------------------
def test_extra_column_is_ignored_and_reported(tmp_path):
    examples, report = read_examples(write(tmp_path, "d.csv", "input,a,notes\nx,y,z\n"), ["a"])
    assert [(e.input, e.targets) for e in examples] == [("x", {"a": "y"})]
    assert report.ignored_columns == ["notes"] and "ignored columns: notes" in report.summary()


def test_empty_target_drops_only_that_head(tmp_path):
    path = write(tmp_path, "d.csv", "input,a,b\nx,,1\ny,,\nz,2,3\n")
    examples, report = read_examples(path, ["a", "b"])
    assert [e.targets for e in examples] == [{"b": "1"}, {"a": "2", "b": "3"}]
    assert report.targets == {"a": 1, "b": 2}
    assert report.skipped == {"no targets": 1} and report.skipped_at["no targets"] == [f"{path}:3"]


def test_quoted_newline_stays_in_its_cell(tmp_path):
    examples, _ = read_examples(write(tmp_path, "d.csv", 'input,a\n"one\ntwo",y\nz,w\n'), ["a"])
    assert [e.input for e in examples] == ["one\ntwo", "z"]
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["2", "4"]


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl"])
def test_100k_character_cell_loads_whole(tmp_path, name):
    cell = "あ" * 100_000  # csv's default field limit is 128 KiB; the reader lifts it
    content = f"input,a\n{cell},y\n" if name.endswith(".csv") else json.dumps({"input": cell, "a": "y"}) + "\n"
    examples, _ = read_examples(write(tmp_path, name, content), ["a"])
    assert examples[0].input == cell


# ---- head names ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads, message", [
    ([], "at least one head is needed"),
    (["a", "a"], "duplicate head names: a"),
    (["a", ""], "head names must be non-empty strings, got ''"),
    (["input"], r"head 'input' would read the input column as its target"),  # used to train input -> input
], ids=["zero", "duplicate", "empty", "named-like-the-input"])
def test_bad_head_names_for_data(tmp_path, heads, message):
    with pytest.raises(ValueError, match=message):
        read_examples(write(tmp_path, "d.csv", "input,a\nx,y\n"), heads)


def test_heads_given_as_one_string(tmp_path):
    # "ab" is one head, not heads "a" and "b" (which it used to be)
    examples, _ = read_examples(write(tmp_path, "d.csv", "input,ab\nx,y\n"), "ab")
    assert examples[0].targets == {"ab": "y"}


def test_training_settings_with_bad_heads(tmp_path):
    with pytest.raises(ValueError, match=r"heads: duplicate head names \['a'\]"):
        TrainConfig(train_file="t.jsonl", model_config={}, heads=["a", "b", "a"])
    data = write(tmp_path, "t.jsonl", '{"input": "x", "a": "y"}\n')
    with pytest.raises(ValueError, match=r"training from scratch needs heads=\[\.\.\.\]"):
        train(TrainConfig(train_file=str(data), model_config=dict(n_embd=8, n_layer=1, n_head=2, n_positions=16),
                          heads=[], output_dir=str(tmp_path / "run"), progress=False))
