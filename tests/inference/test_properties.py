"""Property tests (issue 7), extending those beside the code they test:

- tokenizer: test_tokenizer.py checks any `st.text()` against transformers and the round trip over an
  alphabet the vocabulary knows; here any Unicode at all (lone surrogates included) never crashes,
  the round trip is normalisation wherever nothing is unknown, and decode(encode(.)) is idempotent;
- sampling: test_sampling.py checks the warpers on sampling streams; here random mixes of *every*
  control (greedy and sampling streams, n-gram bans, multi-token bad words, min_new_tokens) through
  `build_controls` + `process` + `sample`;
- generation (eager, tiny model): never longer than asked, never a banned token, no EOS before
  min_new_tokens, nothing but padding after EOS.
"""
from __future__ import annotations

import math
import unicodedata

import pytest
import torch
from helpers import process
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.inference.controls import SamplingConfig, build_controls
from gpt2mh.inference.sampling import sample
from gpt2mh.tokenizer import Tokenizer

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def normalised(text: str) -> str:
    # test_tokenizer.normalised (importing that module would import hironsan.corpus at collection):
    # lowercase, SentencePiece's nmt_nfkc (NFKC keeping "～"), whitespace runs collapsed and trimmed.
    nfkc = "～".join(unicodedata.normalize("NFKC", part) for part in text.lower().split("～"))
    return " ".join(nfkc.split())


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained()


# ---- tokenizer ---------------------------------------------------------------------------------------------
# Characters of the scripts users write (most are in rinna's vocabulary) and any character at all.
SCRIPTS = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),     # ASCII
    st.characters(min_codepoint=0x3000, max_codepoint=0x30FF),  # CJK punctuation, kana
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # kanji
    st.characters(min_codepoint=0xFF01, max_codepoint=0xFF9F),  # full- and half-width forms
    st.sampled_from(" \t\n\r\u3000\u00a0"),
)
ANY = st.characters(exclude_categories=("Cs",))  # every code point but the surrogates (hypothesis >= 6.1xx draws them by default)
TEXT = st.one_of(st.text(SCRIPTS, max_size=40), st.text(ANY, max_size=40), st.text(st.one_of(SCRIPTS, ANY), max_size=40))
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
ANY_TEXT = st.one_of(TEXT, st.text(st.one_of(SCRIPTS, ANY, SURROGATE), max_size=40))


@SETTINGS
@given(text=ANY_TEXT)
def test_encode_any_unicode_gives_ids_or_names_the_surrogate(tok, text):
    surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    try:
        ids = tok.encode(text)
    except ValueError as e:
        assert surrogate and "lone surrogate" in str(e)
        return
    assert not surrogate
    assert ids and ids[-1] == tok.eos_id and all(0 <= i < tok.vocab_size for i in ids)
    assert isinstance(tok.decode(ids), str) and isinstance(tok.decode(ids, skip_special_tokens=False), str)


@SETTINGS
@given(text=TEXT)
def test_round_trip_is_normalisation_and_idempotent(tok, text):
    ids = tok.encode(text)
    once = tok.decode(ids)
    twice = tok.decode(tok.encode(once))
    # an unknown character vanishes and can leave two spaces side by side; the text is stable otherwise
    assert " ".join(twice.split()) == " ".join(once.split())
    # a special token spelled in the text (any case: the tokenizer lowercases) is a token, not characters;
    # "</S>" alone encodes to [</s>], so looking for special ids before the final </s> does not catch it
    spelled = any(s.lower() in text.lower() for s in tok.special_tokens)
    # U+FFFD (bytes already lost upstream) is dropped by SentencePiece's normaliser, like an unknown
    plain = tok.unk_id not in ids and "▁" not in text and "\ufffd" not in text and not spelled
    if plain:  # every character known, no special token spelled out: exact
        assert once == normalised(text) and twice == once


