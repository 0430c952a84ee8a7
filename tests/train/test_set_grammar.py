"""`gpt2mh train --set KEY=VALUE`: VALUE is JSON, else a string (`gpt2mh.train.config.parse_set`)."""
from types import SimpleNamespace

import pytest

from gpt2mh import cli
from gpt2mh.train import loop as train_mod
from gpt2mh.train.config import TrainConfig, parse_set

ITEMS = ['model_config={"n_embd": 16, "n_layer": 1, "n_head": 2}', "learning_rate=1e-4", "progress=false",
         "eval_batch_size=null", 'heads=["a", "b"]', "base=rinna/japanese-gpt2-small", " seed =7",
         "output_dir=runs/x=y"]
WANT = {"model_config": {"n_embd": 16, "n_layer": 1, "n_head": 2}, "learning_rate": 1e-4, "progress": False,
        "eval_batch_size": None, "heads": ["a", "b"], "base": "rinna/japanese-gpt2-small", "seed": 7,
        "output_dir": "runs/x=y"}


def test_values_are_json_else_strings():
    assert parse_set(ITEMS) == WANT


@pytest.mark.parametrize("item", ["learning_rate", "=5"])
def test_an_item_without_a_key_is_refused(item):
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_set([item])


def test_the_command_line_reads_the_config_file_and_every_set(tmp_path, monkeypatch):
    config = tmp_path / "run.toml"
    config.write_text('train_file = "t.jsonl"\nmodel_config = {n_embd = 8}\n')
    items = [a for item in ITEMS if not item.startswith(("base=", "model_config=")) for a in ("--set", item)]
    items += ["--set", ITEMS[0]]
    seen = []
    done = SimpleNamespace(last_checkpoint=None, best_checkpoint=None, steps=0, metrics={}, interrupted=False)
    monkeypatch.setattr(train_mod, "train", lambda cfg: seen.append(cfg) or done)
    assert cli.main(["train", "--config", str(config), *items]) in (0, None)
    assert seen == [TrainConfig.from_dict({"train_file": "t.jsonl",
                                                **{k: v for k, v in WANT.items() if k != "base"}})]
