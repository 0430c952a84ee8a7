"""Data-parallel training through torchrun (gloo, 2 CPU processes, localhost only)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import records, tiny_config

from gpt2mh import MultiHeadGPT2
from gpt2mh.train import checkpoint as ckpt
from gpt2mh.train.loop import train
from gpt2mh.weights.hub import list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(config_path, *args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gpt2mh", "train", "--config", str(config_path), "--set", "progress=false", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow  # spawns a process
def test_two_processes_match_one(tmp_path):
    # 8 examples a step = 2 micro-steps x 2 processes x 2 rows: same losses and weights as one process
    settings = dict(batch_size=8, gradient_accumulation_steps=2, max_steps=3, warmup_steps=1, weight_decay=0.1)
    single = train(tiny_config(tmp_path, output_dir=str(tmp_path / "single"), **settings))
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / "ddp"), **settings)
    (tmp_path / "ddp.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    torchrun(tmp_path / "ddp.json")

    logged = records(tmp_path / "ddp")
    assert [r["step"] for r in logged] == [1, 2, 3]  # rank 0 alone writes the log
    assert [r["loss"] for r in logged] == pytest.approx(single.losses, abs=1e-5)
    for h in ("reading", "entities", "pos"):
        assert [r[f"{h}/loss"] for r in logged] == pytest.approx([r[f"{h}/loss"] for r in records(tmp_path / "single")],
                                                                  abs=1e-5)
    found = list_checkpoints(tmp_path / "ddp")
    assert [s for s, _ in found] == [3]
    state, tensors = ckpt.load_training_state(found[0][1])
    assert state["world_size"] == 2 and len(tensors["torch_rng"]) == 2  # both ranks' RNG, for resume
    a = MultiHeadGPT2.from_pretrained(single.last_checkpoint)
    b = MultiHeadGPT2.from_pretrained(found[0][1])
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], atol=1e-5, rtol=1e-4, msg=k)
