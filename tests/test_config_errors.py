"""GPT2Config: integer fields given as floats."""
from __future__ import annotations

import pytest

from gpt2mh import GPT2Config

V, EOS, PAD = 101, 2, 3
CFG = dict(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=EOS,
           pad_token_id=PAD)


@pytest.mark.parametrize("value, ok", [(1.0, True), (1.5, False), (True, False), ("1", True), (None, False)])
def test_model_config_float_ints(value, ok):
    fields = dict(CFG, n_layer=value)
    if ok:
        assert GPT2Config(**fields).n_layer == 1
    else:
        with pytest.raises(ValueError, match=r"n_layer=.* must be an integer"):
            GPT2Config(**fields)


def test_model_config_float_int_trains_from_scratch_message():
    from gpt2mh.tokenizer import Tokenizer
    from gpt2mh.train.config import TrainConfig
    from gpt2mh.train.setup import build_model

    cfg = TrainConfig(train_file="t.jsonl", heads=["a"], model_config={"n_layer": 1.5, "n_embd": 8, "n_head": 2})
    with pytest.raises(ValueError, match=r"model_config: n_layer=1.5 must be an integer"):
        build_model(cfg, Tokenizer.from_pretrained())
    cfg = TrainConfig(train_file="t.jsonl", heads=["a"], model_config={"n_layer": 1.0, "n_embd": 8, "n_head": 2,
                                                                        "n_positions": 16})
    assert build_model(cfg, Tokenizer.from_pretrained())[0].config.n_layer == 1
