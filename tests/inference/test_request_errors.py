"""Generation and scoring arguments: refused by name or handled as the equivalent input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2mh import GPT2Config, MultiHeadGPT2

V, EOS, PAD = 101, 2, 3
CFG = dict(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=EOS,
           pad_token_id=PAD)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultiHeadGPT2(GPT2Config(**CFG), ["a", "b"]).eval()


def gen(model, ids=None, **kw):
    ids = torch.tensor([[5, 6, 7]]) if ids is None else ids
    return model.generate(ids, compile=False, **{"max_new_tokens": 3, **kw})


def test_temperature_inf_is_refused(model):
    with pytest.raises(ValueError, match=r"temperature=inf is out of range: must be a finite number"):
        gen(model, do_sample=True, temperature=float("inf"), bad_words_ids=[[0]])


@pytest.mark.parametrize("controls, error, message", [
    (dict(eos_token_id="</s>"), ValueError, r"eos_token_id='</s>' must be a token id"),
    (dict(pad_token_id=2.5), ValueError, r"pad_token_id=2\.5 must be a token id"),
    (dict(per_head=["a"]), TypeError, r"per_head must map head names to controls"),
    (dict(per_head={"a": 5}), TypeError, r"per_head\['a'\] must be a dict of controls"),
    (dict(max_length="10"), ValueError, r"max_length='10' must be an integer"),
    (dict(repetition_penalty=float("inf")), ValueError, r"repetition_penalty=inf is out of range"),
])
def test_bad_generation_argument_types(model, controls, error, message):
    with pytest.raises(error, match=message):
        gen(model, **controls)


def test_per_head_as_a_cli_string_and_max_length_none(model):
    ref = gen(model, per_head={"a": {"max_new_tokens": 2}})
    got = gen(model, per_head={"a": "max_new_tokens=2"})
    assert all(torch.equal(ref[h], got[h]) for h in ref)
    assert all(torch.equal(gen(model, max_length=None)[h], gen(model)[h]) for h in ref)


@pytest.mark.parametrize("ids", [np.array([[5, 6, 7]], dtype=np.uint16), np.array([5, 6, 7], dtype=np.int32),
                                 [5, 6, 7], torch.tensor([[5, 6, 7]], dtype=torch.int16)])
def test_other_integer_forms_of_ids_generate_the_same(model, ids):
    ref = gen(model)
    got = gen(model, ids, attention_mask=[[1, 1, 1]])
    assert all(torch.equal(ref[h], got[h]) for h in ref)


@pytest.mark.parametrize("ids, mask, message", [
    (np.array([[5.0, 6.0]]), None, r"input_ids must hold integer token ids, got a numpy array of dtype float64"),
    ([[5, 6], [7]], None, r"rows have different lengths \[1, 2\]; pad them"),
    ("hello", None, r"input_ids is a str, not token ids: encode text with the tokenizer first"),
    (torch.tensor([[5, 6]]), [[1, 2]], r"attention_mask must hold only 0 and 1"),
    ({"input_ids": [[5, 6]], "attention_mask": [[1, 1]]}, [[1, 1]], r"attention_mask given twice"),
])
def test_bad_id_and_mask_forms(model, ids, mask, message):
    with pytest.raises((TypeError, ValueError), match=message):
        gen(model, ids, attention_mask=mask)


def test_score_mask_of_another_shape_names_it(model):
    ids, tgt = torch.tensor([[5, 6]]), torch.tensor([[7, 8, 9]])
    with pytest.raises(ValueError, match=r"target_ids must be \(B, T\) with target_mask of the same shape; got \(1, 3\) and \(1, 2\)"):
        model.score(ids, None, tgt, torch.ones(1, 2))


def test_score_of_an_empty_continuation_is_zero(model):
    ids, tgt = torch.tensor([[5, 6], [7, 8]]), torch.tensor([[7, 8], [9, 9]])
    got = model.score(ids, None, tgt, torch.tensor([[1, 1], [0, 0]]))
    assert torch.all(got[:, 1] == 0) and torch.all(got[:, 0] < 0)


def test_score_text_with_bare_strings_scores_one_pair():
    from gpt2mh.inference.score import score_text
    from gpt2mh.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained()
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=24, n_embd=8, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    m = MultiHeadGPT2(cfg, ["a"]).eval()
    one = score_text(m, tok, "一文", "続き")
    assert one == score_text(m, tok, ["一文"], ["続き"]) and len(one["a"]) == 1
    with pytest.raises(TypeError, match=r"both strings, or both lists of strings"):
        score_text(m, tok, "一文", ["続き", "x"])


def test_stream_refuses_a_tokenizer_of_another_vocabulary(model):
    from gpt2mh.inference.generate import stream
    from gpt2mh.tokenizer import Tokenizer

    with pytest.raises(ValueError, match=r"has 32000 tokens but the model's vocab_size is 101"):
        next(stream(model, Tokenizer.from_pretrained(), torch.tensor([[5, 6]]), compile=False))
