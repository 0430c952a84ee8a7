"""Helpers shared by several test files (no test file imports another): an offline HF cache filled
by hand, tiny training runs on hironsancorpus, the command line in a fresh process, the quickstart run."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpt2mh.demo.corpus import build_examples
from gpt2mh.tokenizer import Tokenizer
from gpt2mh.train.config import TrainConfig
from gpt2mh.train.data import write_jsonl as write_examples
from gpt2mh.weights.hub import DEFAULT_REPO

HEADS = ("reading", "entities", "pos")  # corpus columns these tests train on (every example carries reading; the quickstart trains gpt2mh.demo.corpus.HEADS)


# ---- an offline HF cache (tests/test_hub.py) ----------------------------------------------------
def fill_cache(cache: Path, commit: str, files: dict, repo_id: str = DEFAULT_REPO, ref: str | None = "main") -> Path:
    """models--org--name/{blobs/<sha256>, snapshots/<commit>/<name> -> ../../blobs/<sha256>, refs/<ref>}."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snap = storage / "snapshots" / commit
    snap.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for name, src in files.items():
        blob = storage / "blobs" / hashlib.sha256(Path(src).read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copy(src, blob)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    if ref is not None:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return snap


# ---- tiny training runs (tests/test_train.py, test_checkpoint.py, test_ddp.py) -------------------
TINY_MODEL = dict(n_embd=16, n_layer=1, n_head=2, n_positions=96, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


@functools.lru_cache(maxsize=None)
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained()


@functools.lru_cache(maxsize=None)
def short_examples(split: str, max_input: int):
    """Corpus sentences whose input is at most max_input tokens (keeps CPU tests fast)."""
    tok = tokenizer()
    return tuple(e for e in build_examples(split) if len(tok.encode(e.input)) <= max_input)


def write_data(folder, n=12, drop_heads=(), name="train.jsonl"):
    rows = []
    for e in short_examples("train", 16)[:n]:
        targets = {h: ("" if h in drop_heads else t) for h, t in e.targets.items()}
        rows.append(type(e)(e.input, targets, e.source))
    return str(write_examples(folder / name, rows))


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    d = dict(train_file=write_data(tmp_path), heads=list(HEADS), output_dir=str(tmp_path / "run"),
             model_config=TINY_MODEL, max_length=96, batch_size=4, max_steps=3, learning_rate=1e-2,
             weight_decay=0.0, eval_every=0, save_every=0, log_every=1, progress=False, seed=0)
    d.update(overrides)
    return TrainConfig.from_dict(d)


def records(run_dir, split="train"):
    lines = (json.loads(line) for line in open(f"{run_dir}/metrics.jsonl", encoding="utf-8"))
    return [r for r in lines if r.get("split") == split]


# ---- the command line (tests/test_cli.py, test_cli_help_truth.py, test_quickstart.py, test_readme.py)
ROOT = Path(__file__).resolve().parents[1]
# A random checkpoint of rinna/japanese-gpt2-small's vocabulary and special ids, tiny otherwise.
TINY_RINNA = dict(vocab_size=32000, n_positions=1024, n_embd=32, n_layer=2, n_head=4,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
COMMIT = "c0ffee00" + "0123456789abcdef0123456789abcdef"  # 40 hex digits, as the hub's
INPUTS = ["今日は東京で会議がありました。", "明日は大阪で雨が降るでしょう。"]
ROWS = [
    {"input": "今日は東京で会議がありました。", "reading": "キョウハトウキョウデカイギガアリマシタ。",
     "entities": "東京/LOC", "pos": "名詞 助詞 名詞 助詞 名詞 助詞 動詞 助動詞 助動詞 記号"},
    {"input": "山田さんは大阪に行った。", "reading": "ヤマダサンハオオサカニイッタ。",
     "entities": "山田/PSN 大阪/LOC", "pos": "名詞 名詞 助詞 名詞 助詞 動詞 助動詞 記号"},
    {"input": "明日は雨が降るでしょう。", "reading": "アシタハアメガフルデショウ。",
     "entities": "なし", "pos": "名詞 助詞 名詞 助詞 動詞 助動詞 記号"},
    {"input": "京都大学の会議は十時に始まる。", "reading": "キョウトダイガクノカイギハジュウジニハジマル。",
     "entities": "京都大学/ORG 十時/TIM", "pos": "名詞 助詞 名詞 助詞 名詞 助詞 動詞 記号"},
]


def offline_env(root: Path) -> dict:
    """This process's environment, but with the HF cache and gpt2mh's cache under `root`, offline."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k not in ("TRANSFORMERS_OFFLINE", "GPT2MH_CACHE")}
    env.update(HF_HOME=str(root / "hf"), HF_HUB_CACHE=str(root / "hf" / "hub"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", HF_ENDPOINT="http://127.0.0.1:9",
               GPT2MH_CACHE=str(root / "gpt2mh"), OMP_NUM_THREADS="1", PYTHONUTF8="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


def console_script() -> str:
    """The `gpt2mh` entry point installed beside this interpreter (pip install -e .)."""
    script = Path(sys.executable).with_name("gpt2mh")
    found = str(script) if script.is_file() else shutil.which("gpt2mh")
    assert found, "the gpt2mh console script is not installed: pip install -e ."
    return found


def run_cli(args, *, cwd, env, stdin: str | None = None, script: bool = False, timeout: int = 300):
    """`python -m gpt2mh ARGS` (or the `gpt2mh` console script) -> CompletedProcess (text)."""
    cmd = [console_script()] if script else [sys.executable, "-m", "gpt2mh"]
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=env, input=stdin, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout)


def rinna_files(hf_folder: Path, spiece: Path) -> dict:
    """rinna/japanese-gpt2-small's layout: what transformers' save_pretrained wrote, plus spiece.model."""
    files = {p.name: p for p in Path(hf_folder).iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors"} <= set(files), files
    return {**files, "spiece.model": spiece}


def rinna_cache(root: Path, hf_checkpoint, spiece: Path) -> Path:
    """`rinna/japanese-gpt2-small` in an offline HF cache under root/hf/hub -> its snapshot folder."""
    _, folder = hf_checkpoint(TINY_RINNA)
    return fill_cache(root / "hf" / "hub", COMMIT, rinna_files(folder, spiece))


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def one_line_error(proc, command: str, pattern: str) -> None:
    """Non-zero exit, exactly one line on stderr, `gpt2mh <command>: error: ` + pattern, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.match(rf"gpt2mh {command}: error: .*{pattern}", lines[0]), lines[0]


def ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def make_model(folder: Path) -> Path:
    """A random three-head gpt2mh checkpoint with rinna's tokenizer; heads perturbed so they differ."""
    from gpt2mh import GPT2Config, MultiHeadGPT2
    from gpt2mh.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained()
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = MultiHeadGPT2(cfg, HEADS)
        with torch.no_grad():
            model.heads.normal_(0, 1.0)
    return model.save_pretrained(folder, tokenizer=tok)


# ---- the quickstart run (tests/test_quickstart.py, test_readme.py) -----------------------------
STEPS = 3  # the real default is 360 steps (quickstart.SMALL_STEPS); 3 keep the run (dataset, training, 50-sentence evaluation) short
SHOW = 2
OUTPUT = "runs/quickstart"  # the default --output-dir, passed explicitly (relative to the run's folder)


@functools.cache
def quickstart_run(basetemp: Path):
    """`gpt2mh quickstart --steps 3 --show 2 --output-dir runs/quickstart` in basetemp/quickstart (the
    console script, offline) -> (that folder, CompletedProcess). Once per session."""
    cwd = basetemp / "quickstart"
    cwd.mkdir()
    proc = run_cli(["quickstart", "--steps", STEPS, "--show", SHOW, "--output-dir", OUTPUT], cwd=cwd,
                   env=offline_env(basetemp / "quickstart-caches"), script=True, timeout=600)
    return cwd, proc


# ---- benchmark scripts as modules (tests/test_bench_*.py, test_input_use.py) ----------------------
def load_benchmark(name: str):
    """benchmarks/<name>.py (name may hold a subfolder: "experiments/input_use") imported as a module,
    with benchmarks/ on sys.path for its `import common`."""
    script = ROOT / "benchmarks" / f"{name}.py"
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(script.stem, script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- the full-vocab sampling path, as a reference for the in-graph one ----------------------------
def process(scores, history, cur_len, step, c, plan):
    """HF's processors, then (sampling streams only) the warpers, over the whole vocabulary: what
    `gpt2mh.inference.sampling.draw` computes in one pass, spelled out for the tests to compare."""
    from gpt2mh.inference.sampling import processors, warp

    scores = processors(scores, history, cur_len, step, c, plan)
    return warp(scores, c, plan) if plan.any_sample else scores


# ---- a `gpt2mh serve` process (tests/serve/) ------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m gpt2mh serve --model FOLDER --port P ARGS` until stop(); its stderr in a file."""

    def __init__(self, folder: Path, tmp: Path, *args, env: dict | None = None, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "gpt2mh", "serve", "--model", str(folder), "--port", str(self.port), *args]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=tmp, env={**offline_env(tmp / "caches"), **(env or {})},
                                         stdout=subprocess.DEVNULL, stderr=err)
        if wait:
            self.wait_up()

    def wait_up(self, timeout: float = 90) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"gpt2mh serve exited {self.proc.returncode}:\n{self.stderr()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gpt2mh serve did not answer /health in {timeout} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"gpt2mh serve did not exit within {timeout} s of {sig!r}:\n{self.stderr()}")

    def metric(self, name: str, headers: dict | None = None) -> float:
        import httpx

        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def wait_metric(self, name: str, ok, timeout: float = 20, headers: dict | None = None) -> float:
        end = time.monotonic() + timeout
        while True:
            value = self.metric(name, headers)
            if ok(value) or time.monotonic() > end:
                return value
            time.sleep(0.05)


def events(response) -> list[dict]:
    """The JSON of each `data: ...` server-sent event ([DONE] as the string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
