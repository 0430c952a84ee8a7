"""The data-set engine: stream slots, admission, per-stream retirement, shared prompt rows.

- Greedy ids of every head equal generating each input alone, fp32, whatever the slot count, the
  admission order and the rows that share the slots (slot counts small enough to force many
  admissions and retirements).
- A sampled row depends only on the seed, its input (key) and its controls, never on its neighbours.
- Memory: the cache shapes are the slot layout's, whatever the number of inputs.
- Requests may name their own heads and controls and still share the slots.
- A server's engine: a source that says IDLE keeps the loop alive; cancel retires an input, live or
  waiting, and frees its slots.
"""
from __future__ import annotations

import random
import threading

import pytest
import torch

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.inference.cache import SlotCache
from gpt2mh.inference.controls import SamplingConfig
from gpt2mh.inference.engine import CANCELLED, IDLE, Engine, Request, Result, Tokens, group_sizes

V, EOS, PAD = 211, 2, 3
STOP = tuple(range(2, 60, 3))  # many end-of-stream ids: streams end at different steps
CFG = GPT2Config(vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=EOS,
                 pad_token_id=PAD)
HEADS = ["label", "span", "tags"]
BUDGET = {"label": 3, "span": 7, "tags": 15}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MultiHeadGPT2(CFG, HEADS).eval()
    with torch.no_grad():  # distinct heads
        m.heads.add_(0.5 * torch.randn_like(m.heads))
    return m


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = random.Random(seed)
    return [[g.randrange(4, V) for _ in range(g.randint(1, 20))] for _ in range(n)]


def configs(**controls) -> dict[str, SamplingConfig]:
    return {h: SamplingConfig(max_new_tokens=BUDGET[h], eos_token_id=STOP, pad_token_id=PAD, **controls)
            for h in HEADS}


def run(model, ps, cfgs, order=None, seed=0, **engine_kw) -> dict:
    order = list(range(len(ps))) if order is None else order
    engine = Engine(model, HEADS, budgets=BUDGET, prompt_len=8, gen_len=4, **engine_kw)
    out = {}
    for r in engine.run(Request(i, ps[i], cfgs, seed, i) for i in order):
        assert r.error is None, r.error
        out[r.key] = r.tokens
    return out


def alone(model, ps, cfgs, seed=0) -> dict:
    return {i: _alone_one(model, p, i, cfgs, seed) for i, p in enumerate(ps)}


def _alone_one(model, p, key, cfgs, seed):
    engine = Engine(model, HEADS, slots={h: 1 for h in HEADS}, prompt_len=len(p), gen_len=max(BUDGET.values()))
    (r,) = list(engine.run([Request(key, p, cfgs, seed, key)]))
    return r.tokens


@pytest.mark.parametrize("slots, shuffle", [(3, 0), (4, 1), (7, 2), (12, 3), (64, 4)])
def test_greedy_equals_each_input_alone_in_any_admission_order(model, slots, shuffle):
    ps, cfgs = prompts(30), configs()
    order = list(range(len(ps)))
    random.Random(shuffle).shuffle(order)
    got = run(model, ps, cfgs, order, slots=slots)
    ref = alone(model, ps, cfgs)
    assert got == ref
    lengths = {len(got[i][h][0]) for i in got for h in HEADS}
    assert len(lengths) > 3  # streams really ended at different steps (EOS and budgets)


