"""Sampling controls vs transformers' real logits processors, row by row, plus sampling statistics."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import process
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from gpt2mh.inference.controls import Plan, SamplingConfig, build_controls
from gpt2mh.inference.sampling import (
    draw,
    has_nonfinite,
    noise_width,
    processors,
    sample,
)

V, L, EOS, PAD = 40, 24, 3, 0


def hf_processors(cfg: SamplingConfig, prompt_len: int) -> LogitsProcessorList:
    """What GenerationMixin._get_logits_processor (transformers 4.57.6) builds for this config."""
    eos = list(cfg.eos_ids)
    procs = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(cfg.repetition_penalty)))
    if cfg.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.bad_words_ids:
        procs.append(NoBadWordsLogitsProcessor([list(w) for w in cfg.bad_words_ids], eos))
    if cfg.min_new_tokens > 0 and eos:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, cfg.min_new_tokens, eos))
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(cfg.temperature)))
        if cfg.top_k != 0:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p))
        if cfg.min_p > 0:  # our 0.0 is HF's None
            procs.append(MinPLogitsWarper(cfg.min_p))
        if cfg.typical_p < 1.0:
            procs.append(TypicalLogitsWarper(cfg.typical_p))
    return procs


def make_inputs(S: int, cur_len: int, seed: int, hist_vocab: int = 6):
    """Random logits (odd rows rounded to 0.5: ties) and histories drawn from a few tokens (so n-grams
    repeat); garbage after cur_len."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(S, V, generator=g) * 3
    scores[1::2] = (scores[1::2] * 2).round() / 2
    history = torch.randint(0, hist_vocab, (S, L), generator=g)
    history[:, cur_len:] = torch.randint(-5, 10**6, (S, L - cur_len), generator=g)
    return scores, history


def assert_matches_hf(configs, stream_config, cur_len, step, seed, history=None, scores=None):
    configs = [c.replace(eos_token_id=c.eos_token_id if c.eos_token_id is not None else EOS, pad_token_id=PAD)
               for c in configs]
    S = len(stream_config)
    scores, hist = make_inputs(S, cur_len, seed) if scores is None else (scores, make_inputs(S, cur_len, seed)[1])
    if history is not None:
        hist[:, : history.shape[1]] = history
    c, plan = build_controls(configs, stream_config, V, "cpu")
    ours = process(scores.clone(), hist, torch.tensor(cur_len), torch.tensor(step), c, plan)
    for s, i in enumerate(stream_config):
        ref = hf_processors(configs[i], cur_len - step)(hist[s : s + 1, :cur_len], scores[s : s + 1].clone())[0]
        assert torch.equal(ours[s] == -math.inf, ref == -math.inf), f"stream {s}: -inf positions differ"
        fin = ref > -math.inf
        torch.testing.assert_close(ours[s][fin], ref[fin], atol=1e-6, rtol=0)
    return ours, plan


