"""Scoring: log p(continuation | prompt) per head, against a plain full forward and against transformers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.inference.score import score_text
from gpt2mh.tokenizer import Tokenizer

V, PAD = 1000, 3
CFG = dict(vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
           pad_token_id=PAD)
HEADS = ["a", "b", "c"]
# Same model, same fp32 kernels, but the full forward sees every position and score only the ones
# that predict a target: sums of ~10 log-probs of size ~7 agree to ~1e-6.
SELF_ATOL = 1e-5
# transformers runs other (equivalent) kernels: per-token log-probs differ by ~1e-6 (see test_model.py).
HF_ATOL = 1e-4


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    hf, folder = hf_checkpoint(CFG)
    model = MultiHeadGPT2.from_pretrained(folder, heads=HEADS)
    with torch.no_grad():  # make heads b and c differ from the fresh copy a
        model.heads[1].add_(torch.randn_like(model.heads[1]) * 0.05)
        model.heads[2].mul_(-1.0)
    return hf, model


def batch(seed: int = 0):
    """Left-padded prompts and right-padded targets of different lengths."""
    g = torch.Generator().manual_seed(seed)
    B, T, U = 3, 9, 6
    ids = torch.randint(4, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    tgt = torch.randint(4, V, (B, U), generator=g)
    tmask = torch.ones(B, U, dtype=torch.long)
    for b, (p, q) in enumerate([(0, 0), (4, 2), (7, 5)]):  # left pads of the prompt, right pads of the target
        ids[b, :p], mask[b, :p] = PAD, 0
        tgt[b, U - q:], tmask[b, U - q:] = PAD, 0
    return ids, mask, tgt, tmask


def full_forward_scores(model, ids, mask, tgt, tmask) -> torch.Tensor:
    """(N, B) from logits of every position of prompt + target (the uncached training-style forward)."""
    T = ids.shape[1]
    with torch.no_grad():
        logp = model(torch.cat([ids, tgt], 1), torch.cat([mask, tmask], 1)).float().log_softmax(-1)  # (N,B,T+U,V)
    out = torch.zeros(logp.shape[0], ids.shape[0])
    for b in range(ids.shape[0]):
        for u in range(int(tmask[b].sum())):
            out[:, b] += logp[:, b, T + u - 1, tgt[b, u]]
    return out


def test_score_equals_full_forward_log_softmax(pair):
    _, model = pair
    ids, mask, tgt, tmask = batch()
    got = model.score(ids, mask, tgt, tmask)
    assert got.shape == (3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, full_forward_scores(model, ids, mask, tgt, tmask), atol=SELF_ATOL, rtol=0)
    assert not torch.allclose(got[0], got[1])  # the heads really differ


def test_fresh_head_equals_transformers_token_log_probs(pair):
    hf, model = pair
    ids, mask, tgt, tmask = batch(seed=1)
    got = model.score(ids, mask, tgt, tmask, heads=["a"])  # head a is the untouched copy of HF's LM head
    for b in range(3):
        prompt, target = ids[b][mask[b].bool()], tgt[b][tmask[b].bool()]
        seq = torch.cat([prompt, target])[None]
        with torch.no_grad():
            logp = F.log_softmax(hf(seq).logits[0].float(), -1)  # (P+U, V), no padding at all
        ref = logp[len(prompt) - 1:-1].gather(1, target[:, None]).sum()
        torch.testing.assert_close(got[0, b], ref, atol=HF_ATOL, rtol=0)


def test_head_selection_order_and_defaults(pair):
    _, model = pair
    ids, mask, tgt, tmask = batch()
    every = model.score(ids, mask, tgt, tmask)
    sub = model.score(ids, mask, tgt, tmask, heads=["c", "a"])
    torch.testing.assert_close(sub, every[[2, 0]], atol=SELF_ATOL, rtol=0)
    # no masks: every prompt and target token is real
    torch.testing.assert_close(model.score(ids, None, tgt), model.score(ids, torch.ones_like(mask), tgt,
                                                                        torch.ones_like(tmask)))


def test_padding_does_not_change_a_row(pair):
    _, model = pair
    ids, mask, tgt, tmask = batch()
    alone = model.score(ids[2:, 7:], None, tgt[2:, :1])  # row 2 unpadded: 2 prompt tokens, 1 target
    torch.testing.assert_close(model.score(ids, mask, tgt, tmask)[:, 2:], alone, atol=SELF_ATOL, rtol=0)


def test_score_is_deterministic_in_training_mode(pair):
    _, model = pair
    ids, mask, tgt, tmask = batch()
    ref = model.score(ids, mask, tgt, tmask)
    model.train()  # dropout (p=0.1 in this config) must not leak into scores
    try:
        got = model.score(ids, mask, tgt, tmask)
        assert model.training  # and the mode is given back
    finally:
        model.eval()
    torch.testing.assert_close(got, ref, atol=SELF_ATOL, rtol=0)


def test_bad_input(pair):
    _, model = pair
    ids, mask, tgt, tmask = batch()
    with pytest.raises(ValueError, match="continuations"):
        model.score(ids, mask, tgt[:2], tmask[:2])
    with pytest.raises(ValueError, match="n_positions"):
        model.score(torch.randint(4, V, (1, 120)), None, torch.randint(4, V, (1, 9)))
    with pytest.raises(KeyError, match="'a', 'b', 'c'"):
        model.score(ids, mask, tgt, tmask, heads=["zz"])


# ---- text in: the real tokenizer with a vocab-32000 tiny model --------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained()  # rinna's packaged sentencepiece model


@pytest.fixture(scope="module")
def kana_model(tokenizer):
    """Head "ja" prefers a few kana (whatever the input), head "flat" is uniform over the vocabulary."""
    cfg = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=128, n_embd=32, n_layer=1, n_head=4, n_inner=64,
                     bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(0)
    model = MultiHeadGPT2(cfg, ["ja", "flat"]).eval()
    kana = [tokenizer.encode(k, add_eos=False)[-1] for k in "のはが"]
    with torch.no_grad():
        ln = model.transformer.ln_f
        ln.weight.zero_()
        ln.bias.zero_()
        ln.bias[0] = 1.0  # every hidden state is e_0: logits = heads[:, 0, :]
        model.heads.zero_()
        model.heads[0, 0, kana] = 8.0
    return model


def test_score_text_runs_and_ranks(tokenizer, kana_model):
    inputs = ["今日の天気は", "今日の天気は", "今日の天気は"]
    conts = ["のは", "犬犬", "のはが"]  # the first two are 4 tokens each: ▁ x y </s>
    out = score_text(kana_model, tokenizer, inputs, conts)
    assert list(out) == ["ja", "flat"] and all(len(v) == 3 for v in out.values())
    assert all(isinstance(x, float) and x < 0 for v in out.values() for x in v)
    ja, flat = out["ja"], out["flat"]
    assert ja[0] > ja[1] and flat[0] == pytest.approx(flat[1])  # the kana head ranks kana over kanji
    # the uniform head: every token costs log V, so only the token count ranks
    n_tokens = [len(tokenizer.encode(c)) for c in conts]
    torch.testing.assert_close(torch.tensor(flat), -torch.tensor(n_tokens, dtype=torch.float) *
                               torch.log(torch.tensor(float(tokenizer.vocab_size))), atol=1e-4, rtol=0)
    # the same as scoring the encoded ids by hand (prompt format: input </s>, target </s>)
    ids = torch.tensor([tokenizer.encode(inputs[0])])
    tgt = torch.tensor([tokenizer.encode(conts[2])])
    torch.testing.assert_close(kana_model.score(ids, None, tgt)[:, 0], torch.tensor([ja[2], flat[2]]),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="continuations"):
        score_text(kana_model, tokenizer, inputs, conts[:2])
