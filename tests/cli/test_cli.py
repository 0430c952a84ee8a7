"""Smoke tests of the `gpt2mh` command (issue 5): every subcommand, run as `python -m gpt2mh ...` (and the
`gpt2mh` console script) in a fresh process, offline, on a tiny model with rinna's vocabulary.

Each process pays the torch import, so all of them are started together by one module fixture (a pool
of 3) and the tests only read their results. Processes run with OMP_NUM_THREADS=1: on a small shared
machine, torch's intra-op thread pool makes every tiny op wait for descheduled threads (10x slower).

The helpers at the top (offline environment, a pre-filled HF cache in rinna's layout) are shared with
tests/test_readme.py and tests/test_quickstart.py."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import (
    COMMIT,
    HEADS,
    INPUTS,
    ROWS,
    TINY_RINNA,
    console_script,
    fill_cache,
    make_model,
    offline_env,
    ok,
    one_line_error,
    rinna_files,
    run_cli,
    write_jsonl,
)

from gpt2mh.weights.hub import DEFAULT_REPO


# ---- the runs --------------------------------------------------------------------------------------
def cases(root: Path, model: Path, hf_folder: Path) -> dict:
    """name -> (args, stdin, options); paths are absolute, cwd is `root`."""
    data = root / "data"
    # Every generate case has the same inputs (one batch): gen-file-json is the greedy reference.
    sampled = ["generate", "--model", model, "--json", "--max-new-tokens", 8,
               "--controls", "do_sample=true,temperature=1.5,top_p=0.95", "--seed", 7, *INPUTS]
    return {
        # download / convert / train
        "download-cached": (["download"], None, dict(script=True, env="cached")),
        "download-missing": (["download", DEFAULT_REPO], None, {}),
        "convert": (["convert", root / "bin" / "pytorch_model.bin"], None, {}),
        "train-flags": (["train", "--train-file", data / "train.jsonl", "--validation-file", data / "valid.jsonl",
                         "--heads", "reading,pos", "--base", hf_folder, "--output-dir", root / "run-flags",
                         "--max-steps", 2, "--batch-size", 2, "--set", "eval_every=0", "--set", "eval_samples=0",
                         "--set", "progress=false"], None, {}),
        "train-toml": (["train", "--config", root / "train.toml"], None, {}),
        # generate
        "gen-text": (["generate", "--model", model, "--max-new-tokens", 8, *INPUTS], None, {}),
        "gen-file-json": (["generate", "--model", model, "--file", root / "inputs.txt", "--json",
                           "--max-new-tokens", 8], None, {}),
        "gen-stdin-heads": (["generate", "--model", model, "--json", "--heads", "pos,reading",
                             "--max-new-tokens", 8], "\n".join(INPUTS) + "\n", {}),
        "gen-per-head": (["generate", "--model", model, "--json", "--max-new-tokens", 8,
                          "--head", "reading:max_new_tokens=2",
                          "--head", "pos:do_sample=true,temperature=1.5", "--seed", 1, *INPUTS], None, {}),
        "gen-sampled": (sampled, None, {}),
        "gen-sampled-again": (sampled, None, {}),
        "gen-stream": (["generate", "--model", model, "--stream", "--max-new-tokens", 8, *INPUTS], None, {}),
        # eval / export
        "eval": (["eval", "--model", model, data / "valid.jsonl", "--samples", 2, "--max-new-tokens", 4], None, {}),
        "export": (["export-hf", "--model", model, "--head", "entities", "--out", root / "exported"], None, {}),
        # bad input (more in-process below)
        "bad-config-key": (["train", "--set", "lerning_rate=1"], None, {}),
        "bad-debug": (["--debug", "train", "--set", "lerning_rate=1"], None, {}),
    }


@pytest.fixture(scope="module")
def cli(tmp_path_factory, hf_checkpoint, rinna_spiece):
    root = tmp_path_factory.mktemp("cli")
    model = make_model(root / "model")
    hf, hf_folder = hf_checkpoint(TINY_RINNA)
    (root / "bin").mkdir()
    hf.save_pretrained(root / "bin", safe_serialization=False)  # pytorch_model.bin, as transformers writes it
    write_jsonl(root / "data" / "train.jsonl", ROWS)
    write_jsonl(root / "data" / "valid.jsonl", ROWS[:2])
    (root / "inputs.txt").write_text("\n".join(INPUTS) + "\n\n", encoding="utf-8")
    (root / "train.toml").write_text(f"""\
