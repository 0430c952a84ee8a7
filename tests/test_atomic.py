"""Every writer goes through gpt2mh/atomic.py (issue 11): a SIGKILL while it writes leaves the previous
file intact, and an output that is the input is refused before anything is touched.

The child process parks inside the writer once the new content is in the temp file but before the
rename (it wraps `gpt2mh.atomic.fsync_path`, called on the temp file), and the test kills it there."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.atomic import atomic_write_text
from gpt2mh.train.data import Example, write_jsonl
from gpt2mh.weights.hf import convert_bin

TINY = dict(vocab_size=32000, n_positions=16, n_embd=8, n_layer=1, n_head=2)

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
import gpt2mh.atomic as atomic

writer, folder, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
real = atomic.fsync_path
def park(path):
    if Path(path).name.startswith(".") and (str(path).endswith(".tmp") or ".export" in str(path)):
        marker.write_text(str(path))
        time.sleep(600)  # until SIGKILL
    return real(path)
atomic.fsync_path = park

from gpt2mh import GPT2Config, MultiHeadGPT2
torch.manual_seed(1)
model = MultiHeadGPT2(GPT2Config(**json.loads(sys.argv[4])), ["x", "y"])  # new weights, new heads
if writer == "save_model":
    model.save_pretrained(folder / "ckpt")
elif writer == "convert_bin":
    from gpt2mh.weights.hf import convert_bin
    convert_bin(folder / "pytorch_model.bin", folder / "model.safetensors", overwrite=True)
elif writer == "write_jsonl":
    from gpt2mh.train.data import Example, write_jsonl
    write_jsonl(folder / "data.jsonl", [Example("new", {"a": "b"}, "x:1")])
elif writer == "tokenizer":
    from gpt2mh.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained()
    tok._model_bytes = b"not the old bytes"
    tok.save(folder / "tok")
elif writer == "export":
    from gpt2mh.weights.export import export_hf
    export_hf(model, "y", folder / "export", tokenizer=False)
elif writer == "torch_save":
    atomic.atomic_torch_save({"new": torch.ones(3)}, folder / "state.pt")
print("finished without parking", file=sys.stderr)
sys.exit(3)
"""


def previous_files(folder: Path) -> dict[str, Path]:
    """Write every writer's previous output; returns writer -> the file that must survive."""
    torch.manual_seed(0)
    old = MultiHeadGPT2(GPT2Config(**TINY), ["a"])
    old.save_pretrained(folder / "ckpt")
    sd = {"transformer.wte.weight": torch.randn(4, 2)}
    torch.save(sd, folder / "pytorch_model.bin")
    convert_bin(folder / "pytorch_model.bin", folder / "model.safetensors")
    write_jsonl(folder / "data.jsonl", [Example("old", {"a": "c"}, "y:1")])
    (folder / "tok").mkdir()
    (folder / "tok" / "spiece.model").write_bytes(b"old tokenizer bytes")
    from gpt2mh.weights.export import export_hf

    export_hf(old, "a", folder / "export", tokenizer=False)
    torch.save({"old": torch.zeros(2)}, folder / "state.pt")
    return {"save_model": folder / "ckpt" / "model.safetensors", "convert_bin": folder / "model.safetensors",
            "write_jsonl": folder / "data.jsonl", "tokenizer": folder / "tok" / "spiece.model",
            "export": folder / "export" / "model.safetensors", "torch_save": folder / "state.pt"}


WRITERS = ["save_model", "convert_bin", "write_jsonl", "tokenizer", "export", "torch_save"]


@pytest.mark.slow  # spawns a process
@pytest.mark.parametrize("writer", WRITERS)
def test_sigkill_mid_write_leaves_the_previous_file_intact(tmp_path, writer):
    survivor = previous_files(tmp_path)[writer]
    before = survivor.read_bytes()
    marker = tmp_path / "parked"
    child = subprocess.Popen([sys.executable, "-c", CHILD, writer, str(tmp_path), str(marker), json.dumps(TINY)],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < end, "timed out"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    temp = Path(marker.read_text())
    assert temp.exists() and temp != survivor  # killed with the new content in a temp file, not yet renamed
    assert survivor.read_bytes() == before
    if writer == "save_model":
        assert MultiHeadGPT2.from_pretrained(survivor.parent).head_names == ("a",)


def test_convert_onto_its_own_input_is_refused_and_keeps_it(tmp_path):
    src = tmp_path / "pytorch_model.bin"
    torch.save({"transformer.wte.weight": torch.randn(4, 2)}, src)
    before = src.read_bytes()
    with pytest.raises(ValueError, match=r"convert output .*pytorch_model.bin is the input file"):
        convert_bin(src, src, overwrite=True)
    assert src.read_bytes() == before


def test_cli_convert_onto_its_own_input_is_refused_and_keeps_it(tmp_path, capsys):
    from gpt2mh import cli

    src = tmp_path / "pytorch_model.bin"
    torch.save({"transformer.wte.weight": torch.randn(4, 2)}, src)
    before = src.read_bytes()
    code = cli.main(["convert", str(src), "--out", str(src), "--overwrite"])
    assert code == 2 and "is the input file" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_export_into_its_own_checkpoint_is_refused(tmp_path):
    from gpt2mh.weights.export import export_hf_from_checkpoint

    MultiHeadGPT2(GPT2Config(**TINY, bos_token_id=1, eos_token_id=2, pad_token_id=3), ["a"]).save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"is the input file"):
        export_hf_from_checkpoint(tmp_path / "ckpt", "a", tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before


def test_write_jsonl_onto_its_source_is_refused(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"input": "x", "a": "y"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"is the input file"):
        write_jsonl(src, [Example("x", {"a": "y"}, f"{src}:1")])


def test_atomic_write_keeps_the_umask_mode_and_leaves_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "f.txt", "hello")
    plain = tmp_path / "plain"
    plain.write_text("")
    assert path.read_text() == "hello"
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]
    with pytest.raises(IsADirectoryError, match="is a folder"):
        atomic_write_text(tmp_path / "sub", "x")
