"""Multi-head generation against transformers' `generate` on the same weights, plus sampling
behaviour, per-head controls, compile health and bad input.

Every fresh head is an untied copy of the HF LM head, so each head's greedy output must equal
transformers' token for token. Compiled tests share one model and, where possible, one shape
bucket (3 heads x 4 prompts, cache length 64) and the greedy plan: each new graph costs 30-60 s
on this CPU. `torch._dynamo.explain` resets dynamo, so the explain tests come first in the file."""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import gpt2mh.inference.decode as dec
import gpt2mh.inference.engine as eng
from gpt2mh import MultiHeadGPT2

V, BOS, EOS, PAD, UNK = 1000, 1, 2, 3, 0
CFG = dict(vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=4,
           bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
HEADS = ["a", "b", "c"]
K = 12  # new tokens in the parity tests


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    """(transformers model, ours with 3 fresh heads), shared by the module; treat both as read-only."""
    hf, folder = hf_checkpoint(CFG)
    return hf, MultiHeadGPT2.from_pretrained(folder, heads=HEADS)


@pytest.fixture(scope="module")
def model(pair):
    return pair[1]


def prompts(B: int, T: int, pads=None, seed: int = 0):
    """(ids, mask): random non-special tokens, row b left-padded with pads[b] PADs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads or [0] * B):
        ids[b, :p], mask[b, :p] = PAD, 0
    return ids, mask


SINGLE = dict(B=1, T=9, pads=None, seed=1)
BATCH = dict(B=3, T=10, pads=[0, 3, 6], seed=2)  # different prompt lengths, left-padded


def hf_generate(hf, ids, mask, max_new_tokens=K, eos_token_id=EOS, **kw):
    """transformers' greedy continuation (the new tokens only)."""
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                          pad_token_id=PAD, eos_token_id=eos_token_id, **kw)
    return out[:, ids.shape[1]:]


def assert_heads_equal(out: dict, ref: torch.Tensor, heads=HEADS):
    assert list(out) == list(heads)
    for h in heads:
        assert out[h].dtype == torch.long
        assert torch.equal(out[h], ref), f"head {h}:\nours {out[h]}\nhf   {ref}"


def pick_eos(ref: torch.Tensor) -> int:
    """A token greedy decoding emits mid-generation in one row, later or never in another."""
    B, k = ref.shape
    for t in ref.flatten().unique().tolist():
        first = [int((row == t).nonzero()[0]) if (row == t).any() else k for row in ref]
        if any(1 <= f <= k - 3 for f in first) and max(first) > min(first):
            return t
    pytest.fail(f"no usable EOS candidate in the greedy output {ref}")


@pytest.fixture(scope="module")
def eos_case(pair):
    hf, _ = pair
    ids, mask = prompts(**BATCH)
    free = hf_generate(hf, ids, mask, eos_token_id=None)
    assert free.shape[1] == K and not (free == EOS).any()  # the model's EOS never fires here
    eos = pick_eos(free)
    ref = hf_generate(hf, ids, mask, eos_token_id=eos)
    # the case is meaningful: some row ends early and is padded after its EOS
    assert any((row == eos).any() and (row == eos).nonzero()[0] < ref.shape[1] - 1 for row in ref)
    return ids, mask, eos, ref


# ---- compile health (first: explain resets dynamo's caches) -------------------------------------
def explain_first_step(monkeypatch, model, ids, mask, **controls):
    """Run generate; at its first compiled step, explain `decode_one_token` on that step's real args."""
    seen = []

    def step(*args):
        if not seen:
            seen.append(torch._dynamo.explain(dec.decode_one_token)(*args))
        return dec.decode_one_token(*args)

    monkeypatch.setattr(eng, "compiled_decode_step", lambda device_type: step)
    model.generate(ids, mask, compile=True, **controls)
    assert seen, "generate never called the compiled step"
    return seen[0]


ALL_ON = dict(
    do_sample=True, temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, typical_p=0.95, repetition_penalty=1.2,
    no_repeat_ngram_size=3, bad_words_ids=[[7], [8, 9, 10]], min_new_tokens=2, max_new_tokens=6,
)


