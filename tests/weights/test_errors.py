"""Catalogue of bad inputs, part 1: checkpoints (issue 7). Each case names the error type and what the
message must say: the file, and the key or setting at fault.

Every case starts from a tiny HF checkpoint written by transformers and breaks one thing. The loader
is the production one, `MultiHeadGPT2.from_pretrained`. Related cases elsewhere: test_weights.py
(layouts that must load), test_hub.py (hub cache and offline errors).

Decisions recorded here:
- NaN/inf weights are refused (CheckpointError naming the keys), never loaded with a warning.
- A tensor whose header claims an integer dtype is refused: a header can say I32 for F32 bytes
  (same size), and casting those bits would silently load garbage.
- A gpt2mh.json written by a newer gpt2mh is refused rather than half-understood.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file, save_file

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.weights.hf import CheckpointError

V, C = TINY["vocab_size"], TINY["n_embd"]


# ---- helpers -------------------------------------------------------------------------------------
def copy_of(hf_checkpoint, tmp_path, layout="safetensors") -> Path:
    return Path(shutil.copytree(hf_checkpoint(TINY, layout)[1], tmp_path / "ckpt"))


def edit_header(path: Path, edit) -> None:
    """Rewrite the JSON header of a safetensors file in place; the tensor bytes stay as they are."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def set_field(key, field, value):
    return lambda h: h[key].__setitem__(field, value)


def edit_tensors(path: Path, edit) -> None:
    sd = load_file(path)
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def gpt2mh_checkpoint(hf_checkpoint, tmp_path, heads=("x", "y")) -> Path:
    return MultiHeadGPT2.from_pretrained(hf_checkpoint(TINY)[1], heads=list(heads)).save_pretrained(tmp_path / "own")


def load(folder, **kw):
    return MultiHeadGPT2.from_pretrained(folder, **kw)


# ---- safetensors files that lie or are torn --------------------------------------------------------
def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _past_the_end(h):
    begin, end = h["transformer.wpe.weight"]["data_offsets"]
    h["transformer.wpe.weight"]["data_offsets"] = [begin + 10**6, end + 10**6]


def _overlapping(h):
    begin, end = h["transformer.wpe.weight"]["data_offsets"]
    h["transformer.wpe.weight"]["data_offsets"] = [0, end - begin]


