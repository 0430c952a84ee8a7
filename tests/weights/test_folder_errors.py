"""A fine-tuned checkpoint's heads are never dropped in silence; loading arguments and config.json values are checked by name."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.weights.folder import HeadsWarning
from gpt2mh.weights.hf import CheckpointError

V, EOS, PAD = 101, 2, 3
CFG = dict(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=EOS,
           pad_token_id=PAD)


@pytest.fixture
def tuned(tmp_path):
    """A 'fine-tuned' two-head checkpoint: heads differ from the wte copy."""
    torch.manual_seed(0)
    m = MultiHeadGPT2(GPT2Config(**CFG), ["a", "b"])
    with torch.no_grad():
        m.heads.add_(torch.randn_like(m.heads))
    m.save_pretrained(tmp_path / "ckpt")
    return m, tmp_path / "ckpt"


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
