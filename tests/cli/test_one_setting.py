"""One setting said two ways (issue 28, class 8): a flag and a --set, --controls and --max-new-tokens, a key
twice in a control string or in --set, max_length and max_new_tokens — they agree or are refused, by one
rule (`gpt2mh._checks.merge_settings`). Searched: hypothesis over random sources for the rule itself, then
tables over every spelling pair of every setting each surface takes."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh._checks import SettingConflict, merge_settings
from gpt2mh.cli import main
from gpt2mh.cli.train import TRAIN_FLAGS
from gpt2mh.inference.controls import SamplingConfig
from gpt2mh.train.config import parse_set

VALUES = st.one_of(st.integers(-3, 3), st.sampled_from([0.5, 1.0, True, False, "a", None, (1, 2)]))
SOURCES = st.lists(st.tuples(st.sampled_from(["A", "B", "C"]),
                             st.dictionaries(st.sampled_from(["x", "y", "z"]), VALUES, max_size=3)), max_size=4)


@settings(max_examples=500, deadline=None)
@given(sources=SOURCES)
def test_merge_settings_agrees_or_names_both_spellings(sources):
    spelled = [(f"{label}{i}:{{key}}={{value}}", d) for i, (label, d) in enumerate(sources)]
    try:
        merged = merge_settings(spelled)
    except SettingConflict as e:
        (i, a), (j, b) = [(int(t[0].split(":")[0][1:]), t[1]) for t in (e.first, e.second)]
        assert i < j and sources[i][1][e.key] == a and sources[j][1][e.key] == b and a != b or type(a) is not type(b)
        assert str(e) == f"{e.second[0]} and {e.first[0]} disagree: give one of them"
        return
    for _, d in sources:
        for k, v in d.items():
            assert merged[k] == v  # every source's value is the merged one: nothing was overridden


# every control with two different valid spellings of a value
CONTROL_VALUES = {"do_sample": ("true", "false"), "temperature": ("0.5", "0.7"), "top_k": ("3", "4"),
                  "top_p": ("0.5", "0.9"), "min_p": ("0.1", "0.2"), "typical_p": ("0.5", "0.9"),
                  "repetition_penalty": ("1.2", "1.5"), "no_repeat_ngram_size": ("2", "3"),
                  "bad_words_ids": ("5", "6;7 8"), "min_new_tokens": ("1", "2"), "max_new_tokens": ("3", "4"),
                  "eos_token_id": ("2", "2 3"), "pad_token_id": ("3", "none"), "num_return_sequences": ("1", "2"),
                  "num_beams": ("1", "2"), "length_penalty": ("0.5", "2"), "early_stopping": ("true", "never"),
                  "stop_strings": ("。", "、|。"), "output_scores": ("true", "false"), "choices": ("はい|いいえ", "はい")}


def test_every_control_is_covered():
    assert set(CONTROL_VALUES) == {f.name for f in dataclasses.fields(SamplingConfig)}


@pytest.mark.parametrize("key", list(CONTROL_VALUES))
def test_a_control_twice_in_one_string(key):
    a, b = CONTROL_VALUES[key]
    with pytest.raises(SettingConflict, match=rf"'{key}={b}' and '{key}={a}' disagree"):
        SamplingConfig.from_string(f"{key}={a},{key}={b}")
    assert SamplingConfig.from_string(f"{key}={a},{key}={a}") == SamplingConfig.from_string(f"{key}={a}")


@pytest.mark.parametrize("key", [k for k in TRAIN_FLAGS if k != "resume"])
def test_a_training_flag_and_a_set_of_it(key, tmp_path, capsys):
    values = {"train_file": ("a.jsonl", "b.jsonl"), "validation_file": ("a.jsonl", "b.jsonl"),
              "heads": ("a,b", '["a", "c"]'), "output_dir": ("o1", "o2"), "base": ("m1", "m2"),
              "max_steps": ("5", "6"), "batch_size": ("4", "8"), "learning_rate": ("0.001", "0.002"),
              "seed": ("1", "2"), "device": ("cpu", "cpu:0")}[key]
    flag = f"--{key.replace('_', '-')}"
    code = main(["train", "--output-dir" if key != "output_dir" else flag, str(tmp_path / values[0])
                 if key == "output_dir" else str(tmp_path / "run"), *([flag, values[0]] if key != "output_dir" else []),
                 "--set", f"{key}={values[1]}"])
    assert code == 2
    assert "disagree: give one of them" in capsys.readouterr().err
    with pytest.raises(SettingConflict, match=rf"--set {key}=2 and --set {key}=1 disagree"):
        parse_set([f"{key}=1", f"{key}=2"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=32000, n_positions=128, n_embd=8, n_layer=1, n_head=2, bos_token_id=1,
                     eos_token_id=2, pad_token_id=3)
    return MultiHeadGPT2(cfg, ["a"]).save_pretrained(tmp_path_factory.mktemp("m") / "model")


@pytest.mark.parametrize("in_controls", [1, 2, 64])
@pytest.mark.parametrize("flag", [None, 1, 2, 64])
def test_controls_and_max_new_tokens(model_dir, capsys, in_controls, flag):
    argv = ["generate", "--model", str(model_dir), "--controls", f"max_new_tokens={in_controls}", "hi"]
    code = main(argv + ([] if flag is None else ["--max-new-tokens", str(flag)]))
    err = capsys.readouterr().err
    if flag is None or flag == in_controls:
        assert code == 0, err
    else:
        assert code == 2 and f"--max-new-tokens {flag} and --controls max_new_tokens={in_controls} disagree" in err


@pytest.mark.parametrize("max_length", [5, 6, 9])
@pytest.mark.parametrize("max_new_tokens", [None, 1, 2, 5])
def test_max_length_and_max_new_tokens(model_dir, max_length, max_new_tokens):
    model = MultiHeadGPT2.from_pretrained(model_dir)
    ids = torch.tensor([[5, 6, 7, 8]])  # T = 4: max_length 5 / 6 / 9 means 1 / 2 / 5 new tokens
    kw = dict(compile=False, max_length=max_length, min_new_tokens=1)
    if max_new_tokens is not None:
        kw["max_new_tokens"] = max_new_tokens
    if max_new_tokens is None or max_new_tokens == max_length - 4:
        assert model.generate(ids, **kw)["a"].size(1) <= max_length - 4
    else:
        with pytest.raises(SettingConflict, match=rf"max_new_tokens={max_new_tokens} and max_length={max_length}"):
            model.generate(ids, **kw)
