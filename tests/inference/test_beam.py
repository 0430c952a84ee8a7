"""Beam search per head against transformers' `generate(num_beams=...)`: token ids exactly, scores
within fp32 tolerance, for padded batches, 1-5 beams, every early_stopping value, length penalties,
num_return_sequences 1..num_beams, with and without processors; three heads searching with different
settings in one call, each against its own exported transformers model; the engine's slots.

The random model uses initializer_range=0.3: with HF's 0.02 a tiny random GPT-2 repeats one token
whatever the search, and beam search would equal greedy (a test that could not fail)."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2mh import MultiHeadGPT2
from gpt2mh.weights.export import export_hf

V, BOS, EOS, PAD = 1000, 1, 2, 3
CFG = dict(vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=BOS, eos_token_id=EOS,
           pad_token_id=PAD, initializer_range=0.3)
HEADS = ["a", "b", "c"]
K = 10  # new tokens


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    hf, folder = hf_checkpoint(CFG)
    return hf, MultiHeadGPT2.from_pretrained(folder, heads=HEADS)


def batch(B=3, T=10, pads=(0, 3, 6), seed=2):
    ids = torch.randint(4, V, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads[:B]):
        ids[b, :p], mask[b, :p] = PAD, 0
    return ids, mask


def hf_beams(hf, ids, mask, **kw):
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, max_new_tokens=K,
                          output_scores=True, return_dict_in_generate=True, **kw)
    new = out.sequences[:, ids.shape[1]:]
    if kw.get("num_beams", 1) > 1:
        ts = hf.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
        return new, ts, out.sequences_scores
    return new, hf.compute_transition_scores(out.sequences, out.scores, normalize_logits=True), None


@pytest.fixture(scope="module")
def eos_ids(pair):
    """Two ids the greedy and beam outputs emit mid-generation, so hypotheses end at different steps
    (the model's own EOS never fires in a random model: with it alone early stopping is never tested)."""
    hf, _ = pair
    ids, mask = batch()
    free, _, _ = hf_beams(hf, ids, mask, num_beams=4, eos_token_id=None)
    counts = torch.bincount(free[:, 1:-2].flatten(), minlength=V)
    first, second = counts.topk(2).indices.tolist()
    return first, second


def check(ours_out, ref, head="a", scores=True, eos=()):
    seq, ts, ss = ref
    out = ours_out[head]
    assert torch.equal(out.sequences, seq), f"ours\n{out.sequences}\nhf\n{seq}"
    if scores:
        # HF's greedy scores go on after a row's EOS (the pad's log-prob); ours are 0 there, as HF's beams
        ended = torch.isin(seq, torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos]))
        after = (ended.long().cumsum(1) - ended.long()) > 0  # past the row's first EOS
        assert (out.transition_scores[after] == 0).all()
        torch.testing.assert_close(out.transition_scores.masked_fill(after, 0), ts.masked_fill(after, 0),
                                   atol=2e-5, rtol=1e-5)
        if ss is not None:
            torch.testing.assert_close(out.sequences_scores, ss, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("num_beams", [1, 2, 3, 4, 5])
def test_beam_search_matches_hf(pair, eos_ids, num_beams, early_stopping):
    hf, ours = pair
    ids, mask = batch()
    cases = 0
    for length_penalty in (0.5, 1.0, 2.0):
        for eos in (eos_ids[0], list(eos_ids)):
            for R in range(1, num_beams + 1):
                kw = dict(num_beams=num_beams, early_stopping=early_stopping, length_penalty=length_penalty,
                          num_return_sequences=R, eos_token_id=eos)
                ref = hf_beams(hf, ids, mask, **kw)
                out = ours.generate(ids, mask, heads=["a"], compile=False, max_new_tokens=K, output_scores=True,
                                    return_dict_in_generate=True, **kw)
                check(out, ref, eos=eos)
                cases += 1
    assert cases == 3 * 2 * num_beams


def test_cases_are_meaningful(pair, eos_ids):
    # beams differ from greedy, hypotheses end at different lengths, length penalties change the winner
    hf, _ = pair
    ids, mask = batch()
    greedy = hf_beams(hf, ids, mask, eos_token_id=eos_ids[0])[0]
    beams = {lp: hf_beams(hf, ids, mask, num_beams=4, eos_token_id=eos_ids[0], length_penalty=lp)[0]
             for lp in (0.5, 2.0)}
    assert not torch.equal(greedy, beams[2.0][:, :greedy.shape[1]]) or greedy.shape != beams[2.0].shape
    lengths = {int((row != PAD).sum()) for b in beams.values() for row in b}
    assert len(lengths) > 1, "every hypothesis has the same length: EOS never ends one early"
    assert not torch.equal(beams[0.5], beams[2.0]) or beams[0.5].shape != beams[2.0].shape


def processor_cases(plain):
    """Settings that change this batch's beam output (checked below), from its unconstrained output."""
    return {
        "repetition_penalty": dict(repetition_penalty=1.5),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=1),
        "bad_words_ids": dict(bad_words_ids=[[int(plain[0, 0])], [int(plain[2, 0]), int(plain[2, 1])]]),
        "min_new_tokens": dict(min_new_tokens=6),
    }


