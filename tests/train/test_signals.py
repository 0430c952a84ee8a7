"""Nothing lost (issue 7): training runs in a real child process that is killed from outside.

- SIGKILL while a checkpoint is being written (the child parks itself at a chosen point inside
  `gpt2mh.train.checkpoint.save_checkpoint` and the test kills it there): the previous checkpoint loads, and
  `resume=True` continues from it to the end, with the losses of an uninterrupted run.
- SIGINT / SIGTERM during `gpt2mh train`: the step finishes, a checkpoint is written, the
  process exits with 130 and says on stderr how to resume (`--resume`), and resuming runs to the end.

The in-process version of exact resume (dropout on, weights compared) is
test_checkpoint.py::test_resume_reproduces_the_uninterrupted_run; here the interrupted part runs in
another process, so the comparison allows the same 1e-6 as there."""
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

from gpt2mh import MultiHeadGPT2
from gpt2mh.train import checkpoint as ckpt
from gpt2mh.train.config import TrainConfig
from gpt2mh.train.loop import train
from gpt2mh.weights.hub import latest_checkpoint

HEADS = ["kana", "upper"]
MODEL = dict(n_embd=8, n_layer=1, n_head=2, n_positions=48, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
STEPS = 5
# The child process: train(cfg), parked forever at `hook` while writing checkpoint-<at>.
CHILD = r"""
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import gpt2mh.train.checkpoint as ckpt
import gpt2mh.weights.folder as weights
from gpt2mh.train.config import TrainConfig
from gpt2mh.train.loop import train

cfg, hook, at, marker = json.loads(sys.argv[1])
marker = Path(marker)
tmp_prefix = f".{ckpt.PREFIX}{at}."

def park(where):
    marker.write_text(where)
    time.sleep(600)  # until SIGKILL

def wrap(module, name, should_park):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        if should_park(*args):
            park(f"{name}({args[0]})")
        return real(*args, **kwargs)
    setattr(module, name, wrapper)

if hook == "model":    # model.safetensors written into the temp folder, config.json not yet
    wrap(weights, "atomic_write_text", lambda path, *a: Path(path).name == "config.json"
         and Path(path).parent.name.startswith(tmp_prefix))
elif hook == "state":  # the model and training_state.pt written, trainer_state.json not yet
    wrap(ckpt, "atomic_write_text", lambda path, *a: Path(path).name == ckpt.STATE_JSON
         and Path(path).parent.name.startswith(tmp_prefix))
elif hook == "rename": # the temp folder complete, not yet renamed into place
    wrap(ckpt, "replace_dir", lambda src, *a: Path(src).name.startswith(tmp_prefix))
elif hook == "prune":  # checkpoint-<at> in place; an old one renamed aside, half deleted
    wrap(ckpt.shutil, "rmtree", lambda path, *a: ".del." in Path(path).name)
train(TrainConfig.from_dict(cfg))
print("finished without parking", file=sys.stderr)
sys.exit(3)
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def write_data(path: Path) -> str:
    rows = [{"input": f"{w}です", "kana": k, "upper": w.upper()} for w, k in
            [("cat", "キャット"), ("dog", "ドッグ"), ("sun", "サン"), ("tree", "ツリー"), ("milk", "ミルク"),
             ("book", "ブック"), ("rain", "レイン"), ("blue", "ブルー")]]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def settings(tmp_path: Path, run: str, **overrides) -> dict:
    d = dict(train_file=write_data(tmp_path / "train.jsonl"), heads=HEADS, output_dir=str(tmp_path / run),
             model_config=MODEL, max_length=48, batch_size=4, max_steps=STEPS, learning_rate=1e-2,
             lr_schedule="cosine", warmup_steps=1, save_every=1, keep_last=2, eval_every=0, log_every=1,
             progress=False, seed=0)
    d.update(overrides)
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's losses, step 1..STEPS."""
    tmp = tmp_path_factory.mktemp("reference")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(TrainConfig.from_dict(settings(tmp, "run"))).losses
    finally:
        torch.set_num_threads(n)


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"child exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.05)


# ---- SIGKILL in the middle of writing a checkpoint ------------------------------------------------------
KILL_POINTS = {
    # hook: (checkpoint being written when killed, newest complete checkpoint after the kill)
    "model": (3, 2),
    "state": (3, 2),
    "rename": (3, 2),
    "prune": (3, 3),  # keep_last=2: writing 3 prunes 1
}


@pytest.mark.slow  # spawns a process
@pytest.mark.parametrize("hook", list(KILL_POINTS))
def test_sigkill_while_writing_a_checkpoint_loses_nothing(tmp_path, reference, hook):
    at, survivor = KILL_POINTS[hook]
    cfg = settings(tmp_path, "run")
    marker = tmp_path / "parked"
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps([cfg, hook, at, str(marker)])],
                             env=env(), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker.exists, child)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert list(run.glob(".checkpoint-*.tmp")), "the kill did not land mid-write"  # its half-written leftovers

    # the newest complete checkpoint is the one before the torn write (or the new one, once in place)
    latest = latest_checkpoint(run)
    assert latest is not None and latest.name == f"checkpoint-{survivor}"
    model = MultiHeadGPT2.from_pretrained(latest)
    assert model.head_names == tuple(HEADS)

    result = train(TrainConfig.from_dict(dict(cfg, resume=True)))
    assert result.steps == STEPS and not result.interrupted
    assert result.losses == pytest.approx(reference[survivor:], abs=1e-6)
    assert not list(run.glob(".checkpoint-*.tmp"))  # leftovers cleaned up on resume
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl", encoding="utf-8")]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, the torn run's extra lines trimmed


