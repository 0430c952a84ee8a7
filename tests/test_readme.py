"""Every command and code block of README.md is run here, so the README cannot drift.

- ```python blocks: run in order, in one namespace, in a fresh process, unmodified. Offline, with
  `rinna/japanese-gpt2-small` resolving to a TINY random checkpoint in rinna's exact layout
  (config.json with vocab 32000 and bos/eos/pad 1/2/3, model.safetensors written by transformers'
  save_pretrained, spiece.model) in a pre-filled HF cache; the parity snippet's transformers loads the
  same cached checkpoint.
- ```bash blocks: every `gpt2mh ...` line runs as a process (the console script) in one temp folder,
  after the README's `gpt2mh quickstart` has produced runs/quickstart there. Substitutions, and only
  these (see SUBSTITUTIONS and TOML_SUBSTITUTIONS):
    * `gpt2mh quickstart` runs with `--steps 3 --show 2 --output-dir runs/quickstart` added (the
      default output folder, made explicit: the run is shared with tests/test_quickstart.py);
    * `train --config train.toml` gets the README's ```toml block as train.toml with `max_steps = 2`
      (paths as written: data/train.jsonl and data/valid.jsonl are made from the quickstart's data).
  Files the README's commands name are made in that folder first: path/to/pytorch_model.bin (the tiny
  checkpoint, written by transformers with safe_serialization=False), inputs.txt, data/*.jsonl.
  `pip install ...` and `bash .ci/run` are checked for what they name (the extras in pyproject.toml,
  the torch pin in .ci/run), not run. `gpt2mh serve ...` runs on a free port until one /v1/generate
  request is answered, then gets SIGTERM (exit code 0: the drain's).
- ```json: the data-format example parses as a row of the quickstart's three heads.
- Paths the README names exist: every file and folder of the layout block (nested by indentation,
  with the files a folder line lists), file names in backticks, and relative links (of docs/*.md too)."""
from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import (
    OUTPUT,
    ROOT,
    console_script,
    offline_env,
    ok,
    quickstart_run,
    rinna_cache,
    run_cli,
)

from gpt2mh.demo.corpus import (
    HEADS,  # the quickstart's, which the README's commands and blocks use
)

README = ROOT / "README.md"
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
QUICKSTART_ARGS = ["--steps", "3", "--show", "2", "--output-dir", OUTPUT]
SUBSTITUTIONS = {  # README command -> what runs
    ("gpt2mh", "quickstart"): ["gpt2mh", "quickstart", *QUICKSTART_ARGS],
}
TOML_SUBSTITUTIONS = {"max_steps = 2000": "max_steps = 2"}


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line number of the block's first line of code, code) of each ```lang fenced block."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def commands() -> list[tuple[int, list[str]]]:
    """(README line, words) of each command in the ```bash blocks; `a && b` is two commands."""
    found = []
    for start, code in blocks("bash"):
        for k, line in enumerate(code.splitlines()):
            words, cmd = shlex.split(line, comments=True), []
            for w in words + ["&&"]:
                if w == "&&":
                    if cmd:
                        found.append((start + k, cmd))
                    cmd = []
                else:
                    cmd.append(w)
    return found


COMMANDS = commands()
GPT2MH = [(line, cmd) for line, cmd in COMMANDS if cmd[0] == "gpt2mh"]


def test_readme_has_the_blocks_this_test_runs():
    assert len(blocks("python")) >= 4 and len(blocks("toml")) == 1 and len(blocks("json")) == 1
    assert [cmd for _, cmd in COMMANDS if cmd[0] == "gpt2mh"][0] == ["gpt2mh", "quickstart"]
    subcommands = {cmd[1] for _, cmd in GPT2MH}
    assert subcommands >= {"quickstart", "download", "convert", "train", "generate", "eval", "export-hf", "serve"}
    others = [cmd for _, cmd in COMMANDS if cmd[0] != "gpt2mh"]
    assert others and all(cmd[:2] in (["pip", "install"], ["bash", ".ci/run"]) for cmd in others), others