@pytest.mark.parametrize("name", ["repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_new_tokens"])
def test_beam_search_with_processors_matches_hf(pair, eos_ids, name):
    hf, ours = pair
    ids, mask = batch(pads=(0, 0, 0))  # HF's repetition penalty also sees left padding (ours never does)
    plain = hf_beams(hf, ids, mask, num_beams=3, num_return_sequences=2, eos_token_id=eos_ids[0])[0]
    kw = dict(num_beams=3, num_return_sequences=2, eos_token_id=eos_ids[0], **processor_cases(plain)[name])
    ref = hf_beams(hf, ids, mask, **kw)
    assert not torch.equal(ref[0], plain) or ref[0].shape != plain.shape, f"{name} changes nothing here"
    check(ours.generate(ids, mask, heads=["b"], compile=False, max_new_tokens=K, output_scores=True,
                      return_dict_in_generate=True, **kw), ref, head="b", eos=eos_ids[0])


def test_greedy_and_sampled_transition_scores(pair, eos_ids):
    hf, ours = pair
    ids, mask = batch()
    ref = hf_beams(hf, ids, mask, eos_token_id=eos_ids[0])
    check(ours.generate(ids, mask, compile=False, max_new_tokens=K, eos_token_id=eos_ids[0], output_scores=True,
                        return_dict_in_generate=True), ref, eos=eos_ids[0])
    # sampling: the log-prob of the drawn token under the warped distribution (temperature, top-k),
    # recomputed from transformers' logits of the unpadded row 0
    out = ours.generate(ids[:1], mask[:1], heads=["a"], compile=False, max_new_tokens=K, do_sample=True, top_k=20,
                        temperature=0.7, seed=1, eos_token_id=None, output_scores=True,
                        return_dict_in_generate=True)["a"]
    with torch.no_grad():
        logits = hf(torch.cat([ids[:1], out.sequences], 1)).logits[0, ids.shape[1] - 1:-1] / 0.7  # (K, V)
    logits = logits.masked_fill(logits < logits.topk(20).values[:, -1:], float("-inf"))
    want = logits.log_softmax(-1).gather(1, out.sequences[0][:, None])[:, 0]
    torch.testing.assert_close(out.transition_scores[0], want, atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def distinct(pair, tmp_path_factory):
    """Ours with three different heads, and each head exported as its own transformers model."""
    _, ours = pair
    model = type(ours)(ours.config, HEADS)
    model.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.heads.add_(torch.randn(model.heads.shape, generator=g) * 0.3)
    model.eval()
    root = tmp_path_factory.mktemp("beam_heads")
    return model, {h: GPT2LMHeadModel.from_pretrained(export_hf(model, h, root / h, tokenizer=False)).eval() for h in HEADS}


PER_HEAD = {"a": dict(num_beams=4, num_return_sequences=2, length_penalty=2.0, early_stopping=True),
            "b": dict(num_beams=1),
            "c": dict(num_beams=3, early_stopping="never", length_penalty=0.5, no_repeat_ngram_size=2)}


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.compile)])
def test_three_heads_search_differently_in_one_call(distinct, eos_ids, compile):
    model, hf = distinct
    ids, mask = batch()
    out = model.generate(ids, mask, compile=compile, per_head=PER_HEAD, max_new_tokens=K, eos_token_id=eos_ids[0],
                         output_scores=True, return_dict_in_generate=True)
    for h, kw in PER_HEAD.items():
        check(out, hf_beams(hf[h], ids, mask, eos_token_id=eos_ids[0], **kw), head=h, eos=eos_ids[0])
    assert not torch.equal(out["a"].sequences[::2], out["c"].sequences[:, :out["a"].sequences.shape[1]])


def test_beams_in_few_slots_equal_each_input_alone(pair, eos_ids):
    # 12 inputs through 8 slots: blocks are reused, stale finished hypotheses must not leak
    _, ours = pair
    ids, mask = batch(B=12, pads=(0, 3, 6, 1, 0, 2, 5, 0, 4, 0, 7, 1), seed=5)
    kw = dict(per_head={"a": dict(num_beams=4, num_return_sequences=2), "b": dict(num_beams=2),
                        "c": dict(num_beams=1, do_sample=True)},
              max_new_tokens=K, eos_token_id=eos_ids[0], compile=False, seed=3)
    together = ours.generate(ids, mask, slots=8, **kw)
    for b in range(12):
        alone = ours.generate(ids[b:b + 1, mask[b].bool()], None, **kw)
        for h, R in (("a", 2), ("b", 1)):
            w = alone[h].shape[1]
            assert torch.equal(together[h][b * R:(b + 1) * R, :w], alone[h]), (b, h)