# ---- SIGINT / SIGTERM: a checkpoint, a clean exit, and how to resume ---------------------------------------
ENTRY_POINTS = {
    # Ctrl-C (without a progress bar) and a scheduler's SIGTERM on `gpt2mh train --config run.json`
    "SIGINT-cli": (signal.SIGINT, ["-m", "gpt2mh", "train", "--config", "{config}", "--set", "progress=false"]),
    "SIGTERM-cli": (signal.SIGTERM, ["-m", "gpt2mh", "train", "--config", "{config}"]),
}


@pytest.mark.slow  # spawns a process
@pytest.mark.parametrize("case", list(ENTRY_POINTS))
def test_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, case):
    sig, args = ENTRY_POINTS[case]
    config = tmp_path / "run.json"
    config.write_text(json.dumps(settings(tmp_path, "run", max_steps=100_000, save_every=0, lr_schedule="constant")))
    cmd = [sys.executable, *(a.format(config=config) for a in args)]
    child = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, child)
        child.send_signal(sig)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    # `gpt2mh train` exits 130 when a signal stopped the run
    assert child.returncode == 130 and "Traceback" not in stderr, stderr
    stopped = [line for line in stderr.splitlines() if f"stopped by {sig.name}" in line]
    assert len(stopped) == 1 and "--resume" in stopped[0], stderr
    latest = latest_checkpoint(tmp_path / "run")
    step = int(latest.name.removeprefix(ckpt.PREFIX))
    assert step >= 2 and str(latest) in stopped[0]
    assert MultiHeadGPT2.from_pretrained(latest).head_names == tuple(HEADS)
    plain = tmp_path / "plain"
    plain.write_text("")  # the mode this umask gives: checkpoint files are no more private than that
    assert {f.name: f.stat().st_mode & 0o777 for f in latest.iterdir()} == \
        {f.name: plain.stat().st_mode & 0o777 for f in latest.iterdir()}
    if case == "SIGINT-module":
        assert child.returncode == 130
        # resume as the message says, to a nearby end (the same after either signal: once is enough)
        resumed = subprocess.run([*cmd, "--resume", "--set", f"max_steps={step + 2}"], env=env(),
                                 capture_output=True, text=True, timeout=240)
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming from {latest}" in resumed.stderr
        assert latest_checkpoint(tmp_path / "run").name == f"checkpoint-{step + 2}"


def test_cli_train_stopped_by_a_signal_exits_130(monkeypatch):
    import gpt2mh.train.loop
    from gpt2mh import cli
    from gpt2mh.train.loop import TrainResult

    stopped = TrainResult(steps=2, metrics={}, losses=[1.0, 0.9], best_checkpoint=None, best_metric=None,
                          last_checkpoint="run/checkpoint-2", output_dir="run", interrupted=True)
    monkeypatch.setattr(gpt2mh.train.loop, "train", lambda cfg: stopped)
    try:
        code = cli.main(["train", "--train-file", "t.jsonl", "--set", "model_config={}"])
    except SystemExit as e:  # either way of exiting 130 will do
        code = e.code
    assert code == 130