SAFETENSORS_CASES = {
    # name: (how the file is broken, message after "<folder>/model.safetensors: ")
    "truncated": (_truncate, r"not a readable safetensors file \(truncated or corrupt\?\)"),
    "empty-file": (lambda f: f.write_bytes(b""), r"not a readable safetensors file.*header too small"),
    "header-length-huge": (lambda f: f.write_bytes((10**12).to_bytes(8, "little") + f.read_bytes()[8:]),
                           "header too large"),
    "offsets-past-the-end": (lambda f: edit_header(f, _past_the_end), "not a readable safetensors file"),
    "offsets-overlapping": (lambda f: edit_header(f, _overlapping), r"invalid offset for tensor `transformer\.wpe"),
    "dtype-lie-other-size": (lambda f: edit_header(f, set_field("transformer.wpe.weight", "dtype", "F16")),
                             "invalid shape, data type, or offset"),
    "dtype-lie-same-size": (lambda f: edit_header(f, set_field("transformer.h.0.ln_1.weight", "dtype", "I32")),
                            r"must be floating point; found \['transformer\.h\.0\.ln_1\.weight \(torch\.int32\)'\]"),
    "dtype-unknown": (lambda f: edit_header(f, set_field("transformer.wpe.weight", "dtype", "F99")),
                      "unknown variant `F99`"),
    "shape-lie": (lambda f: edit_header(f, set_field("transformer.wpe.weight", "shape", [C, TINY["n_positions"]])),
                  r"transformer\.wpe\.weight: file \(32, 64\) vs config \(64, 32\)"),
    "nan": (lambda f: edit_tensors(f, lambda sd: sd["transformer.wpe.weight"].__setitem__((3, 3), float("nan"))),
            r"NaN or inf in \['transformer\.wpe\.weight'\]; refusing"),
    "inf": (lambda f: edit_tensors(f, lambda sd: sd["transformer.h.1.mlp.c_proj.weight"].__setitem__(0, float("inf"))),
            r"NaN or inf in \['transformer\.h\.1\.mlp\.c_proj\.weight'\]"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_broken_safetensors(hf_checkpoint, tmp_path, case):
    breaks, message = SAFETENSORS_CASES[case]
    folder = copy_of(hf_checkpoint, tmp_path)
    breaks(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"ckpt/model\.safetensors: .*" + message):
        load(folder)


def test_inf_in_saved_heads_names_heads(hf_checkpoint, tmp_path):
    folder = gpt2mh_checkpoint(hf_checkpoint, tmp_path)
    edit_tensors(folder / "model.safetensors", lambda sd: sd["heads"].__setitem__((1, 0, 5), float("-inf")))
    with pytest.raises(CheckpointError, match=r"own/model\.safetensors: weights hold NaN or inf in \['heads'\]"):
        load(folder)


# ---- config.json against the weights ---------------------------------------------------------------
CONFIG_CASES = {
    # name: (config.json changes, error type, message)
    "n_embd": (dict(n_embd=48), CheckpointError,
               r"model\.safetensors: shape mismatches \(does config\.json match these weights\?\) "
               r"\[.*'transformer\.h\.0\.attn\.c_attn\.weight: file \(32, 96\) vs config \(48, 144\)'"),
    "vocab_size": (dict(vocab_size=200), CheckpointError, r"transformer\.wte\.weight: file \(101, 32\) vs config \(200, 32\)"),
    "n_layer-more": (dict(n_layer=3), CheckpointError, r"missing keys \['transformer\.h\.2\.attn\.c_attn\.bias'"),
    "n_layer-bool": (dict(n_layer=True), ValueError, r"config\.json: n_layer=True must be an integer"),
    "n_layer-fraction": (dict(n_layer=1.5), ValueError, r"config\.json: n_layer=1\.5 must be an integer"),
    "n_head-not-dividing": (dict(n_head=5), ValueError, r"config\.json: n_embd=32 is not divisible by n_head=5"),
    "dropout-above-1": (dict(attn_pdrop=2.0), ValueError, r"config\.json: attn_pdrop=2\.0 is a dropout probability"),
    "activation": (dict(activation_function="relu"), ValueError, r"config\.json: activation_function='relu' is not supported"),
    "model_type": (dict(model_type="llama"), ValueError, r"config\.json: model_type='llama'; gpt2mh loads GPT-2"),
    "missing-setting": (dict(n_embd=None), ValueError, r"config\.json: required setting 'n_embd' is missing"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_contradicting_or_unsupported(hf_checkpoint, tmp_path, case):
    changes, error, message = CONFIG_CASES[case]
    folder = copy_of(hf_checkpoint, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    with pytest.raises(error, match=message):
        load(folder)


def test_config_not_json(hf_checkpoint, tmp_path):
    folder = copy_of(hf_checkpoint, tmp_path)
    (folder / "config.json").write_text('{"n_embd": 32,')
    with pytest.raises(ValueError, match=r"ckpt/config\.json: not valid JSON \(.*line 1 column 15"):
        load(folder)


# ---- pytorch_model.bin ------------------------------------------------------------------------------
class Payload:
    """Unpickling this calls open(path, "w"): the file appears if the loader runs pickled code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bin_whose_pickle_runs_code_is_refused_and_runs_nothing(hf_checkpoint, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(hf_checkpoint(TINY)[1] / "config.json", folder)
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": torch.zeros(V, C), "x": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"evil/pytorch_model\.bin: .*weights_only=True.*never unpickles"):
        load(folder)
    assert not marker.exists()


def test_truncated_bin(hf_checkpoint, tmp_path):
    folder = copy_of(hf_checkpoint, tmp_path, "bin")
    _truncate(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"ckpt/pytorch_model\.bin: cannot be read as a plain tensor checkpoint"):
        load(folder)


def test_nan_in_bin_names_the_bin(hf_checkpoint, tmp_path):
    # The .bin is converted to safetensors in the cache first; the error still names the user's file.
    folder = copy_of(hf_checkpoint, tmp_path, "bin")
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    sd["transformer.wte.weight"][0, 0] = float("nan")
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"ckpt/pytorch_model\.bin \(converted to .*\): weights hold NaN.*wte"):
        load(folder)


# ---- file names inside checkpoint metadata (model.safetensors.index.json) ------------------------------
def sharded_with(hf_checkpoint, tmp_path, edit) -> Path:
    folder = copy_of(hf_checkpoint, tmp_path, "sharded")
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    path.write_text(json.dumps(edit(index)))
    return folder


def _map_wte_to(name):
    def edit(index):
        index["weight_map"]["transformer.wte.weight"] = name
        return index
    return edit


INDEX_CASES = {
    "parent-dir": (_map_wte_to("../model-00001-of-00007.safetensors"), r"refusing file name '\.\./model-0"),
    "absolute": (_map_wte_to("/etc/passwd"), r"refusing file name '/etc/passwd' \(it leaves the checkpoint folder\)"),
    "inner-parent": (_map_wte_to("a/../../x.safetensors"), "refusing file name 'a/../../x.safetensors'"),
    "not-a-string": (_map_wte_to(3), "shard file name 3 is not a string"),
    "missing-shard": (_map_wte_to("model-99-of-99.safetensors"), r"shard file\(s\) missing: .*model-99-of-99"),
    "not-an-object": (lambda index: [index], r"not a safetensors index \(needs a 'weight_map'\)"),
    "weight_map-list": (lambda index: {"weight_map": ["a.safetensors"]}, "'weight_map' must map tensor names"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_bad_index(hf_checkpoint, tmp_path, case):
    edit, message = INDEX_CASES[case]
    with pytest.raises(CheckpointError, match=r"ckpt/model\.safetensors\.index\.json: " + message):
        load(sharded_with(hf_checkpoint, tmp_path, edit))


def test_index_shard_symlinked_outside(hf_checkpoint, tmp_path):
    folder = copy_of(hf_checkpoint, tmp_path, "sharded")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match=rf"index\.json: '{shard.name}' is a symlink to .*elsewhere\.safetensors, "
                                              r"outside the checkpoint"):
        load(folder)


def test_same_key_in_two_shards(hf_checkpoint, tmp_path):
    folder = copy_of(hf_checkpoint, tmp_path, "sharded")
    first, second = sorted(folder.glob("model-*.safetensors"))[:2]
    a = load_file(first)
    key = next(iter(a))
    edit_tensors(second, lambda sd: sd.update({key: a[key]}))
    with pytest.raises(CheckpointError, match=rf"{second.name}: key '{key}' appears in more than one shard"):
        load(folder)


# ---- head names: gpt2mh.json and the heads argument ---------------------------------------------------
META_CASES = {
    "duplicate": ({"format_version": 1, "head_names": ["x", "x"]}, r"duplicate head names \['x'\]"),
    "empty-name": ({"format_version": 1, "head_names": ["x", ""]}, r"head names must be non-empty strings \(got ''\)"),
    "zero-heads": ({"format_version": 1, "head_names": []}, "a model needs at least one head"),
    "names-as-a-string": ({"format_version": 1, "head_names": "xy"}, r'expected \{"head_names": \[name, \.\.\.\]\}'),
    "newer-format": ({"format_version": 99, "head_names": ["x", "y"]}, "format_version 99 is newer than this gpt2mh"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_bad_gpt2mh_json(hf_checkpoint, tmp_path, case):
    meta, message = META_CASES[case]
    folder = gpt2mh_checkpoint(hf_checkpoint, tmp_path)
    (folder / "gpt2mh.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"own/gpt2mh\.json: .*" + message):
        load(folder)


def test_gpt2mh_json_listing_more_heads_than_saved(hf_checkpoint, tmp_path):
    folder = gpt2mh_checkpoint(hf_checkpoint, tmp_path)
    edit_json(folder / "gpt2mh.json", head_names=["x", "y", "z"])
    with pytest.raises(CheckpointError, match=r"gpt2mh\.json lists 3 heads, so 'heads' must have shape "
                                              r"\(3, 32, 101\); found \(2, 32, 101\)"):
        load(folder)


@pytest.mark.parametrize("heads, message", [
    ([], "a model needs at least one head"),
    (["a", "b", "a"], r"duplicate head names \['a'\]"),
    (["a", " "], r"head names must be non-empty strings \(got ' '\)"),
    (["a", None], r"head names must be non-empty strings \(got None\)"),
], ids=["zero", "duplicate", "blank", "none"])
def test_bad_head_names_when_loading_or_building(hf_checkpoint, heads, message):
    with pytest.raises(ValueError, match=message):
        load(hf_checkpoint(TINY)[1], heads=heads)
    with pytest.raises(ValueError, match=message):
        MultiHeadGPT2(GPT2Config(**TINY), heads)


# ---- where the checkpoint should be ----------------------------------------------------------------------
def test_missing_folder_file_instead_of_folder_and_no_weights(hf_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope: no such checkpoint folder"):
        load(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file: expected a checkpoint folder"):
        load(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    shutil.copy(hf_checkpoint(TINY)[1] / "config.json", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"empty: no weights found \(looked for model\.safetensors"):
        load(tmp_path / "empty")
