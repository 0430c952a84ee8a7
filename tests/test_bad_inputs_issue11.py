"""Catalogue of bad inputs, part 6 (issue 11): the cases the issue lists, each refused with a message
naming the problem, or handled correctly. Tiny random models, eager only."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.checkpoint import load_training_state
from gpt2mh.data import DataError, read_examples
from gpt2mh.weights import CheckpointError, HeadsWarning

V, EOS, PAD = 101, 2, 3
CFG = dict(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=EOS,
           pad_token_id=PAD)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultiHeadGPT2(GPT2Config(**CFG), ["a", "b"]).eval()


@pytest.fixture
def tuned(tmp_path):
    """A 'fine-tuned' two-head checkpoint: heads differ from the wte copy."""
    torch.manual_seed(0)
    m = MultiHeadGPT2(GPT2Config(**CFG), ["a", "b"])
    with torch.no_grad():
        m.heads.add_(torch.randn_like(m.heads))
    m.save_pretrained(tmp_path / "ckpt")
    return m, tmp_path / "ckpt"


def gen(model, ids=None, **kw):
    ids = torch.tensor([[5, 6, 7]]) if ids is None else ids
    return model.generate(ids, compile=False, **{"max_new_tokens": 3, **kw})


# ---- fine-tuned heads are never dropped in silence ------------------------------------------------------
def test_checkpoint_without_gpt2mh_json_recovers_head_names(tuned):
    m, folder = tuned
    (folder / "gpt2mh.json").unlink()
    with pytest.warns(HeadsWarning, match=r"head names were recovered from model.safetensors: \['a', 'b'\]"):
        back = MultiHeadGPT2.from_pretrained(folder)
    assert back.head_names == ("a", "b") and torch.equal(back.heads, m.heads)


def test_old_checkpoint_without_names_anywhere_is_refused(tuned):
    m, folder = tuned
    (folder / "gpt2mh.json").unlink()
    from safetensors.torch import load_file, save_file

    save_file(load_file(folder / "model.safetensors"), folder / "model.safetensors")  # no head names stored
    with pytest.raises(CheckpointError, match=r"holds 2 fine-tuned head\(s\).*gpt2mh.json, which names them, is missing"):
        MultiHeadGPT2.from_pretrained(folder)
    with pytest.warns(HeadsWarning, match=r"naming the 2 stored heads \['x', 'y'\]"):
        back = MultiHeadGPT2.from_pretrained(folder, heads=["x", "y"])
    assert torch.equal(back.heads, m.heads)


def test_heads_subset_of_a_fine_tuned_checkpoint_warns_about_dropped_and_new(tuned):
    _, folder = tuned
    with pytest.warns(HeadsWarning) as record:
        MultiHeadGPT2.from_pretrained(folder, heads=["b", "new"])
    text = " ".join(str(w.message) for w in record)
    assert "trained head(s) ['a'] are not in heads" in text and "head(s) ['new'] are not in the checkpoint" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MultiHeadGPT2.from_pretrained(folder, heads=["b", "a"])  # same heads, other order: nothing to say


# ---- loading ---------------------------------------------------------------------------------------------
def test_dtype_as_a_string_is_understood(tuned):
    _, folder = tuned
    assert MultiHeadGPT2.from_pretrained(folder, dtype="float16").dtype == torch.float16
    assert MultiHeadGPT2.from_pretrained(folder, dtype="torch.bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype='int8' is not a floating-point torch dtype"):
        MultiHeadGPT2.from_pretrained(folder, dtype="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_names_the_device(tuned):
    _, folder = tuned
    with pytest.raises(ValueError, match=r"device=.*cuda.* is not usable here.*device='cpu'"):
        MultiHeadGPT2.from_pretrained(folder, device="cuda")


def test_unknown_device_string_names_it(tuned):
    _, folder = tuned
    with pytest.raises(ValueError, match=r"device='gpu0' is not usable here"):
        MultiHeadGPT2.from_pretrained(folder, device="gpu0")


@pytest.mark.parametrize("key", ["attn_pdrop", "layer_norm_epsilon", "activation_function", "resid_pdrop"])
def test_null_config_values_mean_the_default(tuned, key):
    _, folder = tuned
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = None
    (folder / "config.json").write_text(json.dumps(cfg))
    assert MultiHeadGPT2.from_pretrained(folder).head_names == ("a", "b")


def test_config_value_of_the_wrong_type_names_key_and_file(tuned):
    _, folder = tuned
    cfg = json.loads((folder / "config.json").read_text())
    cfg["attn_pdrop"] = "high"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: attn_pdrop='high' must be a number"):
        MultiHeadGPT2.from_pretrained(folder)


def test_empty_weight_map_is_refused(tuned):
    _, folder = tuned
    (folder / "model.safetensors").rename(folder / "shard-1.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match=r"'weight_map' is empty"):
        MultiHeadGPT2.from_pretrained(folder)


def test_save_pretrained_into_a_sharded_folder_removes_the_stale_index(tuned, tmp_path):
    m, folder = tuned
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    m.save_pretrained(folder)
    assert not (folder / "model.safetensors.index.json").exists()
    assert torch.equal(MultiHeadGPT2.from_pretrained(folder).heads, m.heads)


@pytest.mark.parametrize("value, ok", [(1.0, True), (1.5, False), (True, False), ("1", True), (None, False)])
def test_model_config_float_ints(value, ok):
    fields = dict(CFG, n_layer=value)
    if ok:
        assert GPT2Config(**fields).n_layer == 1
    else:
        with pytest.raises(ValueError, match=r"n_layer=.* must be an integer"):
            GPT2Config(**fields)


# ---- generation and scoring --------------------------------------------------------------------------------
def test_temperature_inf_is_refused(model):
    with pytest.raises(ValueError, match=r"temperature=inf is out of range: must be a finite number"):
        gen(model, do_sample=True, temperature=float("inf"), bad_words_ids=[[0]])


@pytest.mark.parametrize("controls, error, message", [
    (dict(eos_token_id="</s>"), ValueError, r"eos_token_id='</s>' must be a token id"),
    (dict(pad_token_id=2.5), ValueError, r"pad_token_id=2\.5 must be a token id"),
    (dict(per_head=["a"]), TypeError, r"per_head must map head names to controls"),
    (dict(per_head={"a": 5}), TypeError, r"per_head\['a'\] must be a dict of controls"),
    (dict(max_length="10"), ValueError, r"max_length='10' must be an integer"),
    (dict(repetition_penalty=float("inf")), ValueError, r"repetition_penalty=inf is out of range"),
])
def test_bad_generation_argument_types(model, controls, error, message):
    with pytest.raises(error, match=message):
        gen(model, **controls)


def test_per_head_as_a_cli_string_and_max_length_none(model):
    ref = gen(model, per_head={"a": {"max_new_tokens": 2}})
    got = gen(model, per_head={"a": "max_new_tokens=2"})
    assert all(torch.equal(ref[h], got[h]) for h in ref)
    assert all(torch.equal(gen(model, max_length=None)[h], gen(model)[h]) for h in ref)


@pytest.mark.parametrize("ids", [np.array([[5, 6, 7]], dtype=np.uint16), np.array([5, 6, 7], dtype=np.int32),
                                 [5, 6, 7], torch.tensor([[5, 6, 7]], dtype=torch.int16)])
def test_other_integer_forms_of_ids_generate_the_same(model, ids):
    ref = gen(model)
    got = gen(model, ids, attention_mask=[[1, 1, 1]])
    assert all(torch.equal(ref[h], got[h]) for h in ref)


@pytest.mark.parametrize("ids, mask, message", [
    (np.array([[5.0, 6.0]]), None, r"input_ids must hold integer token ids, got a numpy array of dtype float64"),
    ([[5, 6], [7]], None, r"rows have different lengths \[1, 2\]; pad them"),
    ("hello", None, r"input_ids is a str, not token ids: encode text with the tokenizer first"),
    (torch.tensor([[5, 6]]), [[1, 2]], r"attention_mask must hold only 0 and 1"),
    ({"input_ids": [[5, 6]], "attention_mask": [[1, 1]]}, [[1, 1]], r"attention_mask given twice"),
])
def test_bad_id_and_mask_forms(model, ids, mask, message):
    with pytest.raises((TypeError, ValueError), match=message):
        gen(model, ids, attention_mask=mask)


def test_score_mask_of_another_shape_names_it(model):
    ids, tgt = torch.tensor([[5, 6]]), torch.tensor([[7, 8, 9]])
    with pytest.raises(ValueError, match=r"target_ids must be \(B, T\) with target_mask of the same shape; got \(1, 3\) and \(1, 2\)"):
        model.score(ids, None, tgt, torch.ones(1, 2))


def test_score_of_an_empty_continuation_is_zero(model):
    ids, tgt = torch.tensor([[5, 6], [7, 8]]), torch.tensor([[7, 8], [9, 9]])
    got = model.score(ids, None, tgt, torch.tensor([[1, 1], [0, 0]]))
    assert torch.all(got[:, 1] == 0) and torch.all(got[:, 0] < 0)


def test_score_text_with_bare_strings_scores_one_pair():
    from gpt2mh.score import score_text
    from gpt2mh.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained()
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=24, n_embd=8, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    m = MultiHeadGPT2(cfg, ["a"]).eval()
    one = score_text(m, tok, "一文", "続き")
    assert one == score_text(m, tok, ["一文"], ["続き"]) and len(one["a"]) == 1
    with pytest.raises(TypeError, match=r"both strings, or both lists of strings"):
        score_text(m, tok, "一文", ["続き", "x"])


def test_stream_refuses_a_tokenizer_of_another_vocabulary(model):
    from gpt2mh.generate import stream
    from gpt2mh.tokenizer import Tokenizer

    with pytest.raises(ValueError, match=r"has 32000 tokens but the model's vocab_size is 101"):
        next(stream(model, Tokenizer.from_pretrained(), torch.tensor([[5, 6]]), compile=False))


# ---- data and training ---------------------------------------------------------------------------------------
def test_lone_surrogate_in_jsonl_names_file_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "ok", "a": "x"}\n{"input": "bad \\ud83d", "a": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl: line 2: column 'input' holds a lone surrogate U\+D83D"):
        read_examples(path, ["a"])


def test_nan_from_pandas_is_a_missing_target(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "x", "a": NaN, "b": "t"}\n{"input": "y", "a": "u", "b": "v"}\n', encoding="utf-8")
    examples, report = read_examples(path, ["a", "b"])
    assert examples[0].targets == {"b": "t"} and report.targets == {"a": 1, "b": 2}


def test_a_head_column_blank_in_every_row_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("input,a,b\nx,1,\ny,2, \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv: the target column of head\(s\) \['b'\] \('b'\) is empty in every row"):
        read_examples(path, ["a", "b"])


def test_corrupt_trainer_state_and_truncated_training_state_name_the_path(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{\"step\": 3,")
    torch.save({"optimizer": {}}, folder / "training_state.pt")
    with pytest.raises(ValueError, match=r"checkpoint-3/trainer_state.json: corrupt trainer state"):
        load_training_state(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 3}))
    data = (folder / "training_state.pt").read_bytes()
    (folder / "training_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint-3/training_state.pt: cannot be read \(truncated or corrupt"):
        load_training_state(folder)


def test_resume_with_other_heads_is_refused(tmp_path):
    from gpt2mh.train import check_resume_heads, TrainConfig

    cfg = TrainConfig(train_file="t.jsonl", heads=["reading", "entities"], model_config={})
    with pytest.raises(ValueError, match=r"was trained with heads \['reading', 'pos'\], but this run asks for "
                                         r"\['reading', 'entities'\]"):
        check_resume_heads(cfg, tmp_path, ["reading", "pos"])
    check_resume_heads(TrainConfig(train_file="t.jsonl", heads=["pos", "reading"], model_config={}), tmp_path,
                       ["reading", "pos"])  # the same heads in another order resume


def test_model_config_float_int_trains_from_scratch_message():
    from gpt2mh.tokenizer import Tokenizer
    from gpt2mh.train import TrainConfig, build_model

    cfg = TrainConfig(train_file="t.jsonl", heads=["a"], model_config={"n_layer": 1.5, "n_embd": 8, "n_head": 2})
    with pytest.raises(ValueError, match=r"model_config: n_layer=1.5 must be an integer"):
        build_model(cfg, Tokenizer.from_pretrained())
    cfg = TrainConfig(train_file="t.jsonl", heads=["a"], model_config={"n_layer": 1.0, "n_embd": 8, "n_head": 2,
                                                                        "n_positions": 16})
    assert build_model(cfg, Tokenizer.from_pretrained())[0].config.n_layer == 1
