"""Text in, text out: `generate_text` and `stream` with rinna's real tokenizer and vocab-32000 tiny models.

Eager decoding throughout (the compiled step is covered in test_generate.py; a vocab-32000 graph
would cost another compile)."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from gpt2mh.inference.engine import Engine, Tokens
from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.inference.generate import generate_text, stream
from gpt2mh.inputs import encode_prompts
from gpt2mh.tokenizer import Tokenizer

TEXTS = ["今日の天気は", "GPT-2 は言語モデルです。それでは"]
KANA = "のはがにをでとや"  # single-piece kana in rinna's vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained()  # rinna's packaged sentencepiece model


def tiny_config(tokenizer) -> GPT2Config:
    return GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    m = MultiHeadGPT2(tiny_config(tokenizer), ["x", "y"])
    with torch.no_grad():
        m.heads[1].add_(torch.randn_like(m.heads[1]))  # head y differs from x
    return m.eval()


@pytest.fixture(scope="module")
def kana_model(tokenizer):
    """Head "ja" ranks KANA first-to-last whatever the input; with no_repeat_ngram_size=1 its greedy
    output is exactly KANA, one kana per token, with no space anywhere."""
    torch.manual_seed(0)
    m = MultiHeadGPT2(tiny_config(tokenizer), ["ja"]).eval()
    ids = [tokenizer._sp.piece_to_id(k) for k in KANA]
    assert [tokenizer.decode([i]) for i in ids] == list(KANA)
    with torch.no_grad():
        ln = m.transformer.ln_f
        ln.weight.zero_()
        ln.bias.zero_()
        ln.bias[0] = 1.0  # every hidden state is e_0: logits = heads[:, 0, :]
        m.heads.zero_()
        m.heads[0, 0, ids] = torch.linspace(10.0, 5.0, len(ids))
    return m


def collect(pieces) -> dict[tuple[str, int], list[str]]:
    out = defaultdict(list)
    for head, row, text in pieces:
        assert isinstance(text, str) and text
        out[head, row].append(text)
    return out


def flat(texts: dict) -> dict[tuple[str, int], str]:
    """generate_text's {head: [str] or [[str]]} -> {(head, row): str}, rows in generate's order."""
    out = {}
    for head, rows in texts.items():
        rows = [s for r in rows for s in (r if isinstance(r, list) else [r])]
        out.update({(head, j): s for j, s in enumerate(rows)})
    return out


def assert_stream_matches_generate_text(model, tokenizer, **kw):
    ids, mask = encode_prompts(tokenizer, TEXTS, model)
    pieces = collect(stream(model, tokenizer, ids, mask, compile=False, **kw))
    texts = flat(generate_text(model, tokenizer, TEXTS, compile=False, **kw))
    assert texts, "generate_text returned nothing"
    for key, text in texts.items():
        assert "".join(pieces.get(key, [])) == text, key
    assert set(pieces) <= set(texts)
    return pieces, texts


def test_generate_text_returns_strings_per_head(model, tokenizer):
    out = generate_text(model, tokenizer, TEXTS, compile=False, max_new_tokens=6)
    assert list(out) == ["x", "y"]
    for rows in out.values():
        assert len(rows) == 2 and all(isinstance(s, str) for s in rows)
    # the strings are the decoded new tokens of `generate` (up to the EOS)
    ids, mask = encode_prompts(tokenizer, TEXTS, model)
    tokens = model.generate(ids, mask, compile=False, max_new_tokens=6)
    for head, rows in out.items():
        for s, row in zip(rows, tokens[head]):
            row = row.tolist()
            row = row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
            assert s == tokenizer.decode(row)


def test_generate_text_num_return_sequences_gives_lists_of_lists(model, tokenizer):
    out = generate_text(model, tokenizer, TEXTS, compile=False, max_new_tokens=5, do_sample=True, seed=0,
                        num_return_sequences=3)
    for rows in out.values():
        assert len(rows) == 2 and all(isinstance(r, list) and len(r) == 3 for r in rows)
        assert all(isinstance(s, str) for r in rows for s in r)
        assert len(set(rows[0])) > 1  # sampled return sequences differ


def test_generate_text_single_string(model, tokenizer):
    out = generate_text(model, tokenizer, TEXTS[0], compile=False, max_new_tokens=4)
    assert all(isinstance(rows, list) and len(rows) == 1 and isinstance(rows[0], str) for rows in out.values())


def test_stream_concatenation_equals_generate_text_greedy(model, tokenizer):
    assert_stream_matches_generate_text(model, tokenizer, max_new_tokens=10)


def test_stream_concatenation_equals_generate_text_sampled(model, tokenizer):
    # random tokens of the whole vocabulary: special ids, "▁" runs, latin, digits, symbols
    pieces, texts = assert_stream_matches_generate_text(model, tokenizer, max_new_tokens=24, do_sample=True,
                                                        temperature=3.0, seed=1, num_return_sequences=2,
                                                        per_head={"y": dict(max_new_tokens=9)})
    assert sum(len(p) for p in pieces.values()) > 20  # text really was emitted piece by piece


def test_stream_emits_japanese_token_by_token(kana_model, tokenizer, monkeypatch):
    steps = []
    events = Engine.events

    def counting(self, *args, **kwargs):  # how many tokens per stream were made before each piece came out
        for event in events(self, *args, **kwargs):
            if isinstance(event, Tokens):
                steps.append(event)
            yield event

    monkeypatch.setattr(Engine, "events", counting)
    ids, mask = encode_prompts(tokenizer, ["今日の天気", "犬"], kana_model)
    seen = []
    for head, row, text in stream(kana_model, tokenizer, ids, mask, compile=False, no_repeat_ngram_size=1,
                                  max_new_tokens=len(KANA)):
        seen.append((row, text, len(steps)))
    for row in (0, 1):
        mine = [(text, n) for r, text, n in seen if r == row]
        # one piece per token, each emitted at the step that produced it (TextStreamer holds kana back
        # until a space or the end)
        assert mine == [(k, i + 1) for i, k in enumerate(KANA)]
    texts = generate_text(kana_model, tokenizer, ["今日の天気", "犬"], compile=False, no_repeat_ngram_size=1,
                          max_new_tokens=len(KANA))
    assert texts == {"ja": [KANA, KANA]}


def test_stream_stops_at_eos(kana_model, tokenizer):
    eos = tokenizer._sp.piece_to_id(KANA[3])  # the 4th kana ends the stream
    ids, mask = encode_prompts(tokenizer, ["犬"], kana_model)
    pieces = [t for _, _, t in stream(kana_model, tokenizer, ids, mask, compile=False, no_repeat_ngram_size=1,
                                      max_new_tokens=len(KANA), eos_token_id=eos)]
    assert pieces == list(KANA[:3])


def test_stream_restores_training_mode(model, tokenizer):
    ids, mask = encode_prompts(tokenizer, TEXTS[:1], model)
    model.train()
    try:
        list(stream(model, tokenizer, ids, mask, compile=False, max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


def test_stream_bad_input(model, tokenizer):
    ids, mask = encode_prompts(tokenizer, TEXTS[:1], model)
    with pytest.raises(KeyError, match="'x', 'y'"):
        next(stream(model, tokenizer, ids, mask, heads=["nope"], compile=False))
    with pytest.raises(ValueError, match="top_p"):
        next(stream(model, tokenizer, ids, mask, compile=False, top_p=2.0))
