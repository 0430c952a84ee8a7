import json
import re

import pytest

from gpt2mh.train.data import (
    DataError,
    Example,
    read_examples,
    split_examples,
    write_jsonl,
)

HEADS = ["reading", "pos"]


def write(folder, name, content):
    path = folder / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def targets(examples):
    return [ex.targets for ex in examples]


def test_csv_happy_path(tmp_path):
    path = write(tmp_path, "d.csv", "input,reading,pos\n今日,キョウ,名詞\n雨,アメ,名詞\n")
    examples, report = read_examples(path, HEADS)
    assert examples == [
        Example("今日", {"reading": "キョウ", "pos": "名詞"}, f"{path}:2"),
        Example("雨", {"reading": "アメ", "pos": "名詞"}, f"{path}:3"),
    ]
    assert (report.rows, report.kept, report.skipped) == (2, 2, {})
    assert report.targets == {"reading": 2, "pos": 2}


def test_tsv_happy_path_quotes_are_literal(tmp_path):
    path = write(tmp_path, "d.tsv", 'input\treading\tpos\n"はい"と\tハイト\t感動詞 助詞\na,b\tエー\tx\n')
    examples, _ = read_examples(path, HEADS)
    assert [ex.input for ex in examples] == ['"はい"と', "a,b"]
    assert examples[0].targets == {"reading": "ハイト", "pos": "感動詞 助詞"}
    assert examples[1].source == f"{path}:3"


def test_jsonl_happy_path_blank_lines_numbers_and_null(tmp_path):
    lines = [
        json.dumps({"input": "今日", "reading": "キョウ", "pos": "名詞"}, ensure_ascii=False),
        "",
        json.dumps({"input": 12, "reading": 3.5, "pos": None}),
        "   ",
        json.dumps({"input": "雨", "pos": "名詞"}, ensure_ascii=False),
    ]
    path = write(tmp_path, "d.jsonl", "\n".join(lines) + "\n")
    examples, report = read_examples(path, HEADS)
    assert [ex.input for ex in examples] == ["今日", "12", "雨"]
    assert targets(examples) == [{"reading": "キョウ", "pos": "名詞"}, {"reading": "3.5"}, {"pos": "名詞"}]
    assert [ex.source for ex in examples] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert report.targets == {"reading": 2, "pos": 2}


def test_format_from_extension_and_override(tmp_path):
    path = write(tmp_path, "d.json-lines", '{"input": "a", "pos": "x"}\n')
    assert read_examples(path, ["pos"])[0][0].targets == {"pos": "x"}
    path = write(tmp_path, "d.txt", "input\tpos\na\tx\n")
    with pytest.raises(DataError, match="d.txt.*extension"):
        read_examples(path, ["pos"])
    assert read_examples(path, ["pos"], format="tsv")[0][0].targets == {"pos": "x"}
    with pytest.raises(ValueError, match="format"):
        read_examples(path, ["pos"], format="xlsx")


def test_heads_missing_targets_in_some_rows(tmp_path):
    path = write(tmp_path, "d.csv", "input,reading,pos\na,エー,\nb,, \nc,,名詞\n")
    examples, report = read_examples(path, HEADS)
    assert targets(examples) == [{"reading": "エー"}, {"pos": "名詞"}]
    assert [ex.source for ex in examples] == [f"{path}:2", f"{path}:4"]
    assert report.skipped == {"no targets": 1}
    assert report.skipped_at == {"no targets": [f"{path}:3"]}
    assert report.targets == {"reading": 1, "pos": 1}


def test_column_mapping_and_extra_columns_reported(tmp_path):
    path = write(tmp_path, "d.csv", "id,text,yomi,hinshi\n1,今日,キョウ,名詞\n")
    columns = {"reading": "yomi", "pos": "hinshi"}
    examples, report = read_examples(path, HEADS, input_column="text", columns=columns)
    assert examples[0].input == "今日"
    assert examples[0].targets == {"reading": "キョウ", "pos": "名詞"}
    assert report.ignored_columns == ["id"]
    assert "ignored columns: id" in report.summary()


def test_columns_naming_an_unknown_head(tmp_path):
    path = write(tmp_path, "d.csv", "input,pos\na,x\n")
    with pytest.raises(ValueError, match="readng"):
        read_examples(path, ["pos"], columns={"readng": "reading"})


def test_missing_input_column_lists_columns(tmp_path):
    path = write(tmp_path, "d.csv", "sentence,reading,pos\na,b,c\n")
    with pytest.raises(DataError) as err:
        read_examples(path, HEADS)
    msg = str(err.value)
    assert str(path) in msg and "'input'" in msg
    assert "'sentence', 'reading', 'pos'" in msg