# ---- commands that are not run: pip install, bash .ci/run ---------------------------------------
def test_install_and_ci_commands_name_what_exists():
    import tomllib

    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    for _, cmd in COMMANDS:
        if cmd[:2] == ["pip", "install"]:
            assert "-e" in cmd, cmd
            target = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", cmd[cmd.index("-e") + 1])  # . or .[extra,...]
            assert target, f"README installs {cmd[cmd.index('-e') + 1]!r}, not this checkout"
            missing = [e for e in (target.group(1) or "").split(",") if e and e not in extras]
            assert not missing, f"README installs extras {missing} that pyproject.toml does not declare"
            for pin in (w for w in cmd if w.startswith("torch==")):
                assert f"install --quiet {pin}" in ci, f"README pins {pin}; .ci/run installs another torch"
        elif cmd[:2] == ["bash", ".ci/run"]:
            assert (ROOT / ".ci" / "run").is_file() and "python -m pytest -q" in ci
    assert console_script()  # what `pip install -e .` provides: the gpt2mh command


# ---- python blocks --------------------------------------------------------------------------------
RUNNER = '''\
import json, sys
namespace = {"__name__": "__main__"}
for start, code in json.load(open(sys.argv[1], encoding="utf-8")):
    print(f"=== README.md:{start}", flush=True)
    # padded so that a traceback names the README's own line numbers
    exec(compile("\\n" * (start - 1) + code, "README.md", "exec"), namespace)
'''


@pytest.mark.slow  # spawns a process
def test_python_blocks(tmp_path, hf_checkpoint, rinna_spiece):
    rinna_cache(tmp_path / "caches", hf_checkpoint, rinna_spiece)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "blocks.json").write_text(json.dumps(blocks("python"), ensure_ascii=False), encoding="utf-8")
    (tmp_path / "runner.py").write_text(RUNNER, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json")], cwd=work,
                          env=offline_env(tmp_path / "caches"), capture_output=True, text=True, encoding="utf-8",
                          timeout=600)
    out = ok(proc)
    outputs = dict(re.findall(r"^=== README.md:(\d+)\n(.*?)(?=^=== |\Z)", out, re.M | re.S))
    assert sorted(map(int, outputs)) == [start for start, _ in blocks("python")]
    for start, code in blocks("python"):
        printed = outputs[str(start)].splitlines()
        assert printed, f"README.md:{start} printed nothing"
        heads = re.search(r"heads=(\[[^\]]*\])", code)
        if "for head, tokens in out.items()" in code:  # one line per head
            assert [line.split(" ", 1)[0] for line in printed] == ast.literal_eval(heads.group(1))
        if "generate_text(" in code:  # {head: [text]}
            texts = ast.literal_eval(printed[-1])
            assert set(texts) == set(HEADS) and all(len(v) == 1 for v in texts.values())
        if "stream(" in code:  # {head: the streamed pieces joined}
            pieces = ast.literal_eval(printed[-1])
            assert set(pieces) == set(HEADS) and all(isinstance(v, str) for v in pieces.values())
        if "generate_rows(" in code:  # every input once, whatever the completion order
            assert printed[-1] == "100 True", printed
        if "score_text(" in code:  # the tuned model's heads, then {head: [log p]}
            assert ast.literal_eval(printed[0]) in (HEADS, list(HEADS))
            scores = ast.literal_eval(printed[-1])
            assert set(scores) == set(HEADS) and all(len(v) == 1 and v[0] < 0 for v in scores.values())
        if "GPT2LMHeadModel" in code:  # parity with transformers on the same cached checkpoint
            diff = float(re.fullmatch(r"tensor\(([-+0-9.e]+)\)", printed[-1]).group(1))
            assert diff < 1e-5, printed[-1]
    assert (work / "runs" / "readme" / "checkpoint-2" / "model.safetensors").is_file()


# ---- the json and toml blocks -----------------------------------------------------------------------
def test_data_format_example(tmp_path):
    from gpt2mh.train.data import read_examples

    ((_, code),) = blocks("json")
    row = json.loads(code)
    assert set(row) == {"input", *HEADS}
    (tmp_path / "row.jsonl").write_text(code, encoding="utf-8")
    examples, report = read_examples(tmp_path / "row.jsonl", list(HEADS))
    assert len(examples) == 1 and set(examples[0].targets) == set(HEADS)