def test_beam_sampling_is_seeded_and_scored(pair):
    _, ours = pair
    ids, mask = batch()
    kw = dict(heads=["a"], compile=False, max_new_tokens=K, do_sample=True, num_beams=3, num_return_sequences=3,
              output_scores=True, return_dict_in_generate=True, length_penalty=1.0)
    a, b, c = (ours.generate(ids, mask, seed=s, **kw)["a"] for s in (1, 1, 2))
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    lengths = (a.transition_scores != 0).sum(1).float()
    torch.testing.assert_close(a.sequences_scores, a.transition_scores.sum(1) / lengths, atol=1e-4, rtol=1e-5)
    best_first = a.sequences_scores.view(3, 3)
    assert (best_first[:, :-1] >= best_first[:, 1:]).all()


@pytest.mark.parametrize("bad, name", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty"),
])
def test_bad_beam_settings_name_the_parameter(pair, bad, name):
    with pytest.raises(ValueError, match=name):
        pair[1].generate(*batch(), max_new_tokens=3, **bad)


def test_streaming_a_beam_search_is_refused(hf_checkpoint):
    from gpt2mh import stream
    from gpt2mh.tokenizer import Tokenizer
    _, folder = hf_checkpoint({**CFG, "vocab_size": 32000})
    model = MultiHeadGPT2.from_pretrained(folder, heads=HEADS)
    with pytest.raises(ValueError, match="num_beams"):
        list(stream(model, Tokenizer("tests/fixtures/rinna/spiece.model"), *batch(), num_beams=2, max_new_tokens=3))


def test_cancelling_a_search_frees_its_block(pair):
    # the block of a cancelled search is reused by the next input, whose search is then what it is alone
    from gpt2mh.inference.engine import CANCELLED, Engine, Request, Result, Tokens
    from gpt2mh.inference.request import call_configs

    _, ours = pair
    ids, _ = batch(B=5, pads=(0,) * 5, seed=9)
    controls = {"max_new_tokens": 8, "eos_token_id": EOS, "pad_token_id": PAD}
    per_head = {"a": {"num_beams": 3, "num_return_sequences": 2}, "b": {}}
    names, cfgs = call_configs(ours, ["a", "b"], controls, per_head)
    engine = Engine(ours, names, slots={"a": 3, "b": 1}, returns={"a": 2, "b": 1}, beams={"a": 3, "b": 1},
                    prompt_len=16, gen_len=8)  # one block: one search at a time
    results = {}
    for event in engine.events(Request(i, row.tolist(), dict(zip(names, cfgs)), 0, i) for i, row in enumerate(ids)):
        if isinstance(event, Tokens) and any(k == 0 for k, *_ in event.items) and 0 not in results:
            engine.cancel(0)
            results[0] = None
        elif isinstance(event, Result):
            results[event.key] = event
    assert results[0].error == CANCELLED and engine.idle and not engine.block_live
    for i in range(1, 5):
        alone = ours.generate(ids[i:i + 1], None, heads=names, per_head=per_head, compile=False, **controls)
        for h in names:
            got = results[i].tokens[h]
            assert [alone[h][r, :len(got[r])].tolist() for r in range(len(got))] == got, (i, h)


@pytest.mark.slow
def test_rinna_small_shape_beam_search_matches_hf(hf_checkpoint):
    # rinna/japanese-gpt2-small's shape (random weights): a padded batch, 3 beams, 2 returns, one EOS
    cfg = dict(vocab_size=32000, n_positions=1024, n_embd=768, n_layer=12, n_head=12, bos_token_id=BOS,
               eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.05)
    hf, folder = hf_checkpoint(cfg)
    ours = MultiHeadGPT2.from_pretrained(folder, heads=["a"])
    ids = torch.randint(4, 32000, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = PAD, 0
    free = hf_beams(hf, ids, mask, num_beams=3, eos_token_id=None)[0]
    eos = int(free[0, 3])  # a token the search emits: hypotheses end early
    for kw in (dict(num_beams=3, num_return_sequences=2, eos_token_id=eos),
               dict(num_beams=4, length_penalty=0.5, early_stopping="never", eos_token_id=eos)):
        check(ours.generate(ids, mask, compile=False, max_new_tokens=K, output_scores=True,
                            return_dict_in_generate=True, **kw), hf_beams(hf, ids, mask, **kw), eos=eos)
