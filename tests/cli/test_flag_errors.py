"""Catalogue of bad inputs, part 7 (issue 11): the `gpt2mh` command's flags, swept as a user would —
negative, zero and huge numbers, empty head lists, flags that contradict each other, folders where a
file belongs and files where a folder belongs. Each case is refused before any work, with exit code 2
and one line naming the flag and what to do, or gives the correct result.

Cases run through cli.main in this process (the code path of `python -m gpt2mh`, without paying a torch
import per case): argparse's own refusals raise SystemExit(2), gpt2mh's return 2."""
from __future__ import annotations

import json
import re

import pytest
import torch

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.cli import main
from gpt2mh.tokenizer import Tokenizer

ROWS = [{"input": "今日は晴れ。", "reading": "キョウハハレ。", "pos": "名詞 助詞 名詞 記号"}] * 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    tok = Tokenizer.from_pretrained()
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=8, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = MultiHeadGPT2(cfg, ["reading", "pos"])
        with torch.no_grad():
            model.heads.normal_(0, 1.0)  # heads that differ, and say more than EOS
    model.save_pretrained(root / "model", tokenizer=tok)
    (root / "d.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    (root / "folder.jsonl").mkdir()
    (root / "a-file").write_text("x", encoding="utf-8")
    (root / "inputs.txt").write_text("今日は\n", encoding="utf-8")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "notes.txt").write_text("mine", encoding="utf-8")
    (root / "torn.bin").write_bytes(b"garbage, not a pickle")
    (root / "sjis.toml").write_bytes('train_file = "データ.jsonl"\n'.encode("cp932"))
    torch.save({"wte.weight": torch.ones(4, 2)}, root / "plain.bin")
    return root


