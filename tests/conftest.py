"""Shared fixtures: determinism, an offline HF hub in a temp dir, and tiny HF GPT-2 checkpoints.

transformers is the parity reference only (tests and benchmarks); gpt2mh never imports it."""
from __future__ import annotations

import os

# Before transformers / huggingface_hub are imported: both read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: a real request fails at once

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # `from helpers import ...` / `from conftest import ...` in every folder

import pytest
import torch
from hypothesis import settings

# Property tests (hypothesis): derandomized by default, so every run — CI, a fresh clone, yours — draws
# the same examples and a failure reproduces. To search new examples run them randomized:
#   python -m pytest tests/test_properties.py --hypothesis-profile=random   (add --hypothesis-seed=N to replay)
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("random", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Exact shape of rinna/japanese-gpt2-small (its config.json), to check parity at full size.
RINNA_SMALL = dict(vocab_size=32000, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
# Tiny configs for everything else: a few ms per forward.
TINY = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
TINY_ODD = dict(vocab_size=257, n_positions=48, n_embd=48, n_layer=3, n_head=3, n_inner=80,
                layer_norm_epsilon=1e-6, activation_function="gelu_pytorch_tanh")
TINY_RINNA_IDS = dict(TINY, vocab_size=200, bos_token_id=1, eos_token_id=2, pad_token_id=3)
NO_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
LAYOUTS = ("safetensors", "bin", "sharded", "fp16", "bf16")
RINNA_FIXTURE = Path(__file__).parent / "fixtures" / "rinna" / "spiece.model"


# Session-wide: HF_HOME / HF_HUB_CACHE / GPT2MH_CACHE in a temp dir, offline, dead endpoint; yields the root.
@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    env = {
        "HF_HOME": root / "hf",
        "HF_HUB_CACHE": root / "hf" / "hub",
        "HUGGINGFACE_HUB_CACHE": root / "hf" / "hub",
        "HF_ASSETS_CACHE": root / "hf" / "assets",
        "HF_TOKEN_PATH": root / "hf" / "token",
        "GPT2MH_CACHE": root / "gpt2mh",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, str(v))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        mp.delenv("HF_TOKEN", raising=False)
        # huggingface_hub copies the environment into `constants` once, at import: patch those too.
        import huggingface_hub.constants as c
        from huggingface_hub.utils import reset_sessions

        for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_TOKEN_PATH"):
            if hasattr(c, name):
                mp.setattr(c, name, str(env[name]))
        mp.setattr(c, "HF_HUB_OFFLINE", True)
        mp.setattr(c, "ENDPOINT", "http://127.0.0.1:9")
        reset_sessions()  # sessions are built once, offline-ness included
        yield root
        reset_sessions()


# Every test: seed 0, fp32 default dtype, no TF32 (fp32 tolerances below assume true fp32 matmuls).
@pytest.fixture(autouse=True)
def deterministic():
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def build_hf_model(config_kwargs: dict, seed: int = 1234):
    """A random transformers GPT2LMHeadModel (eager attention, eval, fp32) with every parameter random.

    HF's init leaves biases at 0 and LayerNorm at (1, 0); perturbing them makes a swapped or dropped
    bias/LayerNorm key visible in the parity tests."""
    import transformers

    cfg = transformers.GPT2Config(**config_kwargs, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias") or ".ln_" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_hf(model, folder: Path, layout: str) -> Path:
    """Write `model` with transformers' own save_pretrained in one of LAYOUTS."""
    if layout == "safetensors":
        model.save_pretrained(folder)
    elif layout == "bin":
        model.save_pretrained(folder, safe_serialization=False)
    elif layout == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
    elif layout in ("fp16", "bf16"):
        model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[layout]).save_pretrained(folder)
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    return folder


# Factory: hf_checkpoint(config_kwargs, layout="safetensors") -> (hf_model, folder), built once per session.
# hf_model is eval-mode, eager attention, in the stored dtype (fp16/bf16 layouts); treat both as read-only.
@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    built: dict = {}

    def make(config_kwargs: dict, layout: str = "safetensors"):
        key = (tuple(sorted(config_kwargs.items())), layout)
        if key not in built:
            model = build_hf_model(config_kwargs)
            folder = tmp_path_factory.mktemp(f"hf_{layout}")
            built[key] = (model, save_hf(model, folder, layout))
        return built[key]

    return make


# Path of rinna's sentencepiece model (tests/fixtures/rinna/spiece.model).
@pytest.fixture(scope="session")
def rinna_spiece() -> Path:
    assert RINNA_FIXTURE.is_file(), RINNA_FIXTURE
    return RINNA_FIXTURE


def hf_logits(hf_model, input_ids, attention_mask=None) -> torch.Tensor:
    """(B, T, V) logits of the reference, with the position ids HF generate uses for left padding."""
    with torch.no_grad():
        if attention_mask is None:
            return hf_model(input_ids).logits
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        return hf_model(input_ids, attention_mask=attention_mask, position_ids=pos).logits


def left_padded(B: int, T: int, vocab: int, pads=None, pad_id: int = 0, generator=None):
    """(ids, mask): row b has pads[b] left pads (default 0, 3, 5, ... capped at T-1)."""
    ids = torch.randint(0, vocab, (B, T), generator=generator)
    pads = pads if pads is not None else [min(T - 1, 2 * b + (1 if b else 0)) for b in range(B)]
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        ids[b, :p] = pad_id
    return ids, mask


# Opt-in (pytestmark = pytest.mark.usefixtures("one_thread")): torch on one thread for the test. Two
# OpenMP threads on 2 busy cores spin-wait, and tiny models train several times faster on one.
@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
