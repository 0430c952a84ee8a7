"""A real `gpt2mh serve` process on a free localhost port, on a small random three-head checkpoint with
rinna's tokenizer; the same checkpoint loaded here gives the reference outputs (`generate_text`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import HEADS, Server

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.tokenizer import Tokenizer

N_POSITIONS = 256


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    tok = Tokenizer.from_pretrained()
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=N_POSITIONS, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = MultiHeadGPT2(cfg, HEADS)
        with torch.no_grad():
            model.heads.normal_(0, 1.0)  # distinct heads, and EOS is rare: long outputs
    return model.save_pretrained(tmp_path_factory.mktemp("serve-model"), tokenizer=tok)


@pytest.fixture(scope="session")
def reference(checkpoint):
    """(model, tokenizer) of the served checkpoint, loaded in this process."""
    return MultiHeadGPT2.from_pretrained(checkpoint), Tokenizer.for_model(checkpoint)


@pytest.fixture(scope="session")
def server(checkpoint, tmp_path_factory):
    """A server with the default settings, shared by the whole session."""
    s = Server(checkpoint, tmp_path_factory.mktemp("serve"))
    yield s
    assert s.stop() == 0, s.stderr()

