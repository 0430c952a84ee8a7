"""`gpt2mh generate --file IN --output OUT.jsonl`: rows written as they finish, bad rows as errors,
`kill -9` then `--resume` gives what an uninterrupted run gives, and torchrun ranks merge to the same file."""
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
from gpt2mh.cli.datajob import finished_lines, read_lines

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("datajob")
    torch.manual_seed(0)
    model = MultiHeadGPT2(GPT2Config(vocab_size=32000, n_positions=96, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=3), ["tense", "entities", "pos"])
    model.save_pretrained(root / "model")
    lines = [f"今日は{'東京大阪名古屋'[i % 5:]}で{i}人に会った。" for i in range(400)]
    lines[3] = ""
    lines[10] = "長" * 200  # longer than the context
    data = "\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n" + "最後の行\r\n".encode()
    (root / "in.txt").write_bytes(data)
    return root


def gpt2mh(root: Path, *args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "gpt2mh", "generate", "--model", str(root / "model"),
                           "--file", str(root / "in.txt"), "--max-new-tokens", "8", *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600, **kw)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_read_lines_numbers_and_errors():
    import io

    got = list(read_lines(io.BytesIO(b"\xef\xbb\xbfa\r\n\n  \nb\xff\nc\u2028d".replace(b"\\u2028", "\u2028".encode()))))
    assert got[0] == (1, "a", None) and got[1] == (2, None, "empty line") and got[2] == (3, None, "empty line")
    assert got[3][0] == 4 and got[3][1] is None and "not UTF-8" in got[3][2]
    assert got[4] == (5, "c\u2028d", None)  # only \n ends a line


@pytest.mark.slow  # processes
def test_kill_9_then_resume_equals_an_uninterrupted_run(job):
    ref = gpt2mh(job, "--output", "ref.jsonl", "--slots", "5")
    assert ref.returncode == 3, ref.stderr  # 3: finished, some rows are errors
    out = rows(job / "ref.jsonl")
    assert [r["line"] for r in out] == list(range(1, 403))  # input order, every line once
    errors = {r["line"]: r["error"] for r in out if "error" in r}
    assert set(errors) == {4, 11, 401} and "empty" in errors[4] and "context" in errors[11] and "UTF-8" in errors[401]
    assert out[-1]["input"] == "最後の行" and set(out[0]) == {"line", "input", "tense", "entities", "pos"}
    assert "402 rows, 3 with an error" in ref.stderr

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-m", "gpt2mh", "generate", "--model", str(job / "model"),
                              "--file", str(job / "in.txt"), "--max-new-tokens", "8", "--slots", "24",
                              "--output", "run.jsonl"], cwd=job, env=env, stderr=subprocess.DEVNULL)
    part = job / "run.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not part.exists() or part.stat().st_size < 4000):
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    kept = finished_lines(part)
    assert 0 < len(kept) < 402  # killed mid-run, finished rows kept
    again = gpt2mh(job, "--output", "run.jsonl", "--slots", "24")
    assert again.returncode == 2 and "--resume" in again.stderr  # an existing OUT is never overwritten silently
    resumed = gpt2mh(job, "--output", "run.jsonl", "--slots", "24", "--resume")
    assert resumed.returncode == 3, resumed.stderr
    assert (job / "run.jsonl").read_bytes() == (job / "ref.jsonl").read_bytes()


@pytest.mark.slow  # torchrun: two processes
def test_two_ranks_merge_to_the_single_process_output(job):
    if not (job / "ref.jsonl").exists():
        assert gpt2mh(job, "--output", "ref.jsonl", "--slots", "5").returncode == 3
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "gpt2mh", "generate", "--model", str(job / "model"), "--file", str(job / "in.txt"),
                           "--max-new-tokens", "8", "--slots", "9", "--output", "ddp.jsonl"],
                          cwd=job, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "402 rows, 3 with an error" in proc.stderr, proc.stderr[-3000:]
    assert (job / "ddp.jsonl").read_bytes() == (job / "ref.jsonl").read_bytes()
    assert not list(job.glob("ddp.jsonl.rank*"))  # the parts are merged and removed


@pytest.mark.slow  # processes
def test_jsonl_rows_name_their_heads_and_share_the_slots(job):
    texts = [f"{n}人が東京に来た。" for n in range(12)]
    wants = [["tense"], ["entities", "pos"], None, ["pos"]] * 3
    lines = [json.dumps({"input": t, **({"heads": w} if w else {})}, ensure_ascii=False) for t, w in zip(texts, wants)]
    lines[5] = json.dumps({"input": texts[5], "heads": ["nope"]})
    lines[7] = "{not json"
    (job / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (job / "all.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "gpt2mh", "generate", "--model", str(job / "model"), "--max-new-tokens", "6",
            "--slots", "4"]
    mixed = subprocess.run([*base, "--file", "rows.jsonl", "--output", "rows-out.jsonl"], cwd=job, env=env,
                           capture_output=True, text=True, timeout=600)
    full = subprocess.run([*base, "--file", "all.txt", "--output", "all-out.jsonl"], cwd=job, env=env,
                          capture_output=True, text=True, timeout=600)
    assert mixed.returncode == 3 and full.returncode == 0, (mixed.stderr[-2000:], full.stderr[-2000:])
    got, ref = rows(job / "rows-out.jsonl"), rows(job / "all-out.jsonl")
    assert "not served here" in got[5]["error"] and "JSON" in got[7]["error"]
    for i, (row, want) in enumerate(zip(got, wants)):
        if i in (5, 7):
            continue
        heads = want or ["tense", "entities", "pos"]
        assert set(row) == {"line", "input", *heads}
        assert {h: row[h] for h in heads} == {h: ref[i][h] for h in heads}  # greedy: what the row gets with every head
