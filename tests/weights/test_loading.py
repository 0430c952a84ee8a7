"""Checkpoints written by transformers itself (and by hand, as old ones look) through our production
loader `MultiHeadGPT2.from_pretrained`; our own save/load round trip; broken checkpoints refused."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, hf_logits
from safetensors.torch import load_file, save_file

from gpt2mh import MultiHeadGPT2
from gpt2mh.weights.hf import CheckpointError, converted_bin_path

V, C = TINY["vocab_size"], TINY["n_embd"]
PARITY_ATOL = 1e-4  # fp32, SDPA vs eager softmax: observed ~1e-6 (see test_model.py)


def assert_matches_hf(ours: MultiHeadGPT2, hf, dtype=torch.float32):
    """Every trunk weight equal to HF's (a pure rename), every head == wte.T, and the same logits."""
    ref = hf.state_dict()
    got = ours.state_dict()
    for k, v in got.items():
        if k != "heads":
            assert torch.equal(v, ref[k].to(dtype)), k
    for i in range(len(ours.head_names)):
        assert torch.equal(ours.heads[i], ref["lm_head.weight"].to(dtype).t())
    if dtype == torch.float32 and hf.dtype == torch.float32:
        ids = torch.randint(0, V, (2, 7))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids)[0], hf_logits(hf, ids), atol=PARITY_ATOL, rtol=0)


def copy_ckpt(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "ckpt"))


# ---- checkpoints transformers wrote ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded"])
def test_transformers_checkpoints_load(hf_checkpoint, layout):
    hf, folder = hf_checkpoint(TINY, layout)
    if layout == "sharded":
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    ours = MultiHeadGPT2.from_pretrained(folder, heads=["x", "y"])
    assert ours.head_names == ("x", "y") and not ours.training
    assert_matches_hf(ours, hf)


def test_bin_is_converted_once_and_kept(hf_checkpoint, tmp_path, monkeypatch):
    hf, folder = hf_checkpoint(TINY, "bin")
    folder = copy_ckpt(folder, tmp_path)  # a new path: a new cache entry, whatever ran before
    bin_path = folder / "pytorch_model.bin"
    converted = converted_bin_path(bin_path)
    assert Path(os.environ["GPT2MH_CACHE"]) in converted.parents and not converted.exists()

    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    assert_matches_hf(MultiHeadGPT2.from_pretrained(folder), hf)
    assert converted.is_file() and len(calls) == 1 and calls[0]["weights_only"] is True
    assert "lm_head.weight" not in load_file(converted)  # tied to wte: stored once

    def no_unpickling(*a, **k):
        raise AssertionError("second load unpickled the .bin again")

    monkeypatch.setattr(torch, "load", no_unpickling)
    assert_matches_hf(MultiHeadGPT2.from_pretrained(folder), hf)


