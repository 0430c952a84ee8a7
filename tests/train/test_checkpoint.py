"""Checkpoints: atomic folders, pruning, exact resume, and a clean stop on SIGINT/SIGTERM."""
from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch
from helpers import HEADS, tiny_config

from gpt2mh import MultiHeadGPT2
from gpt2mh.train import checkpoint as ckpt
from gpt2mh.train import loop as train_mod
from gpt2mh.train.loop import train
from gpt2mh.weights.hub import latest_checkpoint, list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


def interrupt_after(monkeypatch, step: int, sig=signal.SIGINT):
    """Deliver `sig` to this process right after optimizer step `step`, as a user's Ctrl-C would."""
    original = train_mod.train_step

    def step_then_signal(run):
        out = original(run)
        if run.progress.step == step:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, caplog):
    # dropout > 0: equal losses prove the RNG states are restored, not just the weights
    model = dict(n_embd=16, n_layer=1, n_head=2, n_positions=96, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    settings = dict(model_config=model, max_steps=6, batch_size=4, warmup_steps=2, weight_decay=0.1,
                    lr_schedule="cosine", save_every=0)
    whole = train(tiny_config(tmp_path, output_dir=str(tmp_path / "whole"), **settings))

    interrupt_after(monkeypatch, 3)
    with caplog.at_level(logging.WARNING, logger="gpt2mh.train"):
        first = train(tiny_config(tmp_path, output_dir=str(tmp_path / "split"), **settings))
    assert first.interrupted and first.steps == 3
    assert first.last_checkpoint.endswith("checkpoint-3")
    assert "--resume" in caplog.text and "SIGINT" in caplog.text
    monkeypatch.undo()

    rest = train(tiny_config(tmp_path, output_dir=str(tmp_path / "split"), resume=True, **settings))
    assert rest.steps == 6 and not rest.interrupted
    assert first.losses == pytest.approx(whole.losses[:3], abs=1e-6)
    assert rest.losses == pytest.approx(whole.losses[3:], abs=1e-6)
    a = MultiHeadGPT2.from_pretrained(whole.last_checkpoint)
    b = MultiHeadGPT2.from_pretrained(rest.last_checkpoint)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], atol=1e-6, rtol=0, msg=k)
    # metrics.jsonl holds each step once, in order
    steps = [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path, monkeypatch):
    interrupt_after(monkeypatch, 2, signal.SIGTERM)
    result = train(tiny_config(tmp_path, max_steps=50))
    assert result.interrupted and result.steps == 2
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-2"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_checkpoint_folder_contents(tmp_path):
    result = train(tiny_config(tmp_path, max_steps=2, save_every=1))
    folder = latest_checkpoint(tmp_path / "run")
    assert folder.name == "checkpoint-2" and str(folder) == result.last_checkpoint
    names = {p.name for p in folder.iterdir()}
    assert names == {"config.json", "model.safetensors", "gpt2mh.json", "spiece.model",
                     ckpt.STATE_PT, ckpt.STATE_JSON, ckpt.CONFIG_JSON}
    model = MultiHeadGPT2.from_pretrained(folder)  # a checkpoint is a model folder, heads included
    assert model.head_names == tuple(HEADS)
    state, tensors = ckpt.load_training_state(folder)  # torch.load(weights_only=True) inside
    assert state["step"] == 2 and state["examples_seen"] == 8 and state["world_size"] == 1
    assert set(tensors) == {"optimizer", "scheduler", "torch_rng", "cuda_rng"}
    assert json.loads((folder / ckpt.CONFIG_JSON).read_text())["max_steps"] == 2


def test_latest_checkpoint_ignores_incomplete_folders(tmp_path):
    train(tiny_config(tmp_path, max_steps=1))
    run = tmp_path / "run"
    (run / ".checkpoint-9.ab12.tmp").mkdir()  # a save killed before its rename
    (run / ".checkpoint-9.ab12.tmp" / "model.safetensors").write_bytes(b"torn")
    (run / "checkpoint-8").mkdir()  # a folder without its training state
    assert latest_checkpoint(run).name == "checkpoint-1"
    ckpt.remove_stale_temp(run)
    assert not (run / ".checkpoint-9.ab12.tmp").exists()


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    train(tiny_config(tmp_path, max_steps=1))
    run = tmp_path / "run"

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_config(tmp_path, max_steps=2, resume=True))
    assert [p.name for _, p in list_checkpoints(run)] == ["checkpoint-1"]
    assert not list(run.glob(".*tmp"))  # the half-written folder is gone
    MultiHeadGPT2.from_pretrained(run / "checkpoint-1")


def test_keep_last_prunes_but_keeps_the_best(tmp_path):
    from helpers import write_data

    val = write_data(tmp_path, n=4, name="val.jsonl")
    # greater_is_better on a falling loss makes step 1 the best: it must survive keep_last=2
    result = train(tiny_config(tmp_path, validation_file=val, max_steps=5, eval_every=1, eval_samples=0,
                               save_every=1, keep_last=2, greater_is_better=True))
    kept = [step for step, _ in list_checkpoints(tmp_path / "run")]
    assert kept == [1, 4, 5]
    assert result.best_checkpoint.endswith("checkpoint-1")


def test_output_dir_with_checkpoints_needs_resume(tmp_path):
    train(tiny_config(tmp_path, max_steps=1))
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(tmp_path, max_steps=2))
