"""Catalogue of bad inputs, part 3: generation and scoring (issue 7). Every case runs eagerly on a tiny
random model. Related: test_generate.py (controls that transformers also refuses, non-finite logits,
unknown heads and controls), test_sampling.py (SamplingConfig.validate, from_string).

Decisions recorded here:
- A batch of empty strings is valid: each encodes to [</s>] and generates like any one-token prompt.
- A config that bans every token (bad words, n-gram bans and min_new_tokens together) raises a
  ValueError naming the head; before, greedy decoding silently emitted token 0, a banned token.
- heads=[] and repeated head names are refused (they used to fail inside `max()` or decode a head twice).
"""
from __future__ import annotations

import pytest
import torch

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.inference.generate import generate_text
from gpt2mh.inference.score import score_text
from gpt2mh.tokenizer import Tokenizer

V, EOS, PAD = 101, 2, 3
HEADS = ["a", "b"]


@pytest.fixture(scope="module")
def model():
    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                     eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    return MultiHeadGPT2(cfg, HEADS).eval()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained()


@pytest.fixture(scope="module")
def text_model(tok):
    """A tiny model with the tokenizer's vocabulary, for the text-in/text-out API."""
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=24, n_embd=8, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    return MultiHeadGPT2(cfg, HEADS).eval()


def gen(model, ids=None, **kw):
    ids = torch.tensor([[5, 6, 7]]) if ids is None else ids
    defaults = {} if "max_length" in kw else {"max_new_tokens": 3}
    return model.generate(ids, compile=False, **{**defaults, **kw})


