"""Catalogue of bad inputs, part 5: the `gpt2mh` command (issue 7). Each case runs
`python -m gpt2mh ...` in a fresh process and asserts a non-zero exit, exactly one line on stderr that
names the problem (and the file, line and column where there is one), nothing on stdout and no
traceback (`--debug` shows one when wanted).

The processes start together (a pool of 4): each pays the torch import, so one after another they
would take several times longer."""
from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.tokenizer import Tokenizer


class Payload:
    """Unpickling this calls open(path, "w"): the file appears if the loader runs pickled code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def make_files(root):
    tok = Tokenizer.from_pretrained()
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=8, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    MultiHeadGPT2(cfg, ["reading", "pos"]).save_pretrained(root / "model", tokenizer=tok)
    (root / "bad.toml").write_text('train_file = "t.jsonl"\nheads = [a]\n', encoding="utf-8")
    (root / "sjis.txt").write_bytes("日本語\n".encode("cp932"))
    torch.save({"wte.weight": torch.zeros(2, 2), "x": Payload(root / "pwned")}, root / "evil.bin")


# name: (arguments, message after "gpt2mh <command>: error: "); {root} is the test's temp folder
CASES = {
    "missing-model-folder": ("generate --model {root}/nope hello", r"\S*/nope: no such checkpoint folder"),
    "unknown-head": ("generate --model {root}/model --heads zz hello",
                     r"unknown head\(s\) \['zz'\]; this model has heads \['reading', 'pos'\]"),
    "malformed-control": ("generate --model {root}/model --controls temperature=abc hello",
                          "temperature: cannot parse value 'abc'"),
    "missing-input-file": ("generate --model {root}/model --file {root}/missing.txt",
                           r"\S*/missing\.txt: no such input file"),
    "input-file-not-utf8": ("generate --model {root}/model --file {root}/sjis.txt",
                            r"\S*/sjis\.txt: not UTF-8 text \(.*position 0"),
    "bad-config-key": ("train --set lerning_rate=1",
                       r"unknown training setting\(s\) 'lerning_rate' \(did you mean 'learning_rate'\?\)"),
    "config-file-syntax": ("train --config {root}/bad.toml", r"\S*/bad\.toml: .*\(at line 2, column 10\)"),
    "bin-that-runs-code": ("convert {root}/evil.bin --out {root}/evil.safetensors",
                           r"\S*/evil\.bin: cannot be read as a plain tensor checkpoint with "
                           r"torch\.load\(weights_only=True\) .*: Unsupported global: GLOBAL io\.open was not an "
                           r"allowed global by default$"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_files(root)

    def run(args):
        return subprocess.run([sys.executable, "-m", "gpt2mh", *args.format(root=root).split()], cwd=root,
                              capture_output=True, text=True, timeout=240)

    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(CASES, pool.map(run, (args for args, _ in CASES.values()))))
    return root, done


@pytest.mark.slow  # spawns a process
@pytest.mark.parametrize("case", list(CASES))
def test_cli_error_is_one_line(results, case):
    root, done = results
    proc = done[case]
    command = CASES[case][0].split()[0]
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    assert re.fullmatch(rf"gpt2mh {command}: error: {CASES[case][1]}.*", lines[0]), lines[0]
    if case == "bin-that-runs-code":
        assert not (root / "pwned").exists() and not (root / "evil.safetensors").exists()