def run(root, command: str, capsys):
    """cli.main(command) -> (exit code, stdout, stderr); {root} and {model} are filled in."""
    argv = command.format(root=root, model=root / "model").split()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(root, command: str, pattern: str, capsys) -> str:
    """Exit 2, nothing on stdout, the last stderr line `gpt2mh <command>: error: ...pattern`, no traceback."""
    code, out, err = run(root, command, capsys)
    assert code == 2 and out == "", (code, out, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert re.match(rf"gpt2mh {command.split()[0]}: error: .*{pattern}", last), last
    return err


# name: (command, what the last stderr line says)
REFUSED = {
    # --seed: an integer torch takes (it used to reach torch as "Overflow when unpacking long long")
    "generate-seed-huge": ("generate --model {model} --seed 99999999999999999999999 hi",
                           r"argument --seed: 99999999999999999999999 is out of range: a seed is an integer in \[0, 2\*\*32\)"),
    "generate-seed-float": ("generate --model {model} --seed 1.5 hi", r"argument --seed: '1\.5' is not an integer"),
    "train-seed-negative": ("train --train-file {root}/d.jsonl --base {model} --seed -1",
                            r"argument --seed: -1 is out of range"),
    # an empty head list is not "every head" (it was read as heads=None)
    "generate-heads-empty": ("generate --model {model} --heads= hi",
                             r"--heads '': expected comma-separated head names, e.g. --heads reading,pos"),
    "generate-heads-trailing-comma": ("generate --model {model} --heads reading, hi", r"--heads 'reading,': expected"),
    "eval-heads-empty": ("eval --model {model} {root}/d.jsonl --heads=", r"--heads '': expected comma-separated"),
    # flags that contradict each other: one of them used to be ignored
    "repeated-head-conflicts": ("generate --model {model} --head reading:temperature=0.5 --head reading:temperature=1 hi",
                                r"--head 'reading:temperature=1': reading's temperature already set by an earlier "
                                r"--head reading:\.\.\. to another value"),
    "max-new-tokens-twice": ("generate --model {model} --controls max_new_tokens=3 --max-new-tokens 2 hi",
                             r"--max-new-tokens 2 and --controls max_new_tokens=3 disagree: give one of them"),
    "text-and-file": ("generate --model {model} --file {root}/inputs.txt hi",
                      r"got TEXT arguments and --file \S*inputs\.txt: give the inputs one way"),
    "file-is-a-folder": ("generate --model {model} --file {root}",
                         r"--file \S+: is a folder; expected a UTF-8 text file with one input per line"),
    "revision-of-a-local-folder": ("generate --model {model} --revision v1 hi",
                                   r"--revision v1: pins a commit of a hub repo, but --model \S*model is a local folder"),
    # eval's numbers: --samples -1 evaluated all but the last example, --batch-size -3 scored nothing
    "eval-samples-negative": ("eval --model {model} {root}/d.jsonl --samples -1", r"--samples -1: must be >= 0"),
    "eval-batch-size-zero": ("eval --model {model} {root}/d.jsonl --batch-size 0", r"--batch-size 0: must be >= 1"),
    "eval-batch-size-negative": ("eval --model {model} {root}/d.jsonl --batch-size -3",
                                 r"--batch-size -3: must be >= 1"),
    "eval-max-new-tokens-zero": ("eval --model {model} {root}/d.jsonl --max-new-tokens 0",
                                 r"--max-new-tokens 0: must be >= 1"),
    "eval-data-is-a-folder": ("eval --model {model} {root}/folder.jsonl",
                              r"\S*folder\.jsonl: is a folder; expected a data file \(\.csv, \.tsv, \.jsonl"),
    # train: paths and devices checked before the base model is loaded
    "train-file-is-a-folder": ("train --train-file {root}/folder.jsonl --base {model} --heads reading "
                               "--output-dir {root}/run-f --max-steps 1",
                               r"\S*folder\.jsonl: is a folder; expected a data file"),
    "train-output-dir-is-a-file": ("train --train-file {root}/d.jsonl --base {model} --output-dir {root}/a-file",
                                   r"--output-dir \S*a-file: is a file, not a folder"),
    "train-device-unknown": ("train --train-file {root}/d.jsonl --base {model} --device nope",
                             r"device='nope' is not usable here"),
    "train-config-missing": ("train --config {root}/nope.toml", r"--config \S*nope\.toml: no such file; expected a "
                                                                r"TOML or JSON file"),
    "train-config-is-a-folder": ("train --config {root}", r"--config \S+: is a folder"),
    "train-config-not-utf8": ("train --config {root}/sjis.toml",
                              r"--config \S*sjis\.toml: not UTF-8 text \('utf-8' codec can't decode byte 0x83"),
    "train-resume-without-run": ("train --resume", r"--resume: name the run to continue with --output-dir RUN"),
    # convert / export-hf / download
    "convert-torn-bin": ("convert {root}/torn.bin --out {root}/torn.safetensors",
                         r"\S*torn\.bin: cannot be read as a plain tensor checkpoint .*: Unsupported operand \d+$"),
    "export-onto-a-non-empty-folder": ("export-hf --model {model} --head reading --out {root}/nonempty",
                                       r"\S*nonempty: not empty and not a previous gpt2mh export"),
    "download-a-local-path": ("download {root}/model", r"download \S+model: expected a hub repo id such as "
                                                       r"rinna/japanese-gpt2-small; a local folder needs no download"),
    # quickstart: refused before the dataset is written or a previous run replaced
    "quickstart-steps-zero": ("quickstart --output-dir {root}/qs --steps 0", r"--steps 0: must be >= 1"),
    "quickstart-output-dir-is-a-file": ("quickstart --output-dir {root}/a-file", r"--output-dir \S*a-file: is a file"),
    "quickstart-device-unknown": ("quickstart --output-dir {root}/qs --device nope", r"device='nope' is not usable"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_flag_is_refused_by_name(root, case, capsys):
    command, pattern = REFUSED[case]
    err = refused(root, command, pattern, capsys)
    if not case.startswith(("generate-seed", "train-seed")):  # argparse prints its usage first
        assert len(err.strip().splitlines()) == 1 or case == "train-file-is-a-folder", err
    assert not (root / "qs").exists() and not (root / "torn.safetensors").exists()


def generated(root, command: str, capsys) -> dict:
    code, out, err = run(root, command, capsys)
    assert code == 0, err
    return json.loads(out)


def test_per_head_default_value_overrides_the_common_controls(root, capsys):
    # `--controls do_sample=true --head reading:do_sample=false`: reading is greedy. The per-head value
    # equalled SamplingConfig's default and was dropped, so reading sampled anyway.
    greedy = generated(root, "generate --model {model} --json --max-new-tokens 4 今日は", capsys)
    mixed = generated(root, "generate --model {model} --json --max-new-tokens 4 --seed 1 --controls "
                            "do_sample=true,temperature=1.5 --head reading:do_sample=false 今日は", capsys)
    sampled = generated(root, "generate --model {model} --json --max-new-tokens 4 --seed 1 --controls "
                              "do_sample=true,temperature=1.5 今日は", capsys)
    assert mixed["reading"] == greedy["reading"] and mixed["pos"] == sampled["pos"]
    assert sampled["reading"] != greedy["reading"]  # the case tests something


def test_repeated_head_flags_merge(root, capsys):
    # `--head h:a=1 --head h:b=2` is `--head h:a=1,b=2` (the second used to replace the first)
    one = generated(root, "generate --model {model} --json --seed 2 --head "
                          "reading:max_new_tokens=2,do_sample=true --max-new-tokens 6 今日は", capsys)
    two = generated(root, "generate --model {model} --json --seed 2 --head reading:max_new_tokens=2 "
                          "--head reading:do_sample=true --max-new-tokens 6 今日は", capsys)
    assert one == two


def test_stream_prints_nothing_before_a_refused_setting(root, capsys):
    refused(root, "generate --model {model} --stream --max-new-tokens 0 hi",
            r"max_new_tokens=0 is out of range: must be >= 1", capsys)  # no half-printed "hi / reading: "


def test_convert_into_a_folder_writes_model_safetensors_there(root, capsys):
    (root / "converted").mkdir()
    code, out, err = run(root, "convert {root}/plain.bin --out {root}/converted", capsys)
    assert code == 0, err
    assert out.strip() == str(root / "converted" / "model.safetensors")
    from safetensors.torch import load_file

    assert torch.equal(load_file(root / "converted" / "model.safetensors")["wte.weight"], torch.ones(4, 2))


def test_quickstart_with_bad_steps_keeps_the_previous_run(root, capsys):
    # it used to start over (deleting the run) and then fail on max_steps=-1
    run_dir = root / "previous"
    (run_dir / "checkpoint-3").mkdir(parents=True)
    (run_dir / "checkpoint-3" / "config.json").write_text("{}", encoding="utf-8")
    refused(root, f"quickstart --output-dir {run_dir} --steps -1", r"--steps -1: must be >= 1", capsys)
    assert (run_dir / "checkpoint-3" / "config.json").read_text(encoding="utf-8") == "{}"


@pytest.mark.parametrize("seed, error, message", [
    (1.5, TypeError, r"seed=1\.5: expected an integer \(got float\)"),  # int(1.5) quietly gave seed 1
    ("3", TypeError, r"seed='3': expected an integer \(got str\)"),
    (True, TypeError, r"seed=True: expected an integer"),
    (10**30, ValueError, r"seed=10{30} is out of range: a seed is an integer in \[0, 2\*\*32\)"),
    (2**32, ValueError, r"seed=4294967296 is out of range: a seed is an integer in \[0, 2\*\*32\)"),  # one range
    (-1, ValueError, r"seed=-1 is out of range"),  # for generation, training and --seed alike
])
def test_generate_seed_must_be_an_integer(root, seed, error, message):
    from gpt2mh.inference.generate import generate_text

    model = MultiHeadGPT2.from_pretrained(root / "model")
    with pytest.raises(error, match=message):
        generate_text(model, Tokenizer.from_pretrained(root / "model"), ["今日は"], max_new_tokens=2,
                      do_sample=True, seed=seed)


def test_numpy_integer_seed_is_the_same_seed(root):
    import numpy as np

    from gpt2mh.inference.generate import generate_text

    model, tok = MultiHeadGPT2.from_pretrained(root / "model"), Tokenizer.from_pretrained(root / "model")
    kw = dict(max_new_tokens=4, do_sample=True, temperature=1.5)
    assert generate_text(model, tok, ["今日は"], seed=np.int64(7), **kw) == generate_text(model, tok, ["今日は"], seed=7, **kw)


# ---- library forms of the same inputs ------------------------------------------------------------
def test_batch_encode_takes_a_numpy_array_of_strings():
    import numpy as np

    tok = Tokenizer.from_pretrained()
    texts = ["今日は", "明日は雨"]
    for form in (np.array(texts), tuple(texts), (t for t in texts)):
        assert all(torch.equal(a, b) for a, b in zip(tok.batch_encode(form), tok.batch_encode(texts)))
    with pytest.raises(ValueError, match="batch_encode needs at least one text"):
        tok.batch_encode(np.array([], dtype=str))


def test_decode_of_none_names_what_it_takes():
    with pytest.raises(TypeError, match="decode takes a sequence of token ids, got NoneType None"):
        Tokenizer.from_pretrained().decode(None)


def test_pandas_nan_among_prompts_is_refused(root):
    # a blank cell read by pandas is float('nan'): not a prompt, not the string "nan"
    from gpt2mh.inference.generate import generate_text

    model = MultiHeadGPT2.from_pretrained(root / "model")
    with pytest.raises(TypeError, match="expected text as a str, got float"):
        generate_text(model, Tokenizer.from_pretrained(root / "model"), ["今日は", float("nan")], max_new_tokens=2)