def legacy_state_dict(hf, prefix: bool, lm_head: bool) -> dict:
    """As transformers < 4.31 saved GPT-2: `attn.bias` (tril causal mask, uint8 until 2022, then bool)
    and `attn.masked_bias` (-1e4) were persistent buffers, so they sit in every old checkpoint."""
    n_pos = TINY["n_positions"]
    sd = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            continue
        sd[k if prefix else k.removeprefix("transformer.")] = v.clone()
        if k.endswith("ln_1.bias"):
            layer = k.removeprefix("transformer.").rsplit(".", 2)[0]  # h.{i}
            p = "transformer." if prefix else ""
            sd[f"{p}{layer}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.uint8)).view(1, 1, n_pos, n_pos)
            sd[f"{p}{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    if lm_head:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied: one storage in the pickle
    return sd


# rinna/japanese-gpt2-small's pytorch_model.bin (uploaded 2021, transformers 4.x) was saved from a
# GPT2LMHeadModel, whose state_dict then held `transformer.`-prefixed keys, the persistent buffers
# `transformer.h.{i}.attn.bias` / `.attn.masked_bias`, and `lm_head.weight` sharing wte's storage
# (no `_keys_to_ignore_on_save` for GPT-2): the "hf4x" case. Checkpoints saved from a bare GPT2Model,
# as the 2019 OpenAI gpt2 ones are, have no prefix, no lm_head and the old pickle format: "gpt2model-2019".
@pytest.mark.parametrize("prefix, lm_head, zipped", [
    (True, True, True), (False, False, True), (False, False, False),
], ids=["hf4x", "gpt2model", "gpt2model-2019"])
def test_legacy_bin_loads(hf_checkpoint, tmp_path, prefix, lm_head, zipped):
    hf, folder = hf_checkpoint(TINY)
    (tmp_path / "old").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "old")
    sd = legacy_state_dict(hf, prefix, lm_head)
    torch.save(sd, tmp_path / "old" / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    assert_matches_hf(MultiHeadGPT2.from_pretrained(tmp_path / "old"), hf)


@pytest.mark.parametrize("layout, stored", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_weights(hf_checkpoint, layout, stored):
    hf, folder = hf_checkpoint(TINY, layout)
    kept = MultiHeadGPT2.from_pretrained(folder, heads=["a", "b"])
    assert kept.dtype == stored and all(p.dtype == stored for p in kept.parameters())
    assert_matches_hf(kept, hf, dtype=stored)
    fp32 = MultiHeadGPT2.from_pretrained(folder, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert_matches_hf(fp32, hf, dtype=torch.float32)  # exact: half -> fp32 is lossless


def test_device_and_dtype_arguments(hf_checkpoint):
    hf, folder = hf_checkpoint(TINY)
    for device in ("cpu", torch.device("cpu")):
        ours = MultiHeadGPT2.from_pretrained(folder, device=device, dtype=torch.float64)
        assert ours.device == torch.device("cpu") and ours.dtype == torch.float64
        assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in ours.parameters())
        ids = torch.randint(0, V, (2, 5))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids)[0].float(), hf_logits(hf, ids), atol=PARITY_ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"dtype=torch.int32 is not a floating-point torch dtype"):
        MultiHeadGPT2.from_pretrained(folder, dtype=torch.int32)  # the argument is named, not the checkpoint


def test_no_heads_gives_one_lm_head(hf_checkpoint):
    hf, folder = hf_checkpoint(TINY)
    ours = MultiHeadGPT2.from_pretrained(folder)
    assert ours.head_names == ("lm",) and ours.heads.shape == (1, C, V)
    assert_matches_hf(ours, hf)


# ---- our own checkpoints --------------------------------------------------------------------------
def trained(hf_checkpoint) -> MultiHeadGPT2:
    """A 2-head model whose head "b" (and trunk) took a few SGD steps, so heads differ from wte.T."""
    hf, folder = hf_checkpoint(TINY)
    model = MultiHeadGPT2.from_pretrained(folder, heads=["a", "b"]).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, V, (4, 10))
    for _ in range(3):
        logits = model(ids)[model.head_index("b")[0]]  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert not torch.equal(model.heads[1], model.heads[0])
    assert_matches_hf(MultiHeadGPT2.from_pretrained(folder), hf)  # training never writes through to the file
    return model


def test_own_checkpoint_round_trip(hf_checkpoint, tmp_path):
    model = trained(hf_checkpoint)
    model.save_pretrained(tmp_path / "mine")
    assert {p.name for p in (tmp_path / "mine").iterdir()} == {"config.json", "model.safetensors", "gpt2mh.json"}
    back = MultiHeadGPT2.from_pretrained(tmp_path / "mine")
    assert back.head_names == ("a", "b") and back.config == model.config
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_new_heads_on_own_checkpoint(hf_checkpoint, tmp_path):
    model = trained(hf_checkpoint)
    model.save_pretrained(tmp_path / "mine")
    back = MultiHeadGPT2.from_pretrained(tmp_path / "mine", heads=["b", "new"])
    assert back.head_names == ("b", "new")
    assert torch.equal(back.heads[0], model.heads[1])  # kept, by name
    assert torch.equal(back.heads[1], model.transformer.wte.weight.t())  # new: untied copy of wte.T
    assert torch.equal(back.transformer.wte.weight, model.transformer.wte.weight)