def test_head_with_no_column(tmp_path):
    path = write(tmp_path, "d.csv", "input,reading\na,b\n")
    with pytest.raises(DataError, match=r"head 'pos' has no column 'pos'"):
        read_examples(path, HEADS)
    with pytest.raises(DataError, match=r"head 'pos' has no column 'hinshi'"):
        read_examples(path, HEADS, columns={"pos": "hinshi"})


def test_typo_column_suggests_the_expected_one(tmp_path):
    path = write(tmp_path, "d.csv", "input,readng,pos\na,b,c\n")
    with pytest.raises(DataError, match=r"column 'readng' is not used; did you mean 'reading'\?"):
        read_examples(path, HEADS)
    path = write(tmp_path, "d.jsonl", '{"inputt": "a", "reading": "b", "pos": "c"}\n')
    with pytest.raises(DataError, match=r"column 'inputt' is not used; did you mean 'input'\?"):
        read_examples(path, HEADS)


def test_unlike_extra_columns_are_ignored(tmp_path):
    path = write(tmp_path, "d.csv", "input,reading,pos,notes\na,b,c,d\n")
    examples, report = read_examples(path, HEADS)
    assert len(examples) == 1 and report.ignored_columns == ["notes"]


def test_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_examples(tmp_path / "nope.csv", HEADS)


@pytest.mark.parametrize("content", ["", "\n\n", "\ufeff"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path, "d.csv", content)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}.*empty"):
        read_examples(path, HEADS)


def test_header_only(tmp_path):
    path = write(tmp_path, "d.csv", "input,reading,pos\n")
    with pytest.raises(DataError, match=f"{re.escape(str(path))}.*no data rows"):
        read_examples(path, HEADS)


def test_not_utf8_names_line_and_offset(tmp_path):
    content = b"input,reading,pos\na,b,c\nx\xffy,b,c\n"
    path = write(tmp_path, "d.csv", content)
    with pytest.raises(DataError) as err:
        read_examples(path, HEADS)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg
    offset = content.index(b"\xff")
    assert f"byte offset {offset}" in msg and "0xff" in msg


def test_mixed_encodings(tmp_path):
    content = "input,reading,pos\n今日,キョウ,名詞\n".encode() + "日本語,ニホンゴ,名詞\n".encode("shift_jis")
    path = write(tmp_path, "d.csv", content)
    with pytest.raises(DataError) as err:
        read_examples(path, HEADS)
    msg = str(err.value)
    offset = content.index("日本語".encode("shift_jis"))
    assert "line 3" in msg and f"byte offset {offset}" in msg
    assert "mixes encodings" in msg and "Shift-JIS" in msg


def test_bom_is_stripped_and_offsets_count_it(tmp_path):
    path = write(tmp_path, "d.csv", "\ufeffinput,reading,pos\na,b,c\n")
    examples, _ = read_examples(path, HEADS)
    assert examples[0].input == "a"
    path = write(tmp_path, "e.csv", b"\xef\xbb\xbfinput,reading,pos\n\xff,b,c\n")
    with pytest.raises(DataError, match="line 2.*byte offset 21"):
        read_examples(path, HEADS)


def test_quoted_newline_keeps_later_line_numbers(tmp_path):
    text = 'input,reading,pos\n"一行目\n二行目\n三行目",ア,名詞\n\nb,ビー,名詞\r\nc,シー,名詞\n'
    path = write(tmp_path, "d.csv", text)
    examples, _ = read_examples(path, HEADS)
    assert examples[0].input == "一行目\n二行目\n三行目"
    assert [ex.source for ex in examples] == [f"{path}:2", f"{path}:6", f"{path}:7"]


def test_csv_errors_name_the_row_start(tmp_path):
    path = write(tmp_path, "d.csv", 'input,reading,pos\na,b,c\n"open,b,c\nd,e,f\n')
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: line 3: malformed CSV"):
        read_examples(path, HEADS)


def test_100k_character_cell(tmp_path):
    big = "あ" * 100_000
    path = write(tmp_path, "d.csv", f'input,reading,pos\n"{big}",ア,名詞\n')
    assert read_examples(path, HEADS)[0][0].input == big
    path = write(tmp_path, "d.tsv", f"input\treading\tpos\n{big}\tア\t名詞\n")
    assert read_examples(path, HEADS)[0][0].input == big


@pytest.mark.parametrize("name,row", [("d.csv", "a,b,c,d"), ("d.csv", "a,b"), ("d.tsv", "a\tb")])
def test_wrong_field_count(tmp_path, name, row):
    sep = "," if name.endswith("csv") else "\t"
    path = write(tmp_path, name, sep.join(["input", *HEADS]) + "\n" + sep.join("xyz") + f"\n{row}\n")
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: line 3: expected 3 fields"):
        read_examples(path, HEADS)


