"""The CLI does what its help says (issue 10, point 7): each item run as `python -m gpt2mh ...` in a
fresh process, offline, on tiny models. Processes that do not depend on each other run together (a
pool of 3, as in test_cli.py); a training run and the commands that read it run after it."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import (
    HEADS,
    INPUTS,
    ROOT,
    ROWS,
    make_model,
    offline_env,
    ok,
    one_line_error,
    run_cli,
    write_jsonl,
)

# ROWS with other column names: the run maps them (input_column, columns) and eval must follow it.
COLUMNS = {"reading": "yomi", "entities": "ne", "pos": "hinshi"}
CUSTOM = [{"text": r["input"], **{COLUMNS[h]: r[h] for h in HEADS}} for r in ROWS]
TINY = {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64}


def train_args(root: Path, out: str, steps: int, base=None) -> list:
    model = ["--base", base] if base else ["--set", f"model_config={json.dumps(TINY)}"]
    return ["train", "--train-file", root / "custom.jsonl", "--heads", ",".join(HEADS), "--output-dir", root / out,
            "--max-steps", steps, "--batch-size", 2, *model,
            "--set", f"columns={json.dumps(COLUMNS)}", "--set", "input_column=text",
            "--set", "eval_every=0", "--set", "save_every=0", "--set", "eval_max_new_tokens=6"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli10")
    model = make_model(root / "model")
    write_jsonl(root / "custom.jsonl", CUSTOM)
    (root / "runs" / "quickstart").mkdir(parents=True)  # `runs/` exists: runs/quikstart is a typo, not a hub id
    (root / "notempty").mkdir()
    (root / "notempty" / "mine.txt").write_text("keep me", encoding="utf-8")
    env = offline_env(root / "cache")
    independent = {
        "max-new-0": ["generate", "--model", model, "--max-new-tokens", 0, INPUTS[0]],
        "typo-path": ["generate", "--model", "runs/quikstart", INPUTS[0]],
        "typo-base": ["train", "--train-file", root / "custom.jsonl", "--heads", "reading", "--base", "runs/quikstart"],
        "download-offline": ["download", "rinna/japanese-gpt2-small"],
        "export-not-empty": ["export-hf", "--model", model, "--head", "pos", "--out", root / "notempty"],
        "debug-after": ["train", "--set", "lerning_rate=1", "--debug"],
        "stream-many": ["generate", "--model", model, "--stream", "--max-new-tokens", 6, *INPUTS],
        "json-many": ["generate", "--model", model, "--json", "--max-new-tokens", 6, *INPUTS],
        "stream-json": ["generate", "--model", model, "--stream", "--json", INPUTS[0]],
        "train-help": ["train", "--help"],
        "scratch": train_args(root, "run", 2),
    }
    run = lambda args: run_cli(args, cwd=root, env=env)  # noqa: E731
    with ThreadPoolExecutor(3) as pool:
        done = dict(zip(independent, pool.map(run, independent.values())))
    after = {  # read the run trained above
        "resume": ["train", "--resume", "--output-dir", root / "run", "--max-steps", 3],
        "eval-columns": ["eval", "--model", root / "run", root / "custom.jsonl", "--samples", 2],
        "base-run-folder": train_args(root, "run-on-run", 1, base=root / "run"),
    }
    if done["scratch"].returncode == 0:
        with ThreadPoolExecutor(3) as pool:
            done.update(zip(after, pool.map(run, after.values())))
    return dict(root=root, model=model, done=done)


@pytest.mark.slow  # spawns a process
def test_max_new_tokens_zero_is_refused_not_ignored(runs):
    one_line_error(runs["done"]["max-new-0"], "generate", r"max_new_tokens=0 is out of range: must be >= 1")


@pytest.mark.slow  # spawns a process
def test_mistyped_local_path_is_not_sent_to_the_hub(runs):
    for case, command, flag in (("typo-path", "generate", "--model"), ("typo-base", "train", "--base")):
        one_line_error(runs["done"][case], command,
                       rf"{flag} runs/quikstart: no such local folder .*did you mean runs/quickstart\?")
        assert "gpt2mh download" not in runs["done"][case].stderr


@pytest.mark.slow  # spawns a process
def test_offline_download_advice_is_not_itself(runs):
    proc = runs["done"]["download-offline"]
    one_line_error(proc, "download", r"could not get 'rinna/japanese-gpt2-small': HF_HUB_OFFLINE is set")
    assert "Unset HF_HUB_OFFLINE" in proc.stderr and "`gpt2mh download" not in proc.stderr


@pytest.mark.slow  # spawns a process
def test_export_onto_a_non_empty_folder_names_the_flag(runs):
    one_line_error(runs["done"]["export-not-empty"], "export-hf", r"not empty.* --overwrite")
    assert (runs["root"] / "notempty" / "mine.txt").read_text(encoding="utf-8") == "keep me"


@pytest.mark.slow  # spawns a process
def test_debug_after_the_subcommand_shows_the_traceback(runs):
    proc = runs["done"]["debug-after"]
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "lerning_rate" in proc.stderr


@pytest.mark.slow  # spawns a process
def test_stream_with_several_heads_and_inputs_has_the_plain_layout(runs):
    out = ok(runs["done"]["stream-many"])
    greedy = [json.loads(line) for line in ok(runs["done"]["json-many"]).splitlines()]
    width = max(map(len, HEADS))
    expected = []
    for row in greedy:
        expected.append(row["input"])
        expected += [f"  {h:>{width}}: {row[h]}" for h in HEADS]
    assert [line.rstrip() for line in out.splitlines()] == [line.rstrip() for line in expected]
    assert "[" not in out  # no "[head #row]" switch headers


@pytest.mark.slow  # spawns a process
def test_stream_with_json_is_refused(runs):
    one_line_error(runs["done"]["stream-json"], "generate", r"--stream .* --json .*give one of them")


@pytest.mark.slow  # spawns a process
def test_train_help_is_truthful(runs):
    out = ok(runs["done"]["train-help"])
    assert "default: train from scratch" not in out
    assert "model_config" in out and "[model_config]" in out and "--resume --output-dir RUN" in out


@pytest.mark.slow  # spawns a process
def test_train_from_scratch_with_model_config_on_the_command_line(runs):
    from gpt2mh import MultiHeadGPT2

    proc = runs["done"]["scratch"]
    result = json.loads(ok(proc))
    model = MultiHeadGPT2.from_pretrained(result["last_checkpoint"])
    assert model.config.n_embd == 16 and model.config.n_inner == 64  # HF's rule: 4 * n_embd
    assert f"wrote {result['last_checkpoint']}" in proc.stderr
    assert re.search(r"^step 2/2 loss \d", proc.stderr, re.M), proc.stderr  # progress without a terminal


@pytest.mark.slow  # spawns a process
def test_resume_from_the_output_dir_says_so(runs):
    proc = runs["done"]["resume"]
    result = json.loads(ok(proc))
    assert result["steps"] == 3
    assert re.search(r"resumed from step 2 \(\S*checkpoint-2\)", proc.stderr), proc.stderr


@pytest.mark.slow  # spawns a process
def test_eval_reads_the_runs_columns(runs):
    proc = runs["done"]["eval-columns"]
    metrics = json.loads(ok(proc))
    assert metrics["samples"] == 2
    for h in HEADS:
        assert {f"{h}/loss", f"{h}/char_accuracy"} <= set(metrics)
    assert "custom.jsonl: 4 rows, 4 kept" in proc.stderr


@pytest.mark.slow  # spawns a process
def test_train_base_accepts_a_training_output_folder(runs):
    from gpt2mh import MultiHeadGPT2

    result = json.loads(ok(runs["done"]["base-run-folder"]))
    model = MultiHeadGPT2.from_pretrained(result["last_checkpoint"])
    assert model.head_names == HEADS and model.config.n_embd == 16


@pytest.mark.slow  # spawns a process
def test_report_without_matplotlib_says_so(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"),
                           str(ROOT / "benchmarks" / "results" / "generate-cpu.json"), "--readme", str(tmp_path / "r.md")],
                          env={**offline_env(tmp_path), "PYTHONPATH": f"{blocker}:{ROOT}"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("report.py: error: the plot needs matplotlib, which is not installed: "
                                   "pip install -e '.[bench]' (or pass --no-plot for the table only)")


def test_eval_help_states_the_library_default():
    # `gpt2mh --help` imports no torch, so the CLI restates one default; it must be the library's.
    from gpt2mh.cli.train import DEFAULT_EVAL_TOKENS
    from gpt2mh.train.config import DEFAULT_MAX_NEW_TOKENS

    assert DEFAULT_EVAL_TOKENS == DEFAULT_MAX_NEW_TOKENS