SAMPLE = SamplingConfig(do_sample=True)
GREEDY = SamplingConfig()
CONTROLS = {  # per control: several streams, each with a different setting (one "off", one greedy)
    "repetition_penalty": [GREEDY.replace(repetition_penalty=p) for p in (1.0, 1.3, 0.7, 2.5)],
    "no_repeat_ngram": [GREEDY.replace(no_repeat_ngram_size=n) for n in (0, 1, 2, 3, 4)],
    "bad_words_single": [GREEDY.replace(bad_words_ids=w) for w in ([[5]], [[1], [2], [EOS]], [[7], [9], [30]])],
    "bad_words_multi": [GREEDY.replace(bad_words_ids=w) for w in
                        ([[1, 2]], [[0, 1, 2, 20], [4, 21], [11]], [[2, 2, 22], [3, 23], [5, 4, 3, 2, 24]])],
    "min_new_tokens": [GREEDY.replace(min_new_tokens=n, max_new_tokens=9) for n in (0, 3, 4, 9)]
    + [GREEDY.replace(min_new_tokens=5, eos_token_id=(3, 7, 8))],
    "temperature": [SAMPLE.replace(temperature=t) for t in (1.0, 0.7, 1.5, 0.05)] + [GREEDY.replace(temperature=3.0)],
    "top_k": [SAMPLE.replace(top_k=k) for k in (0, 1, 5, 17, 100)] + [GREEDY.replace(top_k=3)],
    "top_p": [SAMPLE.replace(top_p=p) for p in (1.0, 0.95, 0.5, 0.1, 1e-9)]  # 1 - 1e-9 == 1 in f32
    + [GREEDY.replace(top_p=0.3), SAMPLE.replace(temperature=3.0, top_k=4, top_p=0.6)],
    "min_p": [SAMPLE.replace(min_p=p) for p in (0.0, 0.05, 0.3, 1.0)] + [GREEDY.replace(min_p=0.5)],
    "typical_p": [SAMPLE.replace(typical_p=p) for p in (1.0, 0.95, 0.5, 0.2, 1e-4)] + [GREEDY.replace(typical_p=0.3)],
    # the seed memo's setting, next to a greedy and a plain sampling head
    "seed_memo": [SAMPLE.replace(temperature=1.5, top_p=0.95, top_k=40, bad_words_ids=[[0], [1], [2]]), GREEDY, SAMPLE],
    "mixed": [
        SAMPLE.replace(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=[[1, 2], [2, 2, 30], [7]],
                       min_new_tokens=4, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.9),
        GREEDY.replace(repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[4, 5, 6]], min_new_tokens=2),
        SAMPLE.replace(top_p=0.8),
        GREEDY,
    ],
}


@pytest.mark.parametrize("name", list(CONTROLS))
def test_process_matches_hf(name):
    configs = CONTROLS[name]
    stream_config = [i for i in range(len(configs)) for _ in range(2)]  # 2 streams per config
    for seed, (cur_len, step) in enumerate([(1, 0), (3, 1), (6, 2), (12, 4), (L, 9)]):
        assert_matches_hf(configs, stream_config, cur_len, step, seed)


def test_no_repeat_ngram_and_bad_word_prefix_actually_ban():
    configs = [GREEDY.replace(no_repeat_ngram_size=3), GREEDY.replace(bad_words_ids=[[4, 5, 6], [5, 17]])]
    hist = torch.tensor([[1, 2, 9, 8, 1, 2], [0, 0, 1, 4, 4, 5]])  # "1 2 -> 9" seen before; ends in "4 5"
    ours, plan = assert_matches_hf(configs, [0, 1], cur_len=6, step=2, seed=0, history=hist)
    assert plan.no_repeat_ngram == 3 and plan.bad_words_multi == 3
    assert ours[0, 9] == -math.inf and ours[1, 6] == -math.inf and ours[1, 17] == -math.inf
    hist[1, 4] = 3  # ends in "3 5": (4, 5, 6) no longer applies, (5, 17) still does
    ours, _ = assert_matches_hf(configs, [0, 1], cur_len=6, step=2, seed=0, history=hist)
    assert ours[1, 6] > -math.inf and ours[1, 17] == -math.inf


def test_top_p_boundary_and_ties():
    """cumulative prob == 1 - top_p exactly is removed (HF's `<=`), and tied tokens are cut as HF cuts them."""
    scores = torch.full((2, V), -math.inf)
    scores[:, 10:14] = 0.0  # four tokens at exactly 0.25 each
    scores[1, 20:22] = 5.0
    ours, _ = assert_matches_hf([SAMPLE.replace(top_p=0.75), SAMPLE.replace(top_p=0.5)], [0, 1], 4, 0, 0,
                                scores=scores)
    assert (ours[0] > -math.inf).sum() == 3