def readme_toml() -> str:
    ((_, code),) = blocks("toml")
    for old, new in TOML_SUBSTITUTIONS.items():
        assert old in code, f"README's toml block changed: update TOML_SUBSTITUTIONS ({old!r})"
        code = code.replace(old, new)
    return code


def test_toml_block_is_a_valid_train_config():
    import tomllib

    from gpt2mh.train.config import TrainConfig

    cfg = TrainConfig.from_dict(tomllib.loads(readme_toml()))
    assert cfg.heads == list(HEADS) and cfg.max_steps == 2


# ---- gpt2mh commands -------------------------------------------------------------------------------
def prepare(cwd: Path, hf_checkpoint, rinna_spiece, caches: Path) -> None:
    """The files the README's commands name, in the folder they run in."""
    from helpers import TINY_RINNA

    hf, _ = hf_checkpoint(TINY_RINNA)
    hf.save_pretrained(cwd / "path" / "to", safe_serialization=False)  # path/to/pytorch_model.bin
    (cwd / "train.toml").write_text(readme_toml(), encoding="utf-8")
    data = cwd / OUTPUT / "data"
    (cwd / "data").mkdir()
    for src, dst, n in (("train.jsonl", "train.jsonl", 8), ("test.jsonl", "valid.jsonl", 4)):
        lines = (data / src).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        (cwd / "data" / dst).write_text("".join(lines), encoding="utf-8")
    (cwd / "inputs.txt").write_text("今日は東京で会議がありました。\n山田さんは大阪に行った。\n", encoding="utf-8")
    rinna_cache(caches, hf_checkpoint, rinna_spiece)


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory, hf_checkpoint, rinna_spiece):
    """Runs the quickstart (shared), then every other README `gpt2mh` command (3 at a time)."""
    cwd, quickstart = quickstart_run(tmp_path_factory.getbasetemp())
    ok(quickstart)
    caches = tmp_path_factory.mktemp("readme-caches")
    prepare(cwd, hf_checkpoint, rinna_spiece, caches)
    env = offline_env(caches)

    def run(cmd):
        actual = SUBSTITUTIONS.get(tuple(cmd), cmd)
        if cmd[1] == "serve":
            return serve_briefly(actual, cwd, env)
        return run_cli(actual[1:], cwd=cwd, env=env, script=True, timeout=600)

    rest = [cmd for _, cmd in GPT2MH if cmd[1] != "quickstart"]
    after = [cmd for cmd in rest if "--resume" in cmd]  # continue a run: only once the run exists
    rest = [cmd for cmd in rest if cmd not in after]
    with ThreadPoolExecutor(3) as pool:
        done = dict(zip(map(tuple, rest), pool.map(run, rest)))
    done.update((tuple(cmd), run(cmd)) for cmd in after)
    done[("gpt2mh", "quickstart")] = quickstart
    return cwd, caches, done


