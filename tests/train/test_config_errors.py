"""Catalogue of bad inputs, part 8 (issue 11): library-level training / model / data settings that were
accepted silently or failed with a raw error. In-process, no training run: each case is refused at
TrainConfig construction (or by the function given it) with a message naming the setting."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.demo.quickstart import quickstart
from gpt2mh.train.config import TrainConfig
from gpt2mh.train.data import read_examples
from gpt2mh.train.loop import diverged, nonfinite_weights

BASE = dict(train_file="t.jsonl", heads=["a"], model_config={"n_layer": 1})


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE, **kw})


# ---- config files --------------------------------------------------------------------------------
def test_config_file_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_bytes(b'{"train_file": "\xff"}')  # used to be a bare UnicodeDecodeError without the path
    with pytest.raises(ValueError, match=r"run\.json: not UTF-8 text .*save it as UTF-8"):
        TrainConfig.from_file(path)


def test_json_config_with_a_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "run.json"  # JSON kept the last "learning_rate" in silence
    path.write_text('{"train_file": "t.jsonl", "heads": ["a"], "model_config": {"n_layer": 1, "n_layer": 2},'
                    ' "learning_rate": 1e-3, "learning_rate": 1e-1}')
    with pytest.raises(ValueError, match=r"run\.json: duplicate key\(s\) \['n_layer'\]"):
        TrainConfig.from_file(path)
    path.write_text('{"train_file": "t.jsonl", "heads": ["a"], "model_config": {},'
                    ' "learning_rate": 1e-3, "learning_rate": 1e-1}')
    with pytest.raises(ValueError, match=r"duplicate key\(s\) \['learning_rate'\]"):
        TrainConfig.from_file(path)
    toml = tmp_path / "run.toml"  # TOML refuses it by itself; the path is named
    toml.write_text('train_file = "a"\ntrain_file = "b"\n')
    with pytest.raises(ValueError, match=r"run\.toml: Cannot overwrite a value"):
        TrainConfig.from_file(toml)


# ---- float settings: finite, in range --------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("learning_rate", math.inf), ("learning_rate", math.nan), ("learning_rate", -1e-3),
    ("weight_decay", math.nan), ("weight_decay", -0.1), ("weight_decay", math.inf),
    ("adam_eps", 0.0), ("adam_eps", math.nan),
    ("min_lr_ratio", math.nan), ("min_lr_ratio", 1.5), ("min_lr_ratio", -0.1),
    ("max_grad_norm", math.inf), ("max_grad_norm", math.nan), ("max_grad_norm", -1.0),
    ("epochs", math.inf),
])
def test_non_finite_or_negative_float_settings_are_refused(key, value):
    # learning_rate=inf used to be accepted and fail at step 2 as "weights became NaN/inf"
    with pytest.raises(ValueError, match=rf"^{key} must be "):
        config(**{key: value})


def test_adam_betas_are_two_numbers_below_one():
    for betas in [(1.5, 0.9), (0.9,), (0.9, 0.99, 0.999)]:
        with pytest.raises(ValueError, match=r"adam_betas must be two numbers in \[0, 1\)"):
            config(adam_betas=betas)
    assert config(max_grad_norm=0.0).max_grad_norm == 0.0  # 0: no clipping, as documented


# ---- integer settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [10**30, 2**32, -1])
def test_seed_outside_the_command_lines_range_is_refused(seed):
    # 10**30 used to fail in torch.manual_seed as "Overflow when unpacking long long"
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        config(seed=seed)
    assert config(seed=2**32 - 1).seed == 2**32 - 1


def test_gradient_accumulation_zero_is_a_message_not_zero_division():
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps must be >= 1.*gradient_accumulation_steps=0"):
        config(gradient_accumulation_steps=0)


@pytest.mark.parametrize("key,value,match", [
    ("early_stopping_patience", 0, r"early_stopping_patience must be >= 1 or None"),   # 0 meant "off" silently
    ("early_stopping_patience", -1, r"early_stopping_patience must be >= 1 or None"),  # stopped at the 1st eval
    ("eval_batch_size", 0, r"eval_batch_size must be >= 1 or None"),                    # 0 became batch_size
    ("eval_max_new_tokens", 0, r"eval_max_new_tokens must be >= 1"),
    ("eval_max_new_tokens", -3, r"eval_max_new_tokens must be >= 1"),
    ("eval_max_new_tokens", {"a": 0}, r"eval_max_new_tokens must be >= 1"),      # per head (the quickstart's form)
    ("eval_max_new_tokens", {"a": 2.5}, r"eval_max_new_tokens must be >= 1"),
    ("eval_max_new_tokens", {"b": 8}, r"names head\(s\) \['b'\] that are not in heads"),  # a typo fell back to the default
    ("train_heads", [], r"train_heads=\[\] trains no head"),                           # [] trained every head
])
def test_integer_and_list_settings_that_meant_something_else(key, value, match):
    with pytest.raises(ValueError, match=match):
        config(**{key: value})


def test_numpy_scalars_and_paths_are_plain_values(tmp_path):
    cfg = config(train_file=tmp_path / "t.jsonl", batch_size=np.int64(4), learning_rate=np.float32(1e-3),
                 seed=np.uint32(7), freeze_trunk=np.bool_(True), model_config={"n_layer": np.int64(1)},
                 loss_weights={"a": np.float64(0.5)})
    assert cfg.train_file == str(tmp_path / "t.jsonl")
    assert type(cfg.batch_size) is int and cfg.batch_size == 4
    assert type(cfg.learning_rate) is float and cfg.learning_rate == pytest.approx(1e-3)
    assert type(cfg.seed) is int and cfg.freeze_trunk is True
    assert type(cfg.model_config["n_layer"]) is int and type(cfg.loss_weights["a"]) is float
    assert config(heads=np.array(["a", "b"])).heads == ["a", "b"]
    with pytest.raises(TypeError, match=r"batch_size must be int, got 4\.0"):
        config(batch_size=np.float64(4.0))  # a float is still not a count


# ---- strings, names, devices --------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["train_file", "output_dir", "input_column", "resume", "base", "validation_file"])
def test_empty_strings_are_refused(key):
    # output_dir="" wrote the run into the current folder; resume="" resumed from it
    with pytest.raises(ValueError, match=rf"{key} is an empty string"):
        config(**{key: "  " if key == "base" else ""}, **({"model_config": None} if key == "base" else {}))


def test_columns_and_loss_weights_values_are_checked():
    with pytest.raises(ValueError, match=r"columns maps each head to a column name.*\{'a': 1\}"):
        config(columns={"a": 1})
    with pytest.raises(ValueError, match=r"loss_weights must be finite numbers >= 0: \{'a': '1'\}"):
        config(loss_weights={"a": "1"})  # was "must be real number, not str" naming nothing


@pytest.mark.parametrize("name", ["a,b", "x:y", " a", "a "])
def test_head_names_the_command_line_cannot_address_are_refused(name):
    with pytest.raises(ValueError, match=r"heads: head name\(s\) .* contain ',' or ':'"):
        config(heads=["ok", name])
    assert config(heads=["読み", "a b"]).heads == ["読み", "a b"]


def test_device_that_is_not_a_torch_device_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"device='nope' is not a torch device"):
        config(device="nope")
    assert config(device="cuda:1").device == "cuda:1"  # the machine is not asked at construction


# ---- model / data API -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultiHeadGPT2(GPT2Config(vocab_size=101, n_positions=32, n_embd=16, n_layer=1, n_head=2), ["a", "b"])


@pytest.mark.parametrize("heads", [0, [0], 1.5])
def test_head_index_with_a_non_name_says_what_heads_takes(model, heads):
    # heads=0 was "'int' object is not iterable"
    with pytest.raises(TypeError, match=r"heads takes a head name, a list of head names or None.*\['a', 'b'\]"):
        model.head_index(heads)
    with pytest.raises(TypeError, match=r"heads takes a head name"):
        model.generate(torch.tensor([[5, 6]]), heads=heads, max_new_tokens=2, compile=False)
    assert model.head_index(("b",)) == [1] and model.head_index(np.array(["b", "a"])) == [1, 0]


def test_read_examples_heads_none_or_int_and_columns_list(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"input": "x", "a": "y"}\n', encoding="utf-8")
    for heads in (None, 5):
        with pytest.raises(TypeError, match=r"heads must be a head name or a list of head names"):
            read_examples(path, heads)
    with pytest.raises(TypeError, match=r"columns must be a dict head -> column name"):
        read_examples(path, ["a"], columns=["a"])
    examples, _ = read_examples(path, np.array(["a"]))
    assert [type(k) for k in examples[0].targets] == [str]


def test_nonfinite_weights_names_heads_and_trunk_parameters(model, tmp_path):
    m = MultiHeadGPT2(model.config, ["a", "b"])
    with torch.no_grad():
        m.heads[1, 0, 0] = math.nan
        m.transformer.wte.weight[0, 0] = math.inf
    run = SimpleNamespace(model=m, heads=SimpleNamespace(names=["a", "b"]), d=SimpleNamespace(main=False),
                          progress=SimpleNamespace(step=4, last_checkpoint=None))
    bad = nonfinite_weights(run)  # was ["heads", "transformer"]: module prefixes, not heads
    assert bad == ["b", "the trunk (transformer.wte.weight)"]
    with pytest.raises(FloatingPointError, match=r"the weights became NaN/inf at step 5 for head\(s\) b, the trunk "
                                                 r"\(transformer\.wte\.weight\)"):
        diverged(run, "the weights", bad)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_quickstart_steps_zero_is_refused_in_python_too(steps, tmp_path):
    # quickstart(steps=0) trained the default 300 steps (`steps or ...`); the CLI already refused it
    with pytest.raises(ValueError, match=r"steps must be a whole number >= 1"):
        quickstart(tmp_path / "run", steps=steps)
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize("heads", [0, 2.5])
def test_model_built_with_a_non_list_of_head_names(model, heads, tmp_path):
    # GPT2(config, 0) and from_pretrained(..., heads=0) were "'int' object is not iterable"
    with pytest.raises(TypeError, match=rf"head names must be a name or a list of names .*got {heads}"):
        MultiHeadGPT2(model.config, heads)
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(TypeError, match=r"head names must be a name or a list of names"):
        MultiHeadGPT2.from_pretrained(tmp_path / "ckpt", heads=heads)


@pytest.mark.parametrize("folder", ["", "  "])
def test_empty_folder_names_are_not_the_current_folder(model, folder, tmp_path, monkeypatch):
    # save_pretrained("") wrote the checkpoint into the current folder; from_pretrained("") loaded it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"save_pretrained: folder must be a folder path"):
        model.save_pretrained(folder)
    model.save_pretrained(".")  # "." said so: allowed
    with pytest.raises(ValueError, match=r"checkpoint '\s*': give a checkpoint folder or a hub id"):
        MultiHeadGPT2.from_pretrained(folder)
    with pytest.raises(TypeError, match=r"checkpoint must be a folder path or a hub id"):
        MultiHeadGPT2.from_pretrained(None)
    with pytest.raises(TypeError, match=r"save_pretrained: folder must be a folder path, got None"):
        model.save_pretrained(None)


@pytest.mark.parametrize("head", [["a", "b"], 0, None])
def test_export_hf_takes_one_head_name(model, head, tmp_path):
    from gpt2mh.weights.export import export_hf

    # a list or None (all heads) was "too many values to unpack (expected 1)"
    with pytest.raises(TypeError, match=r"export_hf exports one head: head must be one of \['a', 'b'\]"):
        export_hf(model, head, tmp_path / "out", tokenizer=False)
    assert not (tmp_path / "out").exists()