def test_greedy_streams_untouched_by_warpers():
    warpers = dict(temperature=0.3, top_k=2, top_p=0.2, min_p=0.5, typical_p=0.2)
    configs = [SAMPLE.replace(**warpers), GREEDY.replace(**warpers)]
    configs = [cfg.replace(eos_token_id=EOS, pad_token_id=PAD) for cfg in configs]
    scores, hist = make_inputs(2, 5, seed=1)
    c, plan = build_controls(configs, [0, 1], V, "cpu")
    out = process(scores.clone(), hist, torch.tensor(5), torch.tensor(0), c, plan)
    assert torch.equal(out[1], scores[1])
    assert torch.equal(sample(out, torch.ones(2, V), c)[1], scores[1].argmax())


def test_plan_reflects_used_configs_only():
    configs = [cfg.replace(eos_token_id=EOS, pad_token_id=PAD) for cfg in
               (GREEDY, SAMPLE.replace(top_k=5, bad_words_ids=[[1, 2, 3]]), GREEDY.replace(bad_words_ids=[[EOS]]))]
    _, plan = build_controls(configs, [0, 0, 2], V, "cpu")
    assert plan == Plan()  # config 1 unused; a bad word equal to EOS is dropped, as in HF
    c, plan = build_controls(configs, [1, 0], V, "cpu")
    assert plan == Plan(any_sample=True, top_k=5, bad_words_multi=3, top_k_bounds=True)
    assert c.bad_words.tolist() == [[1, 2, 3]] and c.bad_use.tolist() == [[True], [False]]


def test_sampling_statistics():
    Vs, n = 20, 20_000
    cfg = SAMPLE.replace(temperature=1.5, top_k=12, top_p=0.95, bad_words_ids=[[0], [1], [2]], eos_token_id=3,
                         pad_token_id=0)
    c1, plan = build_controls([cfg], [0], Vs, "cpu")
    logits = torch.randn(1, Vs, generator=torch.Generator().manual_seed(0)) * 2
    probs = process(logits, torch.zeros(1, 1, dtype=torch.long), torch.tensor(1), torch.tensor(0), c1, plan).softmax(-1)
    c, _ = build_controls([cfg], [0] * n, Vs, "cpu")
    scores = probs.log().expand(n, Vs)

    def draw(seed):
        noise = torch.empty(n, Vs).exponential_(generator=torch.Generator().manual_seed(seed))
        return sample(scores, noise, c)

    tokens = draw(1234)
    freq = torch.bincount(tokens, minlength=Vs).float() / n
    assert (freq - probs[0]).abs().max() < 0.015  # ~4.6 sigma for the largest p(1-p)/n
    assert (freq[probs[0] == 0] == 0).all() and (probs[0, :3] == 0).all()  # banned / cut tokens never drawn
    assert torch.equal(draw(1234), tokens)
    assert not torch.equal(draw(99), tokens)


def test_sample_is_safe_with_zero_noise_and_dead_rows():
    c, _ = build_controls([SAMPLE.replace(pad_token_id=0)], [0, 0], 4, "cpu")
    scores = torch.tensor([[-math.inf, 1.0, -math.inf, 0.0], [-math.inf] * 4])
    out = sample(scores, torch.zeros(2, 4), c)  # E = 0 everywhere: 0/0 must not pick a banned token
    assert out[0] in (1, 3)
    bad = torch.tensor([[0.0, math.nan], [1.0, 2.0], [math.inf, 0.0], [-math.inf, 0.0]])
    assert has_nonfinite(bad).tolist() == [True, False, True, False]


@pytest.mark.parametrize("field, value", [
    ("temperature", 0.0), ("temperature", -1.0), ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5),
    ("min_p", -0.1), ("min_p", 1.1), ("typical_p", 0.0), ("typical_p", 1.01), ("top_k", -1),
    ("repetition_penalty", 0.0), ("num_return_sequences", 0), ("max_new_tokens", 0), ("min_new_tokens", -1),
    ("min_new_tokens", 65), ("no_repeat_ngram_size", -2), ("top_k", 2.5), ("bad_words_ids", [[]]),
    ("bad_words_ids", [[-1]]), ("bad_words_ids", [[40]]), ("bad_words_ids", [5]), ("eos_token_id", 40),
    ("eos_token_id", (1, -3)), ("eos_token_id", ()), ("pad_token_id", 40),
])
def test_validate_names_the_parameter(field, value):
    cfg = SamplingConfig(do_sample=True, **{field: value})
    with pytest.raises(ValueError, match=field):
        cfg.validate(vocab_size=40)


