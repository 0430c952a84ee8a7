"""The quickstart end to end (issue 5), as a user runs it: `gpt2mh quickstart` in a fresh process, offline,
with a reduced step count; and `--base` fine-tuning a checkpoint found in the HF cache.

The main run is shared with tests/test_readme.py (which needs the README's `gpt2mh quickstart` to have
produced runs/quickstart before the README's other commands run): `quickstart_run` (tests/helpers.py)
runs it once per session."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import (
    OUTPUT,
    SHOW,
    STEPS,
    offline_env,
    ok,
    quickstart_run,
    rinna_cache,
    run_cli,
)

from gpt2mh.demo.corpus import (
    HEADS,  # the quickstart's heads (helpers.HEADS: the corpus columns other tests train)
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def section(lines: list[str], start: str, end: str | None = None) -> list[str]:
    i = next(k for k, line in enumerate(lines) if line.startswith(start))
    j = next((k for k in range(i + 1, len(lines)) if end and lines[k].startswith(end)), len(lines))
    return lines[i + 1: j]


def check_tables(lines: list[str], n_test: int) -> None:
    scores = section(lines, f"per-head held-out scores on all {n_test} test sentences", "each head's outputs")
    assert scores[0].split() == ["head", "loss", "char", "acc", "exact", "trivial:", "char", "acc", "exact",
                                 "error", "cut", "trivial", "answer"]
    for h, row in zip(HEADS, scores[1:4]):  # the model's scores, then its trivial answer's on the same sentences
        assert re.fullmatch(rf"  {h}\s+-?\d+\.\d{{3}}(\s+\d\.\d{{3}}){{4}}\s+-?\d+%  \S.*", row), row
    # the model-free references (pure Python on fixed data: exact figures, as in test_baselines)
    refs = section(lines, "  references that need no model", "")
    assert [r.split()[:3] for r in refs[:2]] == [["entities", "0.492", "0.320"], ["pos", "0.800", "0.140"]]
    cross = section(lines, "each head's outputs scored against every task's references", "checkpoint:")
    assert cross[0].split() == list(HEADS)
    for h, row in zip(HEADS, cross[1:4]):
        assert re.fullmatch(rf"  {h}(\s+\d\.\d{{3}}){{3}}", row), row


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path_factory):
    cwd, proc = quickstart_run(tmp_path_factory.getbasetemp())
    lines = ok(proc).splitlines()
    out = cwd / OUTPUT
    test = read_jsonl(out / "data" / "test.jsonl")
    assert len(read_jsonl(out / "data" / "train.jsonl")) == 450 and len(test) == 50
    assert lines[0].startswith("dataset: ") and lines[0].endswith(f"heads {', '.join(HEADS)}")

    # the held-out inputs, every head's output beside its reference
    shown = [line for line in section(lines, f"held-out sentences ({SHOW} of 50)", "per-head held-out scores") if line]
    assert len(shown) == SHOW * (1 + 2 * len(HEADS))
    for i, ex in enumerate(test[:SHOW]):
        block = shown[i * 7: i * 7 + 7]
        assert block[0] == f"  input     {ex['input']}"
        for k, h in enumerate(HEADS):
            assert block[1 + 2 * k].startswith(f"  {h:<9} ")
            assert block[2 + 2 * k] == f"  (ref)     {ex[h]}"
    check_tables(lines, 50)

    checkpoint = out / f"checkpoint-{STEPS}"
    assert f"checkpoint: {OUTPUT}/checkpoint-{STEPS}" in lines
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "spiece.model").is_file()
    assert lines[-1] == f"try: gpt2mh generate --model {OUTPUT} 今日は東京で会議がありました。"


@pytest.mark.slow
def test_quickstart_base_from_the_hf_cache(tmp_path, hf_checkpoint, rinna_spiece):
    # The README's `gpt2mh quickstart --base rinna/japanese-gpt2-small`, with a tiny random checkpoint in
    # rinna's layout (config.json, model.safetensors, spiece.model) as the cached snapshot.
    from gpt2mh import MultiHeadGPT2

    snapshot = rinna_cache(tmp_path, hf_checkpoint, rinna_spiece)
    proc = run_cli(["quickstart", "--base", "rinna/japanese-gpt2-small", "--steps", 2, "--show", 1,
                    "--output-dir", "runs/base"], cwd=tmp_path, env=offline_env(tmp_path), timeout=600)
    lines = ok(proc).splitlines()
    assert "held-out sentences (1 of 50), every head's greedy output:" in lines
    check_tables(lines, 50)
    tuned = MultiHeadGPT2.from_pretrained(tmp_path / "runs" / "base" / "checkpoint-2")
    base = MultiHeadGPT2.from_pretrained(snapshot)
    assert tuned.head_names == HEADS and tuned.config.n_embd == base.config.n_embd == 32
    # fine-tuned from the base (2 steps at lr 5e-5), not a fresh model
    torch.testing.assert_close(tuned.transformer.wpe.weight, base.transformer.wpe.weight, atol=1e-2, rtol=0)


@pytest.mark.slow
def test_quickstart_ctrl_c_resume_and_rerun(tmp_path):
    # Ctrl-C: exit 130, a checkpoint, no evaluation of the half-trained model, and the command that
    # continues it; that command, as printed, finishes the run; a plain second run starts over.
    import shlex
    import signal
    import subprocess

    from helpers import console_script

    env = offline_env(tmp_path)
    args = ["quickstart", "--steps", "12", "--show", "0", "--output-dir", "runs/int"]
    proc = subprocess.Popen([console_script(), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8")
    err = []
    for line in proc.stderr:  # progress lines arrive without a terminal
        err.append(line)
        if line.startswith("step 1/12 "):
            proc.send_signal(signal.SIGINT)
            break
    out, rest = proc.communicate(timeout=600)
    stderr = "".join(err) + rest
    assert proc.returncode == 130, stderr
    assert "per-head held-out scores" not in out and "evaluation:" not in stderr
    hint = re.search(r"Continue with: (gpt2mh quickstart .*)$", stderr, re.M)
    assert hint and hint.group(1) == "gpt2mh quickstart --resume --output-dir runs/int --steps 12", stderr
    step = int(re.search(r"stopped at step (\d+) of 12", stderr).group(1))
    assert 1 <= step < 12 and (tmp_path / "runs" / "int" / f"checkpoint-{step}").is_dir()

    again = run_cli(shlex.split(hint.group(1))[1:], cwd=tmp_path, env=env, script=True, timeout=600)
    lines = ok(again).splitlines()
    assert f"resumed from step {step} " in again.stderr and "continuing runs/int/checkpoint-" in again.stderr
    assert re.search(r"^evaluation: generating examples 1-\d+ of 50$", again.stderr, re.M)  # progress while scoring
    # the printed command carries the run's settings (steps, output dir), not --show: the default 5 shown
    assert "held-out sentences (5 of 50), every head's greedy output:" in lines
    check_tables(lines, 50)
    assert "the same scores: gpt2mh eval --model runs/int runs/int/data/test.jsonl" in lines

    fresh = run_cli(args, cwd=tmp_path, env=env, script=True, timeout=600)
    assert not any(line.startswith("held-out sentences") for line in ok(fresh).splitlines())  # --show 0
    assert "runs/int holds a previous quickstart run (checkpoint-12): starting over" in fresh.stderr
    assert "resumed from step" not in fresh.stderr
    assert [p.name for p in (tmp_path / "runs" / "int").glob("checkpoint-*")] == ["checkpoint-12"]

    # one set of held-out numbers: the printed `gpt2mh eval` command gives the table's figures
    cmd = next(line for line in fresh.stdout.splitlines() if line.startswith("the same scores: "))
    ev = run_cli(shlex.split(cmd.removeprefix("the same scores: "))[1:], cwd=tmp_path, env=env, timeout=600)
    metrics = json.loads(ok(ev))
    assert metrics["samples"] == 50
    rows = section(fresh.stdout.splitlines(), "per-head held-out scores on all 50", "each head's outputs")[1:4]
    for h, row in zip(HEADS, rows):
        _, loss, acc, exact = row.split()[:4]
        assert (f"{metrics[f'{h}/loss']:.3f}", f"{metrics[f'{h}/char_accuracy']:.3f}",
                f"{metrics[f'{h}/exact_match']:.3f}") == (loss, acc, exact)
