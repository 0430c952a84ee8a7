"""The hub path without the network: local folders, and an offline HF cache filled by hand in the
layout huggingface_hub 0.36 reads (`snapshot_download` offline: `refs/<revision>` -> commit hash,
then `snapshots/<commit>/` must exist; it returns that folder without listing its files)."""
import os
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import TINY_RINNA_IDS, hf_logits, save_hf
from helpers import fill_cache

from gpt2mh import MultiHeadGPT2
from gpt2mh.weights.hf import converted_bin_path
from gpt2mh.weights.hub import DEFAULT_REPO, resolve_checkpoint

COMMIT_A = "a" * 8 + "0123456789abcdef0123456789abcdef"  # 40 hex digits, as the hub's
COMMIT_B = "b" * 8 + "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """A fresh, empty HF cache per test, and any socket connection fails the test loudly."""
    attempts = []

    def refuse(sock, address, *a, **k):
        attempts.append(address)
        raise OSError(f"test tried to reach the network: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    # huggingface_hub read HF_HUB_CACHE at import; snapshot_download(cache_dir=None) uses the constant.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    yield tmp_path / "hub"
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def rinna_like(hf_checkpoint):
    """Two tiny HF models with rinna's special ids and files: A (main) and B (another commit)."""
    return hf_checkpoint(TINY_RINNA_IDS), hf_checkpoint(dict(TINY_RINNA_IDS, n_layer=3))


def snapshot_files(folder: Path, spiece: Path) -> dict:
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    files["spiece.model"] = spiece
    return files


def assert_logits_match(ours, hf):
    ids = torch.randint(0, TINY_RINNA_IDS["vocab_size"], (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf_logits(hf, ids), atol=1e-4, rtol=0)


# ---- local folders --------------------------------------------------------------------------------
def test_local_folder_is_returned_as_is(hf_checkpoint):
    _, folder = hf_checkpoint(TINY_RINNA_IDS)
    assert resolve_checkpoint(folder) == folder
    assert resolve_checkpoint(str(folder)) == folder


@pytest.mark.parametrize("name", ["nope", "./nope", "nope/b/c", "nope/"])
def test_missing_local_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_checkpoint(name if name != "nope" else tmp_path / name)


def test_a_file_is_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        resolve_checkpoint(tmp_path / "model.safetensors")


# ---- an offline HF cache --------------------------------------------------------------------------
def test_cached_safetensors_snapshot_loads(no_network, rinna_like, rinna_spiece):
    (hf, folder), _ = rinna_like
    snap = fill_cache(no_network, COMMIT_A, snapshot_files(folder, rinna_spiece))
    assert resolve_checkpoint(DEFAULT_REPO) == snap
    assert (snap / "spiece.model").is_file()
    ours = MultiHeadGPT2.from_pretrained("rinna/japanese-gpt2-small", heads=["a", "b"])
    assert ours.config.bos_token_id == 1 and ours.config.eos_token_id == 2 and ours.config.pad_token_id == 3
    assert_logits_match(ours, hf)


def test_cached_bin_only_snapshot_converts(no_network, rinna_like, rinna_spiece, tmp_path):
    # The real rinna repo ships pytorch_model.bin, no safetensors.
    (hf, _), _ = rinna_like
    folder = save_hf(hf, tmp_path / "bin", "bin")
    snap = fill_cache(no_network, COMMIT_A, snapshot_files(folder, rinna_spiece))
    assert not list(snap.glob("*.safetensors"))
    ours = MultiHeadGPT2.from_pretrained(DEFAULT_REPO)
    assert_logits_match(ours, hf)
    converted = converted_bin_path(snap / "pytorch_model.bin")
    assert converted.is_file() and Path(os.environ["GPT2MH_CACHE"]) in converted.parents
    assert not list(snap.glob("*.safetensors"))  # the HF cache itself is left untouched


def test_cached_sharded_snapshot_with_blob_symlinks(no_network, rinna_like, rinna_spiece, tmp_path):
    # Shards listed in the index are snapshot symlinks into ../../blobs: inside the HF cache, allowed.
    (hf, _), _ = rinna_like
    folder = save_hf(hf, tmp_path / "sharded", "sharded")
    fill_cache(no_network, COMMIT_A, snapshot_files(folder, rinna_spiece))
    assert_logits_match(MultiHeadGPT2.from_pretrained(DEFAULT_REPO), hf)


def test_pinned_revision_picks_its_snapshot(no_network, rinna_like, rinna_spiece):
    (hf_a, folder_a), (hf_b, folder_b) = rinna_like
    fill_cache(no_network, COMMIT_A, snapshot_files(folder_a, rinna_spiece))  # refs/main -> A
    snap_b = fill_cache(no_network, COMMIT_B, snapshot_files(folder_b, rinna_spiece), ref=None)
    assert resolve_checkpoint(DEFAULT_REPO, revision=COMMIT_B) == snap_b
    b = MultiHeadGPT2.from_pretrained(DEFAULT_REPO, revision=COMMIT_B)
    assert b.config.n_layer == 3
    assert_logits_match(b, hf_b)
    a = MultiHeadGPT2.from_pretrained(DEFAULT_REPO)
    assert a.config.n_layer == 2
    assert_logits_match(a, hf_a)


@pytest.mark.parametrize("revision", [None, COMMIT_B, "v1.0"])
def test_offline_with_nothing_cached_says_how_to_download(no_network, revision):
    with pytest.raises(FileNotFoundError, match=r"gpt2mh download rinna/japanese-gpt2-small") as e:
        MultiHeadGPT2.from_pretrained(DEFAULT_REPO, revision=revision)
    if revision:
        assert revision in str(e.value)


def test_offline_with_other_revision_cached(no_network, rinna_like, rinna_spiece):
    (_, folder), _ = rinna_like
    fill_cache(no_network, COMMIT_A, snapshot_files(folder, rinna_spiece))
    with pytest.raises(FileNotFoundError, match="gpt2mh download"):
        resolve_checkpoint(DEFAULT_REPO, revision=COMMIT_B)