def test_validate_accepts_edges_and_normalises_lists():
    cfg = SamplingConfig(do_sample=True, top_p=1.0, min_p=1.0, typical_p=1.0, bad_words_ids=[[1], [2, 3]],
                         eos_token_id=[5, 6], min_new_tokens=64)
    cfg.validate(vocab_size=40)
    assert cfg.bad_words_ids == ((1,), (2, 3)) and cfg.eos_token_id == (5, 6)
    SamplingConfig(temperature=0.0).validate()  # ignored when greedy
    assert hash(cfg) == hash(SamplingConfig.from_string("do_sample=1,min_p=1,bad_words_ids=1;2 3,"
                                                        "eos_token_id=5 6,min_new_tokens=64"))
    with pytest.raises(ValueError, match="top_p"):
        cfg.replace(top_p=2.0)


def test_from_string():
    cfg = SamplingConfig.from_string("temperature=1.5, top_p=0.95,do_sample=true,bad_words_ids=0;1;2|5 6,top_k=40")
    assert cfg == SamplingConfig(do_sample=True, temperature=1.5, top_p=0.95, top_k=40,
                                 bad_words_ids=((0,), (1,), (2,), (5, 6)))
    base = SamplingConfig(top_k=7, eos_token_id=3)
    cfg = SamplingConfig.from_string("do_sample=False,eos_token_id=none,pad_token_id=2", base=base)
    assert (cfg.top_k, cfg.eos_token_id, cfg.pad_token_id, cfg.do_sample) == (7, None, 2, False)
    assert SamplingConfig.from_string("") == SamplingConfig()
    with pytest.raises(ValueError, match="unknown sampling key 'topp'.*top_p"):
        SamplingConfig.from_string("topp=0.9")
    for bad, key in [("top_k=4.5", "top_k"), ("do_sample=yes", "do_sample"), ("temperature=hot", "temperature"),
                     ("bad_words_ids=1;;2", "bad_words_ids"), ("top_p", "top_p"), ("top_p=0", "top_p")]:
        with pytest.raises(ValueError, match=key):
            SamplingConfig.from_string(bad)


# ---- the trimmed sampler (draw with plan.top_k_bounds): noise and work for the top-k candidates only ----
def tie_logits(Vs: int, seed: int) -> Tensor:
    """[1, Vs] logits: a few distinct large ones, then 9 tokens tied at 1.0 (past any small top-k)."""
    x = -0.5 - 2 * torch.rand(1, Vs, generator=torch.Generator().manual_seed(seed))  # all below the tie
    x[0, :3] = torch.tensor([3.0, 2.5, 2.2])
    x[0, 7:16] = 1.0
    return x


def draw_many(cfg: SamplingConfig, logits: Tensor, n: int, seed: int):
    """n tokens drawn by `draw` from one row of logits, and the row's HF filtered softmax."""
    Vs = logits.shape[1]
    cfg = cfg.replace(pad_token_id=0)
    c, plan = build_controls([cfg], [0] * n, Vs, "cpu")
    noise = torch.empty(n, noise_width(plan, Vs)).exponential_(generator=torch.Generator().manual_seed(seed))
    scores = processors(logits.expand(n, Vs), torch.zeros(n, 1, dtype=torch.long), torch.tensor(1), torch.tensor(0),
                        c, plan)
    tokens = draw(scores, noise, c, plan)
    ref = hf_processors(cfg, 1)(torch.zeros(1, 1, dtype=torch.long), logits.clone())[0].softmax(-1)
    return torch.bincount(tokens, minlength=Vs).double() / n, ref.double(), plan