def test_invalid_json_line_and_column(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"input": "a", "pos": "x"}\n\n{"input": "b", "pos": x}\n')
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: line 3, column 23: invalid JSON"):
        read_examples(path, ["pos"])


@pytest.mark.parametrize("line,found", [('["a", "b"]', "list"), ('"a"', "str"), ("3", "int")])
def test_non_object_json_line(tmp_path, line, found):
    path = write(tmp_path, "d.jsonl", f'{{"input": "a", "pos": "x"}}\n{line}\n')
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: line 2: expected a JSON object, found {found}"):
        read_examples(path, ["pos"])


def test_nested_json_value(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"input": "a", "pos": ["x"]}\n')
    with pytest.raises(DataError, match="line 1: column 'pos' holds a JSON list"):
        read_examples(path, ["pos"])


def test_empty_inputs_skipped_and_counted(tmp_path):
    path = write(tmp_path, "d.csv", "input,reading,pos\n,a,b\n  ,a,b\nok,a,b\n\t,,\n,,\n")
    examples, report = read_examples(path, HEADS)
    assert [ex.input for ex in examples] == ["ok"]
    assert report.rows == 5 and report.kept == 1
    assert report.skipped == {"empty input": 4}
    assert report.skipped_at["empty input"] == [f"{path}:2", f"{path}:3", f"{path}:5"]  # first three
    summary = report.summary()
    assert "5 rows, 1 kept" in summary and "skipped 4 empty input" in summary and f"{path}:2" in summary


def test_no_usable_rows(tmp_path):
    path = write(tmp_path, "d.csv", "input,reading,pos\n,a,b\nx,,\n")
    with pytest.raises(DataError, match="no usable rows.*1 empty input.*1 no targets"):
        read_examples(path, HEADS)


@pytest.mark.parametrize("heads,match", [([], "at least one head"), (["pos", "pos"], "duplicate"),
                                         (["pos", ""], "non-empty"), ([" "], "non-empty")])
def test_bad_head_names(tmp_path, heads, match):
    path = write(tmp_path, "d.csv", "input,pos\na,b\n")
    with pytest.raises(ValueError, match=match):
        read_examples(path, heads)


def make_examples(n):
    return [Example(f"文{i}", {"pos": str(i)}, f"x:{i}") for i in range(n)]


def test_split_is_deterministic_and_disjoint():
    examples = make_examples(100)
    train, val = split_examples(examples, 0.2, seed=1)
    assert (len(train), len(val)) == (80, 20)
    assert split_examples(examples, 0.2, seed=1) == (train, val)
    assert split_examples(examples[::-1], 0.2, seed=1)[1] == val[::-1]  # independent of file order
    assert split_examples(examples, 0.2, seed=2)[1] != val
    assert {ex.input for ex in train}.isdisjoint({ex.input for ex in val})
    assert sorted(train + val, key=lambda e: int(e.source[2:])) == examples


def test_split_keeps_duplicate_inputs_together():
    examples = [Example(f"文{i % 10}", {"pos": str(i)}, f"x:{i}") for i in range(50)]
    train, val = split_examples(examples, 0.3, seed=0)
    assert {ex.input for ex in train}.isdisjoint({ex.input for ex in val})
    assert len(val) == 15


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.01, 0.99, -0.5])
def test_split_rejects_an_empty_side(fraction):
    with pytest.raises(ValueError, match="validation_fraction"):
        split_examples(make_examples(10), fraction, seed=0)


def test_write_jsonl_round_trip(tmp_path):
    examples = [
        Example("今日\nは", {"reading": "キョウ", "pos": "名詞"}, "a:1"),
        Example('"引用"', {"pos": "記号"}, "a:2"),
        Example("x", {"reading": "エックス"}, "a:3"),
    ]
    path = write_jsonl(tmp_path / "sub" / "out.jsonl", examples)
    assert path == tmp_path / "sub" / "out.jsonl"
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    assert "今日" in path.read_text(encoding="utf-8")  # readable UTF-8, not \u escapes
    back, report = read_examples(path, HEADS)
    assert [(ex.input, ex.targets) for ex in back] == [(ex.input, ex.targets) for ex in examples]
    assert [ex.source for ex in back] == [f"{path}:{i}" for i in (1, 2, 3)]


def test_write_jsonl_replaces_atomically(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    write_jsonl(path, [Example("a", {"pos": "x"}, "s:1")])
    assert path.read_text() == '{"input": "a", "pos": "x"}\n'
    with pytest.raises(ValueError, match="input"):
        write_jsonl(path, [Example("a", {"input": "x"}, "s:1")])
    assert path.read_text() == '{"input": "a", "pos": "x"}\n'
    assert list(tmp_path.iterdir()) == [path]