def test_greedy_equals_generate_on_the_batch(model):
    # the same engine behind model.generate: each row of a padded batch as its own input
    ps, cfgs = prompts(9, seed=5), configs()
    T = max(map(len, ps))
    ids = torch.tensor([[PAD] * (T - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ps])
    out = model.generate(ids, mask, per_head={h: dict(max_new_tokens=BUDGET[h]) for h in HEADS}, compile=False,
                         eos_token_id=list(STOP))
    ref = alone(model, ps, cfgs)
    for h in HEADS:
        for i in range(len(ps)):
            row = out[h][i].tolist()
            assert row[: len(ref[i][h][0])] == ref[i][h][0]


@pytest.mark.parametrize("controls", [
    dict(do_sample=True, temperature=1.3, top_k=20),
    dict(do_sample=True, top_p=0.8, repetition_penalty=1.3),
    dict(do_sample=True, typical_p=0.9, no_repeat_ngram_size=2, num_return_sequences=2),
])
def test_a_sampled_row_depends_on_its_seed_input_and_controls_only(model, controls):
    ps, cfgs = prompts(24, seed=2), configs(**controls)
    R = cfgs["label"].num_return_sequences
    kw = dict(returns={h: R for h in HEADS})
    a = run(model, ps, cfgs, seed=11, slots=5 * R, **kw)
    order = list(range(len(ps)))[::-1]
    b = run(model, ps, cfgs, order, seed=11, slots=13 * R, **kw)
    assert a == b
    c = run(model, ps[:7], cfgs, seed=11, slots=40 * R, **kw)  # other neighbours
    assert {i: a[i] for i in c} == c
    d = run(model, ps, cfgs, seed=12, slots=5 * R, **kw)
    assert d != a  # the seed matters
    if R > 1:
        assert any(a[i][h][0] != a[i][h][1] for i in a for h in HEADS)  # return sequences differ


def test_memory_is_the_slot_layouts_not_the_inputs(model):
    shapes = []
    for n in (5, 200):
        engine = Engine(model, HEADS, slots=6, budgets=BUDGET, prompt_len=20, gen_len=15)
        seen = []
        for _ in engine.events(Request(i, p, configs(), 0, i) for i, p in enumerate(prompts(n, seed=n))):
            cache = model.transformer.h[0].attn.kv_cache
            assert isinstance(cache, SlotCache)
            seen.append(tuple(t.shape for t in (cache.k_prompt, cache.k_gen, engine.state.history)))
        shapes.append(set(seen))
    assert shapes[0] == shapes[1] and len(shapes[0]) == 1


def test_group_sizes_follow_the_token_budgets():
    assert group_sizes(HEADS, 25, [1, 1, 1], BUDGET) == [3, 7, 15]
    assert group_sizes(HEADS, 3, [1, 1, 1], BUDGET) == [1, 1, 2]  # every head can hold one input
    assert group_sizes(HEADS, {"label": 2, "span": 2, "tags": 9}, [1, 1, 1], None) == [2, 2, 9]
    with pytest.raises(ValueError, match="cannot hold 2 return sequences"):
        group_sizes(HEADS, {"label": 1, "span": 2, "tags": 2}, [2, 1, 1], None)


def test_requests_name_their_own_heads_and_controls(model):
    ps = prompts(12, seed=9)
    mixed = []
    for i, p in enumerate(ps):
        heads = HEADS[: 1 + i % 3]
        mixed.append(Request(i, p, {h: configs()[h] for h in heads}, 0, i))
    mixed[4].configs["span"] = mixed[4].configs["span"].replace(max_new_tokens=2)
    engine = Engine(model, HEADS, slots=5, budgets=BUDGET, prompt_len=8, gen_len=4)
    got = {r.key: r.tokens for r in engine.run(mixed)}
    for i, req in enumerate(mixed):
        assert set(got[i]) == set(req.configs)
        ref = _alone_one(model, req.ids, i, req.configs, 0)
        ref = {h: ref[h] for h in req.configs}
        assert got[i] == ref
    assert len(got[4]["span"][0]) <= 2


def test_a_refused_input_does_not_stop_the_others(model):
    ps = prompts(6, seed=4)
    ps[2] = list(range(4, 4 + CFG.n_positions))  # no room left for any new token
    engine = Engine(model, HEADS, slots=4, budgets=BUDGET)
    results = {r.key: r for r in engine.run(Request(i, p, configs(), 0, i) for i, p in enumerate(ps))}
    assert isinstance(results[2], Result) and "exceeds the model's context" in results[2].error
    assert all(results[i].error is None and set(results[i].tokens) == set(HEADS) for i in results if i != 2)


def test_an_idle_source_keeps_the_loop_going_and_changes_no_output(model):
    ps, cfgs = prompts(10, seed=6), configs()
    engine = Engine(model, HEADS, slots=4, budgets=BUDGET, prompt_len=8, gen_len=4)
    idle_asks = []

    def source():  # IDLE between requests, and several times while the engine has nothing at all
        for i, p in enumerate(ps):
            for _ in range(3):
                idle_asks.append(engine.idle)
                yield IDLE
            yield Request(i, p, cfgs, 0, i)

    got = {r.key: r.tokens for r in engine.run(source())}
    assert got == alone(model, ps, cfgs)
    assert True in idle_asks and False in idle_asks  # asked when idle (a server blocks then) and when busy
    assert engine.idle and engine.busy == 0


def test_cancel_retires_live_and_waiting_inputs_and_frees_their_slots(model):
    ps, cfgs = prompts(12, seed=8), configs(min_new_tokens=3)
    engine = Engine(model, HEADS, slots=3, budgets=BUDGET, prompt_len=8, gen_len=4)  # about one input at a time
    results, busy = {}, []
    for event in engine.events(Request(i, p, cfgs, 0, i) for i, p in enumerate(ps)):
        if isinstance(event, Tokens) and 0 in {k for k, *_ in event.items} and 0 not in results:
            canceller = threading.Thread(target=lambda: [engine.cancel(k) for k in (0, 5, 99)])  # 99: unknown
            canceller.start()
            canceller.join()
            results[0] = None
        elif isinstance(event, Result):
            results[event.key] = event
        busy.append(engine.busy)
    assert results[0].error == CANCELLED and results[5].error == CANCELLED  # live, and waiting
    assert results[0].tokens == {} and results[0].prompt_tokens == len(ps[0])
    ref = alone(model, ps, cfgs)
    assert {k: r.tokens for k, r in results.items() if k not in (0, 5)} == {k: ref[k] for k in ref if k not in (0, 5)}
    assert engine.busy == 0 and engine.idle and max(busy) <= engine.S


@pytest.mark.parametrize("controls", [{}, {"do_sample": True, "top_p": 0.9, "repetition_penalty": 1.2}])
def test_a_quiet_engine_decodes_only_its_live_slots(model, monkeypatch, controls):
    # 5 inputs in 64 slots, arriving one at a time: each step decodes the front of each head group
    # (slots are handed out lowest first) and the prompt rows in use, not all 64; outputs as alone
    import gpt2mh.inference.engine as eng

    rows = []
    real = eng.decode_one_token

    def step(model, fixed, state, controls, plan):
        rows.append(state.tok.shape[0])
        return real(model, fixed, state, controls, plan)

    monkeypatch.setattr(eng, "decode_one_token", step)
    ps, cfgs = prompts(5, seed=11), configs(**controls)
    got = run(model, ps, cfgs, slots=64, prefill_batch=1, seed=3)
    assert got == alone(model, ps, cfgs, seed=3)
    assert max(rows) < 64 and min(rows) <= 3, rows  # never the whole 64; one live stream per head: 3 rows