SAMPLE_N, Z = 40_000, 5.0  # |freq - p| <= Z binomial standard errors, for every token


@pytest.mark.parametrize("cfg, bounded, ties", [
    (SAMPLE.replace(top_k=5), True, True),  # the 5th largest is tied with 8 more tokens: HF keeps all 12
    (SAMPLE.replace(top_k=4), True, False),
    (SAMPLE.replace(temperature=1.3, top_k=20, top_p=0.8), True, False),
    (SAMPLE.replace(top_k=30, top_p=0.95, min_p=0.02), True, False),
    (SAMPLE.replace(temperature=0.7, top_p=0.9), False, False),  # top-p only: full noise and sort, as before
], ids=["top_k-ties", "top_k", "top_k+top_p", "top_k+top_p+min_p", "top_p"])
def test_trimmed_sampler_matches_filtered_softmax(cfg, bounded, ties):
    Vs = 48
    logits = tie_logits(Vs, 0) if ties else torch.randn(1, Vs, generator=torch.Generator().manual_seed(3)) * 2
    freq, ref, plan = draw_many(cfg, logits, SAMPLE_N, seed=11)
    assert plan.top_k_bounds == bounded
    assert noise_width(plan, Vs) == (cfg.top_k + 2 if bounded else Vs)
    assert 2 <= (ref > 0).sum() < Vs  # the filter removes some tokens and leaves a choice
    se = (ref * (1 - ref) / SAMPLE_N).sqrt()
    assert ((freq - ref).abs() <= Z * se).all(), (freq - ref).abs().max()
    assert (freq[ref == 0] == 0).all()
    if ties:
        assert (ref > 0).sum() == 12


def test_trimmed_sampler_top_p_cut_inside_a_tie():
    """top-p cuts part of the tied group: HF keeps an arbitrary r of the m tied tokens (its sort is not
    stable); the trimmed sampler gives the group HF's mass, spread evenly over its m tokens."""
    Vs = 48
    logits = tie_logits(Vs, 0)
    freq, ref, _ = draw_many(SAMPLE.replace(top_k=8, top_p=0.7), logits, SAMPLE_N, seed=12)
    group = logits[0] == 1.0
    kept = ref[group] > 0
    assert 0 < kept.sum() < group.sum()  # the cut does go through the tie
    p_group = ref[group].sum()
    assert (freq[group].sum() - p_group).abs() <= Z * (p_group * (1 - p_group) / SAMPLE_N).sqrt()
    p_one = p_group / group.sum()
    assert ((freq[group] - p_one).abs() <= Z * (p_one * (1 - p_one) / SAMPLE_N).sqrt()).all()
    rest = ~group
    se = (ref[rest] * (1 - ref[rest]) / SAMPLE_N).sqrt()
    assert ((freq[rest] - ref[rest]).abs() <= Z * se).all() and (freq[rest][ref[rest] == 0] == 0).all()


def test_trimmed_sampler_keeps_greedy_streams_and_dead_rows_safe():
    configs = [SAMPLE.replace(top_k=3, top_p=0.5, pad_token_id=0), GREEDY.replace(pad_token_id=0)]
    c, plan = build_controls(configs, [0, 1, 0], V, "cpu")
    assert plan.top_k_bounds
    scores, _ = make_inputs(3, 1, seed=4)
    scores[2] = -math.inf  # nothing left: any valid id (the caller raises)
    out = draw(scores, torch.zeros(3, noise_width(plan, V)), c, plan)  # E = 0 everywhere
    assert out[1] == scores[1].argmax() and 0 <= out[2] < V
    assert out[0] in scores[0].topk(3).indices
    assert torch.equal(draw(scores, None, c, plan), scores.argmax(-1))