def serve_briefly(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """`gpt2mh serve ...` (the console script) on a free port: once /health answers, one /v1/generate
    request (its JSON is the stdout), then SIGTERM; the exit code is the drain's."""
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([console_script(), *cmd[1:], "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    url, out = f"http://127.0.0.1:{port}", ""
    try:
        for _ in range(600):
            if proc.poll() is not None:
                break
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    out = httpx.post(url + "/v1/generate", json={"inputs": "今日は東京で会議がありました。",
                                                                 "max_new_tokens": 8}, timeout=60).text
                    break
            except httpx.TransportError:
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("line,cmd", GPT2MH, ids=[f"README.md:{line}" for line, _ in GPT2MH])
def test_readme_command(readme_runs, line, cmd):
    cwd, caches, done = readme_runs
    out = ok(done[tuple(cmd)])
    sub = cmd[1]
    if sub == "download":
        snapshot = Path(out.strip())
        assert caches in snapshot.parents and (snapshot / "config.json").is_file()
    elif sub == "convert":
        assert cwd / out.strip() == cwd / "path" / "to" / "model.safetensors"  # printed as given (relative)
    elif sub == "train":
        result = json.loads(out)
        assert result["steps"] == 2 and (cwd / "runs" / "rinna-3heads" / "checkpoint-2" / "model.safetensors").is_file()
    elif sub == "generate" and "--json" in cmd:
        rows = [json.loads(r) for r in out.splitlines()]
        assert [r["input"] for r in rows] == (cwd / "inputs.txt").read_text(encoding="utf-8").split()
        assert all(list(r) == ["input", *HEADS] for r in rows)
    elif sub == "generate" and "--output" in cmd:  # JSON lines in input order, each with its line number
        rows = [json.loads(r) for r in (cwd / cmd[cmd.index("--output") + 1]).read_text(encoding="utf-8").splitlines()]
        assert [r["input"] for r in rows] == (cwd / "inputs.txt").read_text(encoding="utf-8").split()
        assert [r["line"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(list(r) == ["line", "input", *HEADS] for r in rows)
    elif sub == "generate" and "--stream" in cmd:
        lines = out.splitlines()  # the plain layout, streamed: the input, then one line per head
        assert len(lines) == 1 + len(HEADS) and [line.split(":")[0].strip() for line in lines[1:]] == list(HEADS)
    elif sub == "generate":
        assert out.splitlines()[0] == cmd[-1] and len(out.splitlines()) == 1 + len(HEADS)
    elif sub == "eval":
        metrics = json.loads(out)
        assert all(f"{h}/char_accuracy" in metrics and f"{h}/loss" in metrics for h in HEADS)
    elif sub == "export-hf":
        folder = cwd / cmd[cmd.index("--out") + 1]
        assert cwd / out.strip() == folder and (folder / "config.json").is_file()
        assert (folder / "model.safetensors").is_file() and (folder / "spiece.model").is_file()
    elif sub == "serve":  # the quickstart's model over HTTP: every head's text
        assert list(json.loads(out)["results"][0]["outputs"]) == list(HEADS)
    elif sub == "quickstart":
        assert "per-head held-out scores" in out and (cwd / OUTPUT / "checkpoint-3").is_dir()
    else:
        pytest.fail(f"README.md:{line}: no check for `gpt2mh {sub}`; add one here")


# ---- paths the README names ---------------------------------------------------------------------------
PATH = r"[.\w-]+(?:/[.\w-]+)*/?"
REPO_PATH = r"(?<![\w./-])((?:gpt2mh|tests|benchmarks|weights|docs|\.ci)/[\w./-]*)"  # a path from the repository root
BARE_FILE = r"(?<![\w./-])([\w-]+\.(?:py|md))\b"  # a file name a folder line lists


def layout_paths() -> list[str]:
    """Every path the layout block names. A line is `NAME  description`; a NAME is nested under the
    nearest folder line (NAME/) indented less; a line without a NAME continues the description above.
    A folder's description names files in it (`hub.py (...), hf.py`); any description may name paths
    from the repository root (`tests/test_structure.py`)."""
    layout = next(code for _, code in blocks("") if "pyproject.toml" in code)
    named, folders, current = [], [], None  # folders: (indent, path) enclosing the current line
    for line in layout.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        first, *rest = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if re.fullmatch(PATH, first):
            while folders and folders[-1][0] >= indent:
                folders.pop()
            current = (folders[-1][1] if folders else "") + first
            named.append(current)
            if first.endswith("/"):
                folders.append((indent, current))
            description = rest[0] if rest else ""
        else:
            assert current, f"layout line {line!r} continues no entry"
            description = line.strip()
        if current.endswith("/"):
            named += [current + f for f in re.findall(BARE_FILE, description)]
        named += re.findall(REPO_PATH, description)
    return named


def test_paths_named_in_the_readme_exist():
    text = README.read_text(encoding="utf-8")
    named = layout_paths()
    assert len(named) >= 40, named
    modules = [p for p in named if p.startswith("gpt2mh/") and p.endswith(".py")]
    assert len(modules) >= 10, modules
    named += re.findall(r"`((?:gpt2mh|tests|benchmarks|weights|docs|\.ci)/[\w./-]*)`", text)
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_relative_links_resolve():
    """README.md and docs/*.md link to files of the repository: each target exists."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 2
    links = [(page, target) for page in pages
             for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)", page.read_text(encoding="utf-8"))
             if not re.match(r"\w+:", target)]
    assert any(page == README for page, _ in links), "README.md links to no docs page"
    missing = [f"{page.relative_to(ROOT)} -> {t}" for page, t in links if not (page.parent / t).exists()]
    assert not missing, f"links to files that do not exist: {missing}"