@SETTINGS
@given(texts=st.lists(st.one_of(st.just(""), st.text(SCRIPTS, max_size=12)), min_size=1, max_size=5))
def test_batch_encode_is_left_padded_encode(tok, texts):
    ids, mask = tok.batch_encode(texts)
    for b, text in enumerate(texts):
        row = tok.encode(text)
        assert ids[b, mask[b].bool()].tolist() == row  # "" -> [</s>]: every row has at least one token
        assert mask[b, ids.shape[1] - len(row):].all() and not mask[b, : ids.shape[1] - len(row)].any()


@SETTINGS
@given(ids=st.lists(st.integers(0, 31999), max_size=30), skip=st.booleans())
def test_decode_any_ids(tok, ids, skip):
    assert isinstance(tok.decode(ids, skip_special_tokens=skip), str)


# ---- sampling: every control, any finite logits ------------------------------------------------------------
@st.composite
def sampling_configs(draw, V: int):
    token = st.integers(0, V - 1)
    max_new = draw(st.integers(1, 8))
    return SamplingConfig(
        do_sample=draw(st.booleans()),
        temperature=draw(st.floats(0.05, 5.0)),
        top_k=draw(st.integers(0, V + 2)),
        top_p=draw(st.floats(1e-3, 1.0)),
        min_p=draw(st.floats(0.0, 1.0)),
        typical_p=draw(st.floats(1e-3, 1.0)),
        repetition_penalty=draw(st.floats(0.1, 5.0)),
        no_repeat_ngram_size=draw(st.integers(0, 4)),
        bad_words_ids=tuple(draw(st.lists(st.lists(token, min_size=1, max_size=3).map(tuple), max_size=V))),
        min_new_tokens=draw(st.integers(0, max_new)),
        max_new_tokens=max_new,
        eos_token_id=tuple(draw(st.sets(token, min_size=1, max_size=2))),
        pad_token_id=draw(token),
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data(), V=st.integers(2, 24), S=st.integers(1, 6))
def test_every_control_gives_a_valid_distribution(data, V, S):
    configs = data.draw(st.lists(sampling_configs(V), min_size=1, max_size=3))
    which = data.draw(st.lists(st.integers(0, len(configs) - 1), min_size=S, max_size=S))
    floats = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
    logits = torch.tensor(data.draw(st.lists(st.lists(floats, min_size=V, max_size=V), min_size=S, max_size=S)))
    L = 8
    history = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, V - 1), min_size=L, max_size=L),
                                              min_size=S, max_size=S)))
    cur_len = data.draw(st.integers(1, L))
    step = torch.tensor(data.draw(st.integers(0, cur_len)))
    cur = torch.tensor(cur_len)

    c, plan = build_controls(configs, which, V, "cpu")
    out = process(logits.clone(), history, cur, step, c, plan)
    # the same streams made greedy: the processors alone (bans, penalty), no warper
    greedy = [cfg.replace(do_sample=False) for cfg in configs]
    gc, gplan = build_controls(greedy, which, V, "cpu")
    allowed = process(logits.clone(), history, cur, step, gc, gplan) > -math.inf
    noise = torch.empty(S, V).exponential_()
    picked = sample(out, noise, c)

    for s, i in enumerate(which):
        cfg = configs[i]
        support = out[s] > -math.inf
        if not allowed[s].any():  # the bans left nothing; generate raises for this (catalogue)
            assert not support.any()
            event("a stream with every token banned")
            continue
        probs = out[s].softmax(-1)
        assert torch.isfinite(out[s][support]).all() and torch.isfinite(probs).all()
        assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
        assert support.any() and not (support & ~allowed[s]).any()  # warpers only ever remove tokens
        assert support[picked[s]]
        if not cfg.do_sample:
            assert torch.equal(out[s], process(logits.clone(), history, cur, step, gc, gplan)[s])
        for word in cfg.bad_words_ids:
            if len(word) == 1 and word[0] not in cfg.eos_ids:  # HF never bans EOS through bad words
                assert not support[word[0]]
        if int(step) < cfg.min_new_tokens:
            assert not support[list(cfg.eos_ids)].any()


