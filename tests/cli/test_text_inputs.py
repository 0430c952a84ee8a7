"""CLI text inputs and --stream (issue 28, class 6). `gpt2mh generate --file FILE` and stdin are read by the
data files' reader (`gpt2mh.train.data.read_lines`): UTF-8 bytes (never the locale's encoding), a BOM
dropped, lines split at "\\n" only ("\\r\\n" tolerated), line numbers counted over every physical line.
Searched with hypothesis over lines holding every other line-break-like character; --stream against the
plain output under every control (a table over SamplingConfig's fields)."""
from __future__ import annotations

import io
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.cli import main
from gpt2mh.cli.args import read_text_inputs
from gpt2mh.train.data import DataError, read_lines

ODD = "\r\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e\ufeff\t "
LINE = st.text(st.one_of(st.sampled_from(ODD), st.sampled_from("あア漢ｶﾞa1"),), max_size=6).filter(lambda t: "\r" not in t[-1:])
DOC = st.tuples(st.lists(LINE, max_size=6), st.sampled_from(["\n", "\r\n"]), st.booleans(), st.booleans())


def build(doc) -> tuple[bytes, list[str]]:
    lines, sep, bom, trailing = doc
    text = sep.join(lines) + (sep if trailing and lines else "")
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"), lines


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=DOC)
def test_file_and_stdin_read_lines_as_the_data_reader_does(tmp_path, monkeypatch, doc):
    data, lines = build(doc)
    if lines and not doc[2]:  # no BOM written: a leading U+FEFF of the first line *is* one
        lines = [lines[0].removeprefix("\ufeff"), *lines[1:]]
    want = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    assert read_lines(data=data, name="x") == want  # split at \n only: \u2028, \x85, \x0c, lone \r are text
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    assert read_text_inputs(str(path)) == want
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="latin-1"))  # a locale that is not UTF-8
    assert read_text_inputs(None) == want


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=DOC, where=st.integers(0, 5), bad=st.sampled_from([b"\xff", b"\x83\x65", b"\xe9"]))
def test_a_bad_byte_is_named_by_the_same_line_number_everywhere(tmp_path, monkeypatch, doc, where, bad):
    lines, sep, bom, trailing = doc
    lines = list(lines) + [""] * max(0, where + 1 - len(lines))
    data = (b"\xef\xbb\xbf" if bom else b"") + sep.encode().join(
        (line.encode() + bad if i == where else line.encode()) for i, line in enumerate(lines))
    with pytest.raises(DataError, match=rf"line {where + 1}: not valid UTF-8"):
        read_lines(data=data, name="x")
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    for source, setup in ((str(path), None), (None, data)):
        if setup is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(setup)))
        with pytest.raises(ValueError, match=rf"not UTF-8 text \(line {where + 1}: not valid UTF-8"):
            read_text_inputs(source)


# ---- --stream under every control ---------------------------------------------------------------
STREAM_CONTROLS = {"do_sample": "do_sample=true", "temperature": "do_sample=true,temperature=0.7",
                   "top_k": "do_sample=true,top_k=3", "top_p": "do_sample=true,top_p=0.5",
                   "min_p": "do_sample=true,min_p=0.1", "typical_p": "do_sample=true,typical_p=0.5",
                   "repetition_penalty": "repetition_penalty=1.5", "no_repeat_ngram_size": "no_repeat_ngram_size=2",
                   "bad_words_ids": "bad_words_ids=5;6 7", "min_new_tokens": "min_new_tokens=3",
                   "max_new_tokens": "max_new_tokens=2", "eos_token_id": "eos_token_id=2 3",
                   "pad_token_id": "pad_token_id=0", "num_return_sequences": "do_sample=true,num_return_sequences=2",
                   "num_beams": "num_beams=2", "length_penalty": "length_penalty=0.5",
                   "early_stopping": "early_stopping=never", "stop_strings": "stop_strings=の|は",
                   "output_scores": "output_scores=true", "choices": "choices=はい|いいえ|たぶん"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=32000, n_positions=128, n_embd=8, n_layer=1, n_head=2, bos_token_id=1,
                     eos_token_id=2, pad_token_id=3)
    return MultiHeadGPT2(cfg, ["a", "b"]).save_pretrained(tmp_path_factory.mktemp("m") / "model")


def test_every_control_is_covered():
    from dataclasses import fields

    from gpt2mh.inference.controls import SamplingConfig

    assert set(STREAM_CONTROLS) == {f.name for f in fields(SamplingConfig)}


@pytest.mark.parametrize("where", ["--controls", "--head"])
@pytest.mark.parametrize("control", list(STREAM_CONTROLS))
def test_stream_matches_plain_output_or_refuses_by_name(model_dir, capsys, control, where):
    spec = STREAM_CONTROLS[control]
    given = ["--controls", spec] if where == "--controls" else ["--head", f"b:{spec}"]
    argv = ["generate", "--model", str(model_dir), "--seed", "1", "--max-new-tokens", "4", *given, "今日は", "明日"]
    if control == "max_new_tokens":
        argv = [a for a in argv if a not in ("--max-new-tokens", "4")]
    plain_code = main(argv)
    plain = capsys.readouterr()
    code = main(argv + ["--stream"])
    streamed = capsys.readouterr()
    if code == 2:  # refused: by name, never a raw KeyError
        assert control in streamed.err and "--stream" in streamed.err, streamed.err
        return
    assert plain_code == 0 and code == 0, (plain.err, streamed.err)
    assert streamed.out == plain.out