# ---- broken checkpoints ---------------------------------------------------------------------------
def rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    sd = load_file(path)
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        MultiHeadGPT2.from_pretrained(tmp_path / "nope")


def test_folder_without_weights(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint(TINY)
    (tmp_path / "ckpt").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match=r"ckpt.*no weights.*model\.safetensors"):
        MultiHeadGPT2.from_pretrained(tmp_path / "ckpt")


def test_folder_without_config(hf_checkpoint, tmp_path):
    folder = copy_ckpt(hf_checkpoint(TINY)[1], tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        MultiHeadGPT2.from_pretrained(folder)


def test_truncated_safetensors(hf_checkpoint, tmp_path):
    folder = copy_ckpt(hf_checkpoint(TINY)[1], tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MultiHeadGPT2.from_pretrained(folder)


def test_safetensors_header_lying_about_offsets(hf_checkpoint, tmp_path):
    folder = copy_ckpt(hf_checkpoint(TINY)[1], tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 10**6, end + 10**6]  # points past the end of the file
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MultiHeadGPT2.from_pretrained(folder)


def test_config_not_matching_weights(hf_checkpoint, tmp_path):
    folder = copy_ckpt(hf_checkpoint(TINY)[1], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_embd"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: shape mismatches \(does config\.json match"
                       r".*transformer\.h\.0\.attn\.c_attn\.weight: file \(32, 96\) vs config \(48, 144\)"):
        MultiHeadGPT2.from_pretrained(folder)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"), r"missing keys \['transformer\.h\.1\.mlp\.c_fc\.bias'\]"),
    (lambda sd: sd.update({"transformer.h.0.attn.rotary.weight": torch.ones(3)}),
     r"unexpected keys \['transformer\.h\.0\.attn\.rotary\.weight'\]"),
    (lambda sd: sd["transformer.wpe.weight"].__setitem__((3, 3), float("nan")), r"NaN.*transformer\.wpe\.weight"),
], ids=["missing", "unexpected", "nan"])
def test_bad_keys_named(hf_checkpoint, tmp_path, edit, match):
    folder = copy_ckpt(hf_checkpoint(TINY)[1], tmp_path)
    rewrite_weights(folder, edit)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*" + match):
        MultiHeadGPT2.from_pretrained(folder)


class Payload:
    """Unpickling this calls open(path, "w"): a file appears if the loader runs pickled code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bin_that_would_run_code_is_refused(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint(TINY)
    (tmp_path / "evil").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "evil")
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": torch.zeros(V, C), "x": Payload(marker)},
               tmp_path / "evil" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*weights_only=True"):
        MultiHeadGPT2.from_pretrained(tmp_path / "evil")
    assert not marker.exists()
    # the payload is real: a full unpickle does create the file
    torch.load(tmp_path / "evil" / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("shard", ["../model-00001-of-00007.safetensors", "/etc/passwd", "a/../../x.safetensors"])
def test_index_naming_a_file_outside_is_refused(hf_checkpoint, tmp_path, shard):
    folder = copy_ckpt(hf_checkpoint(TINY, "sharded")[1], tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["transformer.wte.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json.*refusing file name"):
        MultiHeadGPT2.from_pretrained(folder)


def test_index_shard_symlinked_outside_is_refused(hf_checkpoint, tmp_path):
    folder = copy_ckpt(hf_checkpoint(TINY, "sharded")[1], tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="symlink"):
        MultiHeadGPT2.from_pretrained(folder)