train_file = {json.dumps(str(root / "data" / "train.jsonl"))}
heads = ["reading", "entities", "pos"]
output_dir = {json.dumps(str(root / "run-toml"))}
max_steps = 3
batch_size = 2
eval_every = 0
save_every = 0
progress = false

[model_config]
vocab_size = 32000
n_positions = 64
n_embd = 32
n_layer = 1
n_head = 2
bos_token_id = 1
eos_token_id = 2
pad_token_id = 3
""", encoding="utf-8")
    (root / "typo.toml").write_text('train_file = "t.jsonl"\nbase = "x"\nlerning_rate = 1e-4\n', encoding="utf-8")
    envs = {"empty": offline_env(root / "empty-cache"), "cached": offline_env(root / "cached")}
    snapshot = fill_cache(root / "cached" / "hf" / "hub", COMMIT, rinna_files(hf_folder, rinna_spiece))

    todo = cases(root, model, hf_folder)

    def run(item):
        args, stdin, opts = item
        return run_cli(args, cwd=root, env=envs[opts.get("env", "empty")], stdin=stdin, script=opts.get("script", False))

    with ThreadPoolExecutor(3) as pool:
        done = dict(zip(todo, pool.map(run, todo.values())))
    return dict(root=root, model=model, hf=hf, hf_folder=hf_folder, snapshot=snapshot, done=done)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


# ---- --help -----------------------------------------------------------------------------------------
SUBCOMMANDS = ("download", "convert", "train", "generate", "eval", "export-hf", "quickstart")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    # In-process (argparse exits before any work); the entry points themselves run in the processes below.
    from gpt2mh.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and f" {command} " in out.splitlines()[0] + " "


def test_top_level_help_lists_every_subcommand(capsys):
    from gpt2mh.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: gpt2mh") and all(c in out for c in SUBCOMMANDS)


@pytest.mark.slow  # spawns a process
def test_console_script_and_python_m(cli):
    # every case ran through `python -m gpt2mh`, except the download one: through the console script
    assert cli["done"]["download-cached"].args[0] == console_script()
    assert ok(cli["done"]["download-cached"]) and ok(cli["done"]["gen-text"])


# ---- download / convert / train -----------------------------------------------------------------
@pytest.mark.slow  # spawns a process
def test_download_prints_the_cached_snapshot(cli):
    out = ok(cli["done"]["download-cached"])
    assert Path(out.strip()) == cli["snapshot"]
    assert (Path(out.strip()) / "config.json").is_file()


@pytest.mark.slow  # spawns a process
def test_download_with_nothing_cached_says_so(cli):
    # offline (HF_HUB_OFFLINE=1) with an empty cache: the advice must not be to run this same command
    one_line_error(cli["done"]["download-missing"], "download",
                   rf"could not get '{DEFAULT_REPO}': HF_HUB_OFFLINE is set and it is not in the HF cache.*Unset HF_HUB_OFFLINE")


@pytest.mark.slow  # spawns a process
def test_convert_bin_to_safetensors(cli):
    from safetensors.torch import load_file

    out = Path(ok(cli["done"]["convert"]).strip())
    assert out == cli["root"] / "bin" / "model.safetensors" and out.is_file()
    tensors = load_file(out)
    torch.testing.assert_close(tensors["transformer.wte.weight"], cli["hf"].transformer.wte.weight.detach())


@pytest.mark.slow  # spawns a process
def test_train_from_flags(cli):
    from gpt2mh import MultiHeadGPT2

    result = json.loads(ok(cli["done"]["train-flags"]))
    assert result["steps"] == 2
    assert set(result["metrics"]) >= {"loss", "reading/loss", "pos/loss"}
    assert Path(result["best_checkpoint"]) == cli["root"] / "run-flags" / "checkpoint-2"
    model = MultiHeadGPT2.from_pretrained(result["best_checkpoint"])
    assert model.head_names == ("reading", "pos") and model.config.n_embd == TINY_RINNA["n_embd"]


@pytest.mark.slow  # spawns a process
def test_train_from_toml_config(cli):
    from gpt2mh import MultiHeadGPT2

    result = json.loads(ok(cli["done"]["train-toml"]))
    assert result["steps"] == 3
    folder = cli["root"] / "run-toml" / "checkpoint-3"
    assert (folder / "model.safetensors").is_file() and (folder / "spiece.model").is_file()
    model = MultiHeadGPT2.from_pretrained(folder)
    assert model.head_names == HEADS and model.config.n_layer == 1


# ---- generate ---------------------------------------------------------------------------------------
@pytest.mark.slow  # spawns a process
def test_generate_text_arguments_human_readable(cli):
    lines = ok(cli["done"]["gen-text"]).splitlines()
    assert len(lines) == len(INPUTS) * (1 + len(HEADS))
    expected = jsonl(ok(cli["done"]["gen-file-json"]))  # same inputs, same batch, greedy
    for i, text in enumerate(INPUTS):
        block = lines[i * 4: i * 4 + 4]
        assert block[0] == text
        for head, line in zip(HEADS, block[1:]):
            name, _, output = line.partition(": ")
            assert name.strip() == head
            assert output.rstrip() == expected[i][head].rstrip()


@pytest.mark.slow  # spawns a process
def test_generate_file_json_has_every_head(cli):
    rows = jsonl(ok(cli["done"]["gen-file-json"]))
    assert [r["input"] for r in rows] == INPUTS  # the blank line is skipped
    for r in rows:
        assert list(r) == ["input", *HEADS] and all(isinstance(r[h], str) for h in HEADS)
    assert len({r["reading"] + r["entities"] + r["pos"] for r in rows}) == 2


@pytest.mark.slow  # spawns a process
def test_generate_stdin_head_subset(cli):
    rows = jsonl(ok(cli["done"]["gen-stdin-heads"]))
    full = jsonl(ok(cli["done"]["gen-file-json"]))
    assert [list(r) for r in rows] == [["input", "pos", "reading"]] * 2
    for r, f in zip(rows, full):  # a subset of heads generates the same greedy text
        assert r == {"input": f["input"], "pos": f["pos"], "reading": f["reading"]}


@pytest.mark.slow  # spawns a process
def test_generate_per_head_controls(cli):
    greedy = jsonl(ok(cli["done"]["gen-file-json"]))
    rows = jsonl(ok(cli["done"]["gen-per-head"]))
    assert [r["input"] for r in rows] == INPUTS
    for row, g in zip(rows, greedy):
        assert row["entities"] == g["entities"]  # untouched head: the shared controls (greedy, 8 tokens)
        assert g["reading"].startswith(row["reading"]) and len(row["reading"]) < len(g["reading"])  # 2 tokens
    assert [r["pos"] for r in rows] != [g["pos"] for g in greedy]  # sampled at temperature 1.5


@pytest.mark.slow  # spawns a process
def test_generate_controls_and_seed(cli):
    greedy = jsonl(ok(cli["done"]["gen-file-json"]))
    a = jsonl(ok(cli["done"]["gen-sampled"]))
    b = jsonl(ok(cli["done"]["gen-sampled-again"]))
    assert a == b  # --seed: the same sample
    assert a != greedy and [r["input"] for r in a] == INPUTS  # --controls do_sample=true took effect


@pytest.mark.slow  # spawns a process
def test_generate_stream(cli):
    # the plain output's layout (input, then one line per head), streamed: no interleaved segments
    out = ok(cli["done"]["gen-stream"])
    greedy = jsonl(ok(cli["done"]["gen-file-json"]))
    lines = out.splitlines()
    assert len(lines) == len(INPUTS) * (1 + len(HEADS))
    for i, text in enumerate(INPUTS):
        block = lines[i * 4: i * 4 + 4]
        assert block[0] == text
        for head, line in zip(HEADS, block[1:]):
            name, _, output = line.partition(": ")
            assert name.strip() == head and output.strip() == greedy[i][head].strip()


# ---- eval / export ----------------------------------------------------------------------------------
@pytest.mark.slow  # spawns a process
def test_eval_prints_metrics_per_head(cli):
    proc = cli["done"]["eval"]
    metrics = json.loads(ok(proc))
    for h in HEADS:
        assert {f"{h}/loss", f"{h}/perplexity", f"{h}/exact_match", f"{h}/char_accuracy"} <= set(metrics)
    assert "valid.jsonl: 2 rows, 2 kept" in proc.stderr


@pytest.mark.slow  # spawns a process
def test_export_hf_loads_in_transformers(cli):
    import transformers

    from gpt2mh import MultiHeadGPT2

    out = Path(ok(cli["done"]["export"]).strip())
    assert out == cli["root"] / "exported"
    # what it prints for transformers users (followed in tests/test_export.py)
    assert f'AutoTokenizer.from_pretrained("{out}", use_fast=False)' in cli["done"]["export"].stderr
    assert "tokenizer.do_lower_case = True" in cli["done"]["export"].stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ours = MultiHeadGPT2.from_pretrained(cli["model"]).eval()
    ids = torch.randint(0, 32000, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[HEADS.index("entities")], atol=1e-4, rtol=1e-4)
    assert (out / "spiece.model").is_file() and (out / "tokenizer_config.json").is_file()


# ---- bad input: one line on stderr, non-zero exit, no traceback -------------------------------------
@pytest.mark.slow  # spawns a process
def test_bad_config_key_did_you_mean(cli):
    one_line_error(cli["done"]["bad-config-key"], "train",
                   r"unknown training setting\(s\) 'lerning_rate' \(did you mean 'learning_rate'\?\)")
    assert cli["done"]["bad-config-key"].stdout == ""


@pytest.mark.slow  # spawns a process
def test_debug_shows_the_traceback(cli):
    proc = cli["done"]["bad-debug"]
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "lerning_rate" in proc.stderr


# More bad input, through cli.main in this process (the same code path as above, without paying a
# torch import per case): an exception escaping main() would fail the test.
BAD = {
    "missing-file": ("generate --model {model} --file {root}/nope.txt", r"\S*/nope\.txt: no such input file"),
    "missing-model": ("generate --model {root}/nope hello", r"\S*/nope: no such checkpoint folder"),
    "unknown-heads": ("generate --model {model} --heads reading,zz hello",
                      r"unknown head\(s\) \['zz'\]; this model has heads \['reading', 'entities', 'pos'\]"),
    "unknown-head-control": ("generate --model {model} --head zz:temperature=1 hello",
                             r"--head 'zz:temperature=1': unknown head 'zz'; the model has"),
    "control-without-head": ("generate --model {model} --head temperature=1 hello",
                             r"--head 'temperature=1': expected NAME:key=value"),
    "control-without-value": ("generate --model {model} --head reading:temperature hello",
                              r"temperature: expected temperature=value, got 'temperature'"),
    "control-bad-value": ("generate --model {model} --controls top_p=high hello", r"top_p: cannot parse value 'high'"),
    "unknown-control": ("generate --model {model} --controls temprature=1 hello", r"unknown sampling key 'temprature'"),
    "config-file-key": ("train --config {root}/typo.toml",
                        r"\S*typo\.toml: unknown training setting\(s\) 'lerning_rate' \(did you mean 'learning_rate'\?\)"),
    "missing-data": ("eval --model {model} {root}/nope.jsonl", r"data file not found: \S*/nope\.jsonl"),
    "export-unknown-head": ("export-hf --model {model} --head zz --out {root}/x", r"unknown head\(s\) \['zz'\]"),
    "convert-missing": ("convert {root}/nope.bin", r"\S*/nope\.bin: no such \.bin file"),
}


@pytest.mark.slow  # spawns a process
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(cli, case, capsys):
    from gpt2mh.cli import main

    command, pattern = BAD[case]
    argv = command.format(root=cli["root"], model=cli["model"]).split()
    code = main(argv)
    captured = capsys.readouterr()
    assert code != 0 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert re.match(rf"gpt2mh {argv[0]}: error: {pattern}", lines[0]), lines[0]


@pytest.mark.slow  # spawns a process
def test_export_hf_from_a_training_output_folder(cli, capsys):
    # `--model runs/x` (a training output folder) means its newest checkpoint, as for generate and eval
    from gpt2mh.cli import main

    assert main(["export-hf", "--model", str(cli["root"] / "run-toml"), "--head", "pos",
                 "--out", str(cli["root"] / "exported-pos")]) == 0, capsys.readouterr().err
    assert (cli["root"] / "exported-pos" / "model.safetensors").is_file()