# ---- controls out of range (those transformers also refuses are in test_generate.py) --------------------
@pytest.mark.parametrize("controls, message", [
    (dict(do_sample=True, temperature=float("nan")), r"temperature=nan is out of range: must be > 0"),
    (dict(top_k=2.5), r"top_k=2\.5 is out of range: must be an integer"),
    (dict(min_p=1.5), r"min_p=1\.5 is out of range: must be in \[0, 1\]"),
    (dict(typical_p=0.0), r"typical_p=0\.0 is out of range: must be in \(0, 1\]"),
    (dict(no_repeat_ngram_size=-1), r"no_repeat_ngram_size=-1 is out of range: must be >= 0"),
    (dict(max_new_tokens=0), r"max_new_tokens=0 is out of range: must be >= 1"),
    (dict(min_new_tokens=5), r"min_new_tokens=5 is out of range: must be in \[0, max_new_tokens=3\]"),
    (dict(do_sample="yes"), r"do_sample='yes' is out of range: must be True or False"),
    (dict(bad_words_ids=[[500]]), r"bad_words_ids=\(500,\) is out of range: .* < vocab_size=101"),
    (dict(bad_words_ids=[[]]), r"bad_words_ids=\(\) is out of range: each entry must be a non-empty sequence"),
    (dict(bad_words_ids=["ab"]), r"bad_words_ids=\['ab'\]: expected a list of token-id lists"),  # was int('a')
    (dict(bad_words_ids=[5, 6]), r"bad_words_ids=\[5, 6\]: expected a list of token-id lists"),  # was 'int' not iterable
    (dict(eos_token_id=1000), r"eos_token_id=\(1000,\) is out of range"),
    (dict(pad_token_id=-1), r"pad_token_id=-1 is out of range"),
    (dict(per_head={"b": dict(top_p=2.0)}), r"top_p=2\.0 is out of range: must be in \(0, 1\]"),
    (dict(max_length=3), r"max_length=3 leaves no room after a prompt of 3 tokens"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_control_out_of_range(model, controls, message):
    with pytest.raises(ValueError, match=message):
        gen(model, **controls)


def test_every_token_banned_is_an_error_not_a_banned_token(model):
    everything = [[t] for t in range(V) if t != EOS]  # HF never bans EOS through bad_words_ids ...
    with pytest.raises(ValueError, match=r"head\(s\) \['b'\]: every token is banned"):
        # ... but min_new_tokens does, so nothing is left for head b
        gen(model, per_head={"b": dict(bad_words_ids=everything, min_new_tokens=2)})
    with pytest.raises(ValueError, match=r"\['a', 'b'\]: every token is banned"):
        gen(model, no_repeat_ngram_size=1, bad_words_ids=everything[:-1], max_new_tokens=5, min_new_tokens=5)


# ---- prompts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ids, error, message", [
    (torch.tensor([[5, V]]), ValueError, r"input_ids\[0, 1\] = 101 is not a token id of this model \(vocab_size=101\)"),
    (torch.tensor([[-1, 5], [5, 5]]), ValueError, r"input_ids\[0, 0\] = -1 is not a token id"),
    (torch.tensor([[5.0, 6.0]]), TypeError, r"input_ids must hold integer token ids, got dtype torch\.float32"),
    ([["5", 6]], TypeError, r"input_ids holds the string '5', not a token id"),  # lists of ids are accepted
    (torch.zeros(0, 3, dtype=torch.long), ValueError, r"input_ids holds no prompt \(batch size 0\)"),
    (torch.ones(1, 2, 3, dtype=torch.long), ValueError, r"input_ids must be \(B, T\)"),
], ids=["id-too-large", "id-negative", "float", "list-of-str", "empty-batch", "3-d"])
def test_bad_input_ids(model, ids, error, message):
    with pytest.raises(error, match=message):
        gen(model, ids)


def test_mask_of_another_shape(model):
    with pytest.raises(ValueError, match=r"attention_mask of the same shape; got \(1, 3\) and \(1, 2\)"):
        model.generate(torch.tensor([[5, 6, 7]]), torch.ones(1, 2, dtype=torch.long), compile=False)


def test_prompt_longer_than_the_context(model, tok, text_model):
    with pytest.raises(ValueError, match=r"prompt length 40 \+ max_new_tokens 3 = 43 exceeds the model's context "
                                         r"n_positions=32"):
        gen(model, torch.full((1, 40), 5))
    long = "長い文章です。" * 10
    n = len(tok.encode(long))
    # used to say "over max_length=24", a setting the caller never gave
    with pytest.raises(ValueError, match=rf"input 1 is {n} tokens long; the model's context is n_positions=24 tokens"):
        generate_text(text_model, tok, ["短い", long], compile=False, max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"input 0 is {n} tokens long"):
        score_text(text_model, tok, [long], ["x"])


def test_batch_of_empty_strings_generates(tok, text_model):
    out = generate_text(text_model, tok, ["", ""], compile=False, max_new_tokens=3)
    ref = generate_text(text_model, tok, ["</s>"], compile=False, max_new_tokens=3)  # the same one-token prompt
    assert list(out) == HEADS
    for h in HEADS:
        assert len(out[h]) == 2 and all(isinstance(t, str) for t in out[h])
        assert out[h] == ref[h] * 2
    with pytest.raises(ValueError, match="expected a non-empty list of input strings"):
        generate_text(text_model, tok, [], compile=False)


# ---- heads --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads, error, message", [
    ([], ValueError, r"heads=\[\]: name each head to generate once \(or heads=None for all of \['a', 'b'\]\)"),
    (["a", "b", "a"], ValueError, r"heads=\['a', 'b', 'a'\]: name each head to generate once"),
    (["a", "zz"], KeyError, r"unknown head\(s\) \['zz'\]; this model has heads \['a', 'b'\]"),
], ids=["zero", "duplicate", "unknown"])
def test_bad_head_selection(model, heads, error, message):
    with pytest.raises(error, match=message):
        gen(model, heads=heads)


# ---- scoring ------------------------------------------------------------------------------------------------
def test_score_with_ids_outside_the_vocab(model):
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match=r"target_ids\[0, 1\] = 300 is not a token id of this model"):
        model.score(ids, None, torch.tensor([[7, 300]]))
    with pytest.raises(ValueError, match=r"input_ids\[0, 0\] = -5"):
        model.score(torch.tensor([[-5, 6]]), None, torch.tensor([[7]]))