@pytest.mark.compile
@pytest.mark.parametrize("plan", ["greedy", "all_processors", "top_k_bounded"])
def test_decode_step_has_no_graph_breaks(monkeypatch, model, plan):
    ids, mask = prompts(**BATCH)
    if plan == "greedy":
        controls = dict(max_new_tokens=4)
    elif plan == "top_k_bounded":  # every sampling head has a top_k: the trimmed sampler (sampling.draw)
        controls = dict({k: v for k, v in ALL_ON.items() if k != "typical_p"},
                        per_head={"b": dict(do_sample=False), "c": dict(top_k=5)})
    else:  # every processor and warper on, and heads with different settings in one graph
        controls = dict(ALL_ON, per_head={"b": dict(do_sample=False, bad_words_ids=[[11]]),
                                          "c": dict(top_k=0, eos_token_id=[2, 5])})
    ex = explain_first_step(monkeypatch, model, ids, mask, seed=0, **controls)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


# ---- parity with transformers (greedy) ----------------------------------------------------------
@pytest.mark.parametrize("case", [SINGLE, BATCH], ids=["single", "left-padded-batch"])
def test_greedy_matches_hf_eager(pair, case):
    hf, ours = pair
    ids, mask = prompts(**case)
    ref = hf_generate(hf, ids, mask)
    assert ref.shape == (case["B"], K)
    assert_heads_equal(ours.generate(ids, mask, compile=False, max_new_tokens=K), ref)


@pytest.mark.compile
@pytest.mark.parametrize("case", [SINGLE, BATCH], ids=["single", "left-padded-batch"])
def test_greedy_matches_hf_compiled(pair, case):
    hf, ours = pair
    ids, mask = prompts(**case)
    ref = hf_generate(hf, ids, mask)
    out = ours.generate(ids, mask, compile=True, max_new_tokens=K)
    assert_heads_equal(out, ref)
    assert_heads_equal(ours.generate(ids, mask, compile=False, max_new_tokens=K), out["a"])


def test_greedy_eos_mid_generation_matches_hf_eager(pair, eos_case):
    ids, mask, eos, ref = eos_case
    assert_heads_equal(pair[1].generate(ids, mask, compile=False, max_new_tokens=K, eos_token_id=eos), ref)


@pytest.mark.compile
def test_greedy_eos_mid_generation_matches_hf_compiled(pair, eos_case):
    ids, mask, eos, ref = eos_case
    assert_heads_equal(pair[1].generate(ids, mask, compile=True, max_new_tokens=K, eos_token_id=eos), ref)


def test_eos_pads_only_finished_rows(pair, eos_case):
    ids, mask, eos, ref = eos_case
    out = pair[1].generate(ids, mask, compile=False, max_new_tokens=K, eos_token_id=eos)["a"]
    for row in out:
        hit = (row == eos).nonzero()
        if len(hit):
            assert (row[int(hit[0]) + 1:] == PAD).all()


@pytest.fixture(scope="module")
def free_batch(pair):
    """Greedy output without constraints, to pick bans and EOS ids that matter."""
    ids, mask = prompts(**BATCH)
    return ids, mask, hf_generate(pair[0], ids, mask, max_new_tokens=16)


def processor_cases(free):
    bad = [[int(free[0, 0])], [int(free[1, 2]), int(free[1, 3])]]  # a single token and a pair it emits
    early_eos = int(free[1, 0])  # greedy ends row 1 at once without min_new_tokens
    return {
        "repetition_penalty": dict(repetition_penalty=1.3),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
        "bad_words_ids": dict(bad_words_ids=bad),
        "min_new_tokens": dict(min_new_tokens=5, eos_token_id=early_eos),
        "several_eos": dict(eos_token_id=[int(free[0, 3]), int(free[2, 5])]),
        "all": dict(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=bad, min_new_tokens=4,
                    eos_token_id=early_eos),
    }


