"""Trivial answers (gpt2mh.demo.baselines) and per-head generation budgets: what the quickstart prints beside
each head's score, and how long each head may generate."""
from statistics import mean

import pytest
import torch

from gpt2mh.demo.baselines import candidates, trivial_scores
from gpt2mh.demo.corpus import HEADS, build_examples
from gpt2mh.train.data import Example


def test_trivial_answers_of_the_quickstart_tasks():
    train, test = build_examples("train"), build_examples("test")
    got = trivial_scores(test, train, HEADS)
    assert got["tense"]["answer"] == "always 現在" and got["tense"]["exact_match"] == pytest.approx(0.52)
    assert got["entities"]["answer"] == "always なし" and got["entities"]["exact_match"] == pytest.approx(0.22)
    assert got["pos"]["answer"].startswith("名 x 0.59 x input chars")
    assert got["pos"]["char_accuracy"] == pytest.approx(0.398, abs=5e-4) and got["pos"]["exact_match"] == 0


def test_the_strongest_candidate_is_reported():
    train = [Example("aaaa", {"t": "xx"}, ""), Example("bb", {"t": "x"}, ""), Example("cc", {"t": "x"}, "")]
    test = [Example("aaaaaa", {"t": "xxx"}, "")]
    assert set(candidates(train, "t")) == {"always x", "always xx"}
    assert set(candidates(train, "t", tags=True)) == {"always x", "always xx", "x x 0.50 x input chars"}
    best = trivial_scores(test, train, ["t"], tag_heads=["t"])["t"]
    assert best == {"answer": "x x 0.50 x input chars", "char_accuracy": 1.0, "exact_match": 1.0}


def test_per_head_generation_budgets():
    from gpt2mh import MultiHeadGPT2
    from gpt2mh.config import GPT2Config
    from gpt2mh.demo.quickstart import generation_budgets
    from gpt2mh.tokenizer import Tokenizer
    from gpt2mh.train.evaluate import generate_predictions, head_limits

    tok = Tokenizer.from_pretrained(None)
    budgets = generation_budgets(build_examples("train"), HEADS, tok)
    longest = {h: max(len(tok.encode(e.targets[h])) for e in build_examples("train")) for h in HEADS}
    assert all(longest[h] * 1.25 <= budgets[h] < longest[h] * 1.25 + 1 for h in HEADS)
    assert head_limits(7, ["a", "b"]) == {"a": 7, "b": 7} and head_limits({"a": 2}, ["a", "b"]) == {"a": 2, "b": 128}
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=64, vocab_size=tok.vocab_size,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = MultiHeadGPT2(cfg, ["a", "b"]).eval()
    with torch.no_grad():
        model.heads[:, :, tok.eos_id] = -1e4  # never stops: every head uses its whole budget
    out = generate_predictions(model, tok, [Example("今日は雨。", {}, "")], ["a", "b"], {"a": 1, "b": 5})
    n = {h: len(tok.encode(out[h][0], add_eos=False)) - 1 for h in "ab"}  # re-encoding adds a leading "▁"
    assert n["a"] <= 1 < n["b"] <= 5


def test_entity_lookup_reference():
    # No model: training entities found in the input. Pure Python on fixed data: exact figures.
    from gpt2mh.demo.corpus import entity_lookup
    from gpt2mh.train.metrics import char_accuracy, exact_match

    answer = entity_lookup()
    test = build_examples("test")
    outs = [answer(ex.input) for ex in test]
    assert round(mean(char_accuracy(o, ex.targets["entities"]) for o, ex in zip(outs, test)), 3) == 0.492
    assert round(mean(exact_match(o, ex.targets["entities"]) for o, ex in zip(outs, test)), 2) == 0.32
    assert answer("ねこがないた。") == "なし" and answer("今日は晴れ。") == "今日/dat"  # 今日 is a training date
    first = build_examples("train")[0]  # its own entities are all known; the lookup finds them in order
    assert answer(first.input).startswith("2005年7月14日/dat 南アフリカ共和国ダーバン/loc")


def test_pos_lookup_reference():
    # No model: the input cut into training words, each with its most frequent training tag. Exact figures.
    from gpt2mh.demo.baselines import score_answer as score
    from gpt2mh.demo.corpus import pos_lookup

    answer = pos_lookup()
    test, train = build_examples("test"), build_examples("train")
    held_out = score(answer, test, "pos")
    assert round(held_out["char_accuracy"], 3) == 0.800 and round(held_out["exact_match"], 2) == 0.14
    assert score(answer, train, "pos")["char_accuracy"] > 0.98  # its own words: nearly every tag right
    assert answer("今日は晴れ。") == "名助名記"  # 今日 は 晴れ 。: every word a training word
    assert answer("ゑゑ。") == "名記"  # a run of unseen characters is one 名