# ---- generation: length limits and bans -------------------------------------------------------------------
GV, GPAD, GEOS = 48, 3, 2
GHEADS = ["a", "b"]


@pytest.fixture(scope="module")
def model():
    cfg = GPT2Config(vocab_size=GV, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                     eos_token_id=GEOS, pad_token_id=GPAD)
    torch.manual_seed(0)
    return MultiHeadGPT2(cfg, GHEADS).eval()


@st.composite
def head_controls(draw):
    token = st.integers(0, GV - 1)
    max_new = draw(st.integers(1, 10))
    return dict(
        do_sample=draw(st.booleans()),
        temperature=draw(st.floats(0.2, 3.0)),
        top_k=draw(st.integers(0, 10)),
        top_p=draw(st.floats(0.2, 1.0)),
        repetition_penalty=draw(st.floats(0.5, 2.0)),
        no_repeat_ngram_size=draw(st.integers(0, 3)),
        bad_words_ids=draw(st.lists(st.lists(token, min_size=1, max_size=3), max_size=6)),
        min_new_tokens=draw(st.integers(0, max_new)),
        max_new_tokens=max_new,
        eos_token_id=draw(st.sampled_from([GEOS, [GEOS, 7]])),
        num_return_sequences=draw(st.integers(1, 2)),
    )


def contains_ending_in(seq: list[int], word: tuple[int, ...], start: int) -> bool:
    """`word` occurs in seq ending at a position >= start."""
    n = len(word)
    return any(tuple(seq[e - n + 1: e + 1]) == word for e in range(max(start, n - 1), len(seq)))


def repeated_ngram_ending_in(seq: list[int], n: int, start: int) -> bool:
    """An n-gram ending at a position >= start that also occurs earlier (HF's no_repeat_ngram_size)."""
    for e in range(max(start, n - 1), len(seq)):
        gram = tuple(seq[e - n + 1: e + 1])
        if any(tuple(seq[j - n + 1: j + 1]) == gram for j in range(n - 1, e)):
            return True
    return False


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), B=st.integers(1, 3), T=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_generation_respects_lengths_and_bans(model, data, B, T, seed):
    per_head = {h: data.draw(head_controls(), label=h) for h in GHEADS}
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, GV, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):  # left padding
        pads = data.draw(st.integers(0, T - 1))
        ids[b, :pads], mask[b, :pads] = GPAD, 0
    try:
        out = model.generate(ids, mask, compile=False, per_head=per_head, seed=seed)
    except ValueError as e:  # the bans left nothing to pick at some step: refused by name
        assert "every token is banned" in str(e)
        event("refused: every token banned")
        return
    for h, cfg in per_head.items():
        eos = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
        rows = out[h]
        assert rows.shape[0] == B * cfg["num_return_sequences"] and rows.shape[1] <= cfg["max_new_tokens"]
        assert ((rows >= 0) & (rows < GV)).all()
        for r, row in enumerate(rows.tolist()):
            ends = [k for k, t in enumerate(row) if t in eos]
            if ends:
                assert ends[0] >= cfg["min_new_tokens"]
                assert all(t == GPAD for t in row[ends[0] + 1:])  # pad after EOS
                row = row[: ends[0] + 1]
            else:  # no EOS: it ran to its limit
                assert len(row) == cfg["max_new_tokens"]
            seq = ids[r // cfg["num_return_sequences"]].tolist() + row  # the history generate sees
            for word in map(tuple, cfg["bad_words_ids"]):
                if len(word) == 1 and word[0] in eos:
                    continue  # HF never bans EOS through bad words
                assert not contains_ending_in(seq, word, T), (h, word, seq)
            if cfg["no_repeat_ngram_size"]:
                assert not repeated_ngram_ending_in(seq, cfg["no_repeat_ngram_size"], T), (h, seq)