def test_trimmed_sampler_compiles_without_breaks_and_equals_eager():
    torch._dynamo.reset()
    configs = [cfg.replace(eos_token_id=EOS, pad_token_id=PAD) for cfg in
               (SAMPLE.replace(repetition_penalty=1.3, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05),
                GREEDY, SAMPLE.replace(top_k=3))]
    c, plan = build_controls(configs, [0, 1, 2, 0], V, "cpu")
    assert plan.top_k_bounds and plan.top_k == 20
    scores, hist = make_inputs(4, 10, seed=6)
    noise = torch.empty(4, noise_width(plan, V)).exponential_(generator=torch.Generator().manual_seed(0))

    def fn(scores, history, cur_len, step, noise, c):
        return draw(processors(scores, history, cur_len, step, c, plan), noise, c, plan)

    args = (scores, hist, torch.tensor(10), torch.tensor(3), noise, c)
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    assert torch.equal(torch.compile(fn, fullgraph=True, dynamic=False)(*args), fn(*args))


def _everything():
    configs = [cfg.replace(eos_token_id=EOS, pad_token_id=PAD) for cfg in CONTROLS["mixed"]]
    c, plan = build_controls(configs, [0, 1, 2, 3], V, "cpu")
    assert plan == Plan(True, 3, True, 3, True, True, True, 20, True, True, True)
    scores, hist = make_inputs(4, 10, seed=5)
    scores[1::2] += torch.rand(2, V) * 0.1  # no ties: compiled sorts may order ties differently
    noise = torch.empty(4, V).exponential_(generator=torch.Generator().manual_seed(0))

    def step_fn(scores, history, cur_len, step, noise, c):
        out = process(scores, history, cur_len, step, c, plan)
        return out, sample(out, noise, c), has_nonfinite(out)

    return step_fn, (scores, hist, torch.tensor(10), torch.tensor(3), noise, c)


def test_compile_health_no_graph_breaks():
    fn, args = _everything()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.compile
def test_compiled_equals_eager():
    torch._dynamo.reset()
    fn, args = _everything()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    for cur_len, step in [(10, 3), (12, 5)]:  # new cur_len / step values must not recompile
        args[1][:, :cur_len] = args[1][:, :cur_len].remainder(6)  # "generated" tokens replace the garbage
        args = (*args[:2], torch.tensor(cur_len), torch.tensor(step), *args[4:])
        eager = fn(*args)
        with torch.compiler.set_stance("fail_on_recompile" if step == 5 else "default"):
            out = compiled(*args)
        assert torch.equal(eager[0] == -math.inf, out[0] == -math.inf)
        fin = eager[0] > -math.inf
        torch.testing.assert_close(out[0][fin], eager[0][fin], atol=1e-6, rtol=0)
        assert torch.equal(out[1], eager[1]) and torch.equal(out[2], eager[2])


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    Vh=st.integers(2, 24),
    S=st.integers(1, 4),
)
def test_warped_distribution_is_valid(data, Vh, S):
    floats = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
    logits = torch.tensor(data.draw(st.lists(st.lists(floats, min_size=Vh, max_size=Vh), min_size=S, max_size=S)))
    configs = [SamplingConfig(
        do_sample=True,
        temperature=data.draw(st.floats(0.05, 5.0)),
        top_k=data.draw(st.integers(0, Vh + 2)),
        top_p=data.draw(st.floats(1e-3, 1.0)),
        min_p=data.draw(st.floats(0.0, 1.0)),
        typical_p=data.draw(st.floats(1e-3, 1.0)),
        repetition_penalty=data.draw(st.floats(0.1, 5.0)),
        bad_words_ids=tuple((t,) for t in data.draw(st.sets(st.integers(0, Vh - 1), max_size=Vh - 1))),
        pad_token_id=0,
    ) for _ in range(S)]
    c, plan = build_controls(configs, list(range(S)), Vh, "cpu")
    history = torch.randint(0, Vh, (S, 5))
    out = process(logits, history, torch.tensor(5), torch.tensor(0), c, plan)
    probs = out.softmax(-1)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(S))
    assert ((out > -math.inf).sum(-1) >= 1).all()
    assert (~c.ban | (out == -math.inf)).all()