@pytest.mark.parametrize("name", ["repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                                  "min_new_tokens", "several_eos", "all"])
def test_greedy_processors_match_hf(pair, free_batch, name):
    hf, ours = pair
    ids, mask, free = free_batch
    kw = processor_cases(free)[name]
    ref = hf_generate(hf, ids, mask, max_new_tokens=16, **{"eos_token_id": EOS, **kw})
    if name != "min_new_tokens":
        assert not torch.equal(ref, free), f"{name} does not change the output: the case tests nothing"
    assert_heads_equal(ours.generate(ids, mask, compile=False, max_new_tokens=16, **kw), ref)


def test_min_new_tokens_case_is_meaningful(pair, free_batch):
    hf, _ = pair
    ids, mask, free = free_batch
    kw = processor_cases(free)["min_new_tokens"]
    without = hf_generate(hf, ids, mask, max_new_tokens=16, eos_token_id=kw["eos_token_id"])
    assert without[1, 0] == kw["eos_token_id"]  # without min_new_tokens row 1 stops at once


# ---- sampling through generate ------------------------------------------------------------------
def sample(model, ids, mask=None, **kw):
    return model.generate(ids, mask, compile=False, **{"do_sample": True, "max_new_tokens": 10, **kw})


def test_same_seed_same_output_different_seed_differs(model):
    ids, mask = prompts(**BATCH)
    a, b, c = (sample(model, ids, mask, seed=s) for s in (7, 7, 8))
    for h in HEADS:
        assert torch.equal(a[h], b[h])
        assert not torch.equal(a[h], c[h])
    assert not torch.equal(a["a"], a["b"])  # heads draw their own noise


def test_generator_is_reproducible_and_matches_seed(model):
    ids, mask = prompts(**BATCH)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x, y = sample(model, ids, mask, generator=g1), sample(model, ids, mask, generator=g2)
    z = sample(model, ids, mask, seed=5)
    for h in HEADS:
        assert torch.equal(x[h], y[h]) and torch.equal(x[h], z[h])
    # the generator advances: a second call with the same object continues the stream
    assert not torch.equal(sample(model, ids, mask, generator=g1)["a"], x["a"])


def test_sampling_does_not_touch_the_global_rng(model):
    ids, mask = prompts(**BATCH)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sample(model, ids, mask, seed=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_banned_tokens_never_sampled(model):
    ids, mask = prompts(**BATCH)
    banned = list(range(4, V // 2))
    out = sample(model, ids, mask, seed=0, temperature=2.0, max_new_tokens=20, min_new_tokens=20,
                 bad_words_ids=[[t] for t in banned] + [[UNK], [BOS]])
    for h in HEADS:
        assert out[h].shape == (3, 20)
        assert not torch.isin(out[h], torch.tensor(banned + [UNK, BOS])).any()


def test_max_new_tokens_per_head(model):
    ids, mask = prompts(**BATCH)
    lengths = {"a": 3, "b": 7, "c": 11}
    per_head = {h: dict(max_new_tokens=n, min_new_tokens=n) for h, n in lengths.items()}  # no early EOS
    out = sample(model, ids, mask, seed=0, per_head=per_head)
    assert {h: out[h].shape for h in HEADS} == {h: (3, n) for h, n in lengths.items()}


def test_min_new_tokens_holds_back_eos(model):
    ids, mask = prompts(B=4, T=6, seed=3)
    eos = list(range(4, V // 2))  # half the vocabulary ends a stream: EOS is likely at every step
    out = sample(model, ids, mask, seed=0, eos_token_id=eos, min_new_tokens=6, max_new_tokens=15,
                 num_return_sequences=2)
    for h in HEADS:
        is_eos = torch.isin(out[h], torch.tensor(eos))
        assert not is_eos[:, :6].any()
        assert is_eos.any(1).float().mean() > 0.5  # and EOS does fire once allowed (the test is live)
        free = sample(model, ids, mask, seed=0, eos_token_id=eos, max_new_tokens=15)[h]
        assert torch.isin(free[:, :6], torch.tensor(eos)).any()  # without it EOS comes early


def test_num_return_sequences_rows_in_hf_order(pair):
    hf, model = pair
    ids, mask = prompts(**BATCH)
    R = 3
    greedy = model.generate(ids, mask, compile=False, max_new_tokens=8, num_return_sequences=R)
    # transformers refuses greedy num_return_sequences > 1; its expansion is repeat_interleave of the prompts
    ref = hf_generate(hf, ids.repeat_interleave(R, 0), mask.repeat_interleave(R, 0), max_new_tokens=8)
    assert_heads_equal(greedy, ref)
    one = model.generate(ids, mask, compile=False, max_new_tokens=8)
    for h in HEADS:
        assert greedy[h].shape == (3 * R, 8)
        assert torch.equal(greedy[h], one[h].repeat_interleave(R, 0))  # prompt-major, R identical rows
    sampled = sample(model, ids, mask, seed=0, num_return_sequences=R, max_new_tokens=8)
    for h in HEADS:
        assert sampled[h].shape == (3 * R, 8)
        rows = sampled[h].view(3, R, 8)
        assert not torch.equal(rows[:, 0], rows[:, 1])  # sampled return sequences differ


def test_num_return_sequences_per_head(model):
    ids, mask = prompts(**BATCH)
    out = sample(model, ids, mask, seed=0, max_new_tokens=5, min_new_tokens=5,
                 per_head={"a": dict(num_return_sequences=2), "c": dict(num_return_sequences=4)})
    assert {h: out[h].shape for h in HEADS} == {"a": (6, 5), "b": (3, 5), "c": (12, 5)}


# ---- N heads, N settings, one call ---------------------------------------------------------------
PER_HEAD = {
    "a": dict(max_new_tokens=5),
    "b": dict(repetition_penalty=1.3, max_new_tokens=12),
    "c": dict(no_repeat_ngram_size=2, max_new_tokens=8),
}


def check_per_head_equals_single_calls(pair, compile: bool):
    hf, model = pair
    ids, mask = prompts(**BATCH)
    out = model.generate(ids, mask, compile=compile, per_head=PER_HEAD)
    for h, spec in PER_HEAD.items():
        alone = model.generate(ids, mask, heads=[h], compile=False, **spec)
        assert list(alone) == [h]
        assert torch.equal(out[h], alone[h]), f"head {h}: {out[h]} vs {alone[h]}"
        assert torch.equal(out[h], hf_generate(hf, ids, mask, **spec)), h  # fresh heads: HF's output too
        assert out[h].shape[1] <= spec["max_new_tokens"]
    assert out["a"].shape[1] == 5 and out["b"].shape[1] == 12


def test_heads_with_different_controls_equal_single_head_calls(pair):
    check_per_head_equals_single_calls(pair, compile=False)


@pytest.mark.compile
def test_heads_with_different_controls_equal_single_head_calls_compiled(pair):
    check_per_head_equals_single_calls(pair, compile=True)


def test_head_subset_and_order(model):
    ids, mask = prompts(**BATCH)
    full = model.generate(ids, mask, compile=False, max_new_tokens=6, do_sample=True, seed=0,
                          per_head={"c": dict(do_sample=False)})
    sub = model.generate(ids, mask, heads=["c", "a"], compile=False, max_new_tokens=6,
                         per_head={"c": dict(do_sample=False)})
    assert list(sub) == ["c", "a"]
    assert torch.equal(sub["c"], full["c"])


# ---- the seed memo's call, verbatim ---------------------------------------------------------------
@pytest.mark.compile
def test_seed_memo_call_works_as_written(model):
    input_ids = torch.randint(4, V, (2, 8), generator=torch.Generator().manual_seed(4))
    T = input_ids.shape[1]
    unk, bos, eos = UNK, BOS, EOS
    out = model.generate(input_ids, do_sample=True, temperature=1.5, top_p=0.95, top_k=40, max_length=T + 20,
                         bad_words_ids=[[unk], [bos], [eos]], pad_token_id=3, bos_token_id=1, eos_token_id=2,
                         num_return_sequences=2)
    assert list(out) == HEADS
    for h in HEADS:
        assert out[h].shape[0] == 4 and 1 <= out[h].shape[1] <= 20
        assert not torch.isin(out[h], torch.tensor([unk, bos])).any()
        for row in out[h]:  # [[eos]] is dropped from bad_words_ids as in HF: EOS may end a row
            hit = (row == eos).nonzero()
            if len(hit):
                assert (row[int(hit[0]) + 1:] == 3).all()


# ---- compiled step reuse ------------------------------------------------------------------------
@pytest.mark.compile
def test_new_prompt_length_and_batch_in_bucket_do_not_recompile(model):
    ids4, mask4 = prompts(B=4, T=12, pads=[0, 2, 4, 6], seed=5)
    model.generate(ids4, mask4, compile=True, max_new_tokens=K)  # warm (compiles at most once)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the counter is live: this process has compiled the step at least once
    ids3, mask3 = prompts(B=3, T=20, pads=[5, 0, 1], seed=6)  # same batch bucket (4) and cache bucket (64)
    out3 = model.generate(ids3, mask3, compile=True, max_new_tokens=30)
    out4 = model.generate(ids4[:, 2:], mask4[:, 2:], compile=True, max_new_tokens=20)
    assert counters["stats"]["unique_graphs"] == graphs, "a new prompt length or batch size recompiled"
    eager3 = model.generate(ids3, mask3, compile=False, max_new_tokens=30)
    eager4 = model.generate(ids4[:, 2:], mask4[:, 2:], compile=False, max_new_tokens=20)
    for h in HEADS:
        assert torch.equal(out3[h], eager3[h]) and torch.equal(out4[h], eager4[h])


# ---- bad input -----------------------------------------------------------------------------------
def test_unknown_head_lists_the_heads(model):
    ids, _ = prompts(B=1, T=4)
    with pytest.raises(KeyError, match=r"zz.*'a', 'b', 'c'"):
        model.generate(ids, heads=["a", "zz"], compile=False, max_new_tokens=2)
    with pytest.raises(KeyError, match="zz"):
        model.generate(ids, compile=False, max_new_tokens=2, per_head={"zz": {}})


@pytest.mark.parametrize("controls,name", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-2.0), "repetition_penalty"),
    (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(per_head={"b": dict(do_sample=True, temperature=0)}), "temperature"),
])
def test_out_of_range_controls_name_the_parameter(model, controls, name):
    ids, _ = prompts(B=1, T=4)
    with pytest.raises(ValueError, match=name):
        model.generate(ids, compile=False, max_new_tokens=2, **controls)


def test_unknown_control_is_rejected(model):
    ids, _ = prompts(B=1, T=4)
    with pytest.raises(TypeError, match="temprature"):
        model.generate(ids, compile=False, max_new_tokens=2, temprature=0.5)


def test_empty_prompt_starts_from_bos(pair):
    hf, model = pair
    out = model.generate(torch.zeros(1, 0, dtype=torch.long), compile=False, max_new_tokens=6)
    from_bos = model.generate(torch.tensor([[BOS]]), compile=False, max_new_tokens=6)
    ref = hf_generate(hf, torch.tensor([[BOS]]), torch.ones(1, 1, dtype=torch.long), max_new_tokens=6)
    for h in HEADS:
        assert out[h].shape == (1, 6)
        assert torch.equal(out[h], from_bos[h]) and torch.equal(out[h], ref)


def test_prompt_plus_new_tokens_beyond_context(model):
    ids, _ = prompts(B=1, T=100)
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(ids, compile=False, max_new_tokens=29)
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(ids, compile=False, per_head={"c": dict(max_new_tokens=40)}, max_new_tokens=5)
    assert model.generate(ids, compile=False, max_new_tokens=28)["a"].shape[1] <= 28  # 128 exactly fits


@pytest.mark.parametrize("max_new_tokens", [1, 3, 20], ids=["first-token", "short", "past-a-check"])
def test_non_finite_logits_raise_naming_the_head(model, max_new_tokens):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.heads[1].fill_(float("nan"))
    ids, mask = prompts(**BATCH)
    with pytest.raises(FloatingPointError, match=r"\['b'\]"):
        broken.generate(ids, mask, compile=False, max_new_tokens=max_new_tokens)
    ok = broken.generate(ids, mask, heads=["a", "c"], compile=False, max_new_tokens=3)  # others are fine
    assert list(ok) == ["a", "c"]


def test_generate_restores_training_mode(model):
    ids, _ = prompts(B=1, T=4)
    model.train()
    try:
        model.generate(ids, compile=False, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_decode_runs_without_autograd(model, monkeypatch):
    # With grad enabled the compiled step would become a training graph that saves a copy of the
    # KV cache every step (memory grows per token); decoding must run under no_grad.
    import gpt2mh.inference.engine as g

    seen = []
    real = g.decode_one_token

    def spy(*args):
        seen.append(torch.is_grad_enabled())
        return real(*args)

    monkeypatch.setattr(g, "decode_one_token", spy)
    assert torch.is_grad_enabled()
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, compile=False)
    assert seen and not any(seen)
