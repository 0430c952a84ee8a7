"""Catalogue of bad inputs, part 2: the tokenizer, and a tokenizer that does not belong to the model
(issue 7). Related: test_tokenizer.py (parity with transformers' T5Tokenizer, model-file errors).

Decision recorded here: an empty string is valid text. It encodes to [</s>] (as T5Tokenizer does),
which is a one-token prompt, so a batch of empty strings generates normally (see
test_bad_inputs_generation.py::test_batch_of_empty_strings_generates)."""
from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.inference.generate import generate_text
from gpt2mh.inference.score import score_text
from gpt2mh.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained()  # rinna's, 32000 pieces


@pytest.fixture(scope="module")
def small_vocab_model():
    return MultiHeadGPT2(GPT2Config(vocab_size=101, n_positions=32, n_embd=8, n_layer=1, n_head=2)).eval()


# ---- the model file -----------------------------------------------------------------------------------
def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no SentencePiece model file at .*missing\.model"):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer at .*nowhere.*spiece\.model"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_model_file_that_is_not_sentencepiece(tmp_path):
    path = tmp_path / "spiece.model"
    path.write_text("this is not a protobuf")
    with pytest.raises(ValueError, match=r"spiece\.model is not a SentencePiece model"):
        Tokenizer(path)


def test_sentencepiece_model_without_rinnas_special_tokens(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the cat sat on the mat", "a dog ran far away", "日本語の文です"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "plain"), vocab_size=60, hard_vocab_limit=False,
                                   minloglevel=2)
    with pytest.raises(ValueError, match=r"plain\.model lacks the special tokens \['\[PAD\]'\] of rinna's tokenizer"):
        Tokenizer(tmp_path / "plain.model")


# ---- a tokenizer whose vocabulary does not match the model ------------------------------------------------
def test_vocab_mismatch_in_generate_text(tok, small_vocab_model):
    with pytest.raises(ValueError, match=r"tokenizer .*spiece\.model has 32000 tokens but the model's vocab_size "
                                         r"is 101: they do not belong together"):
        generate_text(small_vocab_model, tok, ["こんにちは"], compile=False, max_new_tokens=2)


def test_vocab_mismatch_in_score_text(tok, small_vocab_model):
    with pytest.raises(ValueError, match=r"32000 tokens but the model's vocab_size is 101"):
        score_text(small_vocab_model, tok, ["こんにちは"], ["はい"])


# ---- text in ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, error, message", [
    (None, TypeError, "expected text as a str, got NoneType"),
    (b"bytes", TypeError, "expected text as a str, got bytes"),
    ("ok\ud800", ValueError, r"lone surrogate U\+D800 at index 2, which is not valid Unicode"),
    ("\udcff" + "x" * 5, ValueError, r"lone surrogate U\+DCFF at index 0"),  # what surrogateescape makes of 0xff
], ids=["none", "bytes", "lone-surrogate", "surrogateescape"])
def test_encode_refuses_what_is_not_text(tok, text, error, message):
    with pytest.raises(error, match=message):
        tok.encode(text)


def test_batch_encode_needs_a_list(tok):
    with pytest.raises(TypeError, match=r"batch_encode takes a list of strings, got one str"):
        tok.batch_encode("abc")  # used to encode each character as its own row
    with pytest.raises(ValueError, match="at least one text"):
        tok.batch_encode([])


def test_empty_strings_are_one_token_prompts(tok):
    assert tok.encode("") == [tok.eos_id]
    ids, mask = tok.batch_encode(["", "", "  "])
    assert ids.tolist() == [[tok.eos_id]] * 3 and mask.tolist() == [[1]] * 3


# ---- ids in ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ids, error, message", [
    ([5, 32000], ValueError, r"token id 32000 is outside the vocabulary \[0, 32000\)"),
    ([-1], ValueError, r"token id -1 is outside the vocabulary"),
    (torch.zeros(2, 3, dtype=torch.long), ValueError, r"decode takes a 1-D tensor of ids, got shape \(2, 3\)"),
    ("12", TypeError, "decode takes a sequence of token ids, got str"),
    ([5, 1.5], TypeError, r"token ids must be integers, got 1\.5 \(float\)"),  # used to decode as id 1
    (torch.tensor([5.0]), TypeError, r"token ids must be integers, got 5\.0"),
], ids=["too-large", "negative", "2-d", "str", "float", "float-tensor"])
def test_decode_refuses_what_is_not_token_ids(tok, ids, error, message):
    with pytest.raises(error, match=message):
        tok.decode(ids)
