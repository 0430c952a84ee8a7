"""Data files, training state and resume: refused with the path named, or read as the user meant."""
from __future__ import annotations

import json

import pytest
import torch

from gpt2mh.train.checkpoint import load_training_state
from gpt2mh.train.data import DataError, read_examples

V, EOS, PAD = 101, 2, 3
CFG = dict(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=EOS,
           pad_token_id=PAD)


def test_lone_surrogate_in_jsonl_names_file_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "ok", "a": "x"}\n{"input": "bad \\ud83d", "a": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl: line 2: column 'input' holds a lone surrogate U\+D83D"):
        read_examples(path, ["a"])


def test_nan_from_pandas_is_a_missing_target(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "x", "a": NaN, "b": "t"}\n{"input": "y", "a": "u", "b": "v"}\n', encoding="utf-8")
    examples, report = read_examples(path, ["a", "b"])
    assert examples[0].targets == {"b": "t"} and report.targets == {"a": 1, "b": 2}


def test_a_head_column_blank_in_every_row_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("input,a,b\nx,1,\ny,2, \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv: the target column of head\(s\) \['b'\] \('b'\) is empty in every row"):
        read_examples(path, ["a", "b"])


def test_corrupt_trainer_state_and_truncated_training_state_name_the_path(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{\"step\": 3,")
    torch.save({"optimizer": {}}, folder / "training_state.pt")
    with pytest.raises(ValueError, match=r"checkpoint-3/trainer_state.json: corrupt trainer state"):
        load_training_state(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 3}))
    data = (folder / "training_state.pt").read_bytes()
    (folder / "training_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint-3/training_state.pt: cannot be read \(truncated or corrupt"):
        load_training_state(folder)


def test_resume_with_other_heads_is_refused(tmp_path):
    from gpt2mh.train.config import TrainConfig
    from gpt2mh.train.setup import check_resume_heads

    cfg = TrainConfig(train_file="t.jsonl", heads=["reading", "entities"], model_config={})
    with pytest.raises(ValueError, match=r"was trained with heads \['reading', 'pos'\], but this run asks for "
                                         r"\['reading', 'entities'\]"):
        check_resume_heads(cfg, tmp_path, ["reading", "pos"])
    check_resume_heads(TrainConfig(train_file="t.jsonl", heads=["pos", "reading"], model_config={}), tmp_path,
                       ["reading", "pos"])  # the same heads in another order resume
