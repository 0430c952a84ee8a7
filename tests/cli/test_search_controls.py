"""`gpt2mh generate` with the search controls: --head NAME:choices=a|b, num_beams, stop_strings in plain,
--json and --output runs give what the library gives; a bad value is one error line naming the control."""
from __future__ import annotations

import json

import pytest
from helpers import make_model, offline_env, ok, one_line_error, run_cli

from gpt2mh import MultiHeadGPT2, generate_rows
from gpt2mh.tokenizer import Tokenizer

INPUTS = ["今日は晴れです。", "東京へ行った", "猫が好きだ"]
HEADS = ["--head", "reading:choices=過去|現在|未来", "--head", "entities:num_beams=3,length_penalty=0.5",
         "--head", "pos:stop_strings=は|の"]
PER_HEAD = {"reading": {"choices": ["過去", "現在", "未来"]}, "entities": {"num_beams": 3, "length_penalty": 0.5},
            "pos": {"stop_strings": ["は", "の"]}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_cli")
    make_model(root / "model")
    (root / "in.txt").write_text("\n".join(INPUTS) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def offline(folder):
    return offline_env(folder / "cache")


@pytest.fixture(scope="module")
def expected(folder):
    model = MultiHeadGPT2.from_pretrained(folder / "model")
    tok = Tokenizer.from_pretrained(folder / "model")
    return {i: (out, used) for i, out, used in generate_rows(model, tok, INPUTS, compile=False, max_new_tokens=6,
                                                             per_head=PER_HEAD, usage=True)}


def test_json_rows_equal_the_library(folder, expected, offline):
    out = ok(run_cli(["generate", "--model", folder / "model", "--file", folder / "in.txt", "--max-new-tokens", "6",
                      "--json", *HEADS], cwd=folder, env=offline))
    rows = [json.loads(line) for line in out.splitlines()]
    for i, row in enumerate(rows):
        want, used = expected[i]
        assert {h: row[h] for h in want} == want
        assert row["logprobs"]["reading"] == pytest.approx(used["logprobs"]["reading"], abs=1e-5)
        assert row["reading"] in ("過去", "現在", "未来") and "は" not in row["pos"] and "の" not in row["pos"]


def test_output_file_and_plain_print(folder, expected, offline):
    ok(run_cli(["generate", "--model", folder / "model", "--file", folder / "in.txt", "--max-new-tokens", "6",
                "--output", folder / "out.jsonl", "--overwrite", *HEADS], cwd=folder, env=offline))
    rows = [json.loads(line) for line in (folder / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [{h: r[h] for h in expected[i][0]} for i, r in enumerate(rows)] == [expected[i][0] for i in range(3)]
    plain = ok(run_cli(["generate", "--model", folder / "model", *INPUTS, "--max-new-tokens", "6", *HEADS],
                       cwd=folder, env=offline))
    assert f"reading: {expected[0][0]['reading']}" in plain and f"entities: {expected[2][0]['entities']}" in plain


@pytest.mark.parametrize("spec, name", [("entities:num_beams=0", "num_beams"),
                                        ("entities:early_stopping=soon", "early_stopping"),
                                        ("reading:choices=過去|過去", "choices"),
                                        ("entities:num_beams=2,num_return_sequences=3", "num_return_sequences")])
def test_bad_values_are_one_line_naming_the_control(folder, offline, spec, name):
    one_line_error(run_cli(["generate", "--model", folder / "model", "x", "--head", spec], cwd=folder, env=offline),
                   "generate", name)
