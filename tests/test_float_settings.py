"""Float settings at the edge of the float range (issue 28, class 3): one rule, `_checks.float_setting`,
decides every float control of SamplingConfig and every float setting of TrainConfig. Searched with
hypothesis over the values that break float32 maths — subnormals, values that float32 rounds to 0 or
inf, huge values, -0.0, NaN, inf — each as a Python float, a numpy scalar and a 0-d torch tensor. An
accepted value must give a usable distribution (finite, summing to 1, the draw a token the processors
left possible), for greedy and sampling streams alike; a refused one is named in the error."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2mh._checks import FLOAT32_MAX, FLOAT32_TINY
from gpt2mh.inference.controls import SamplingConfig, build_controls
from gpt2mh.inference.sampling import draw, processors, warp
from gpt2mh.train.config import TrainConfig

V = 64
EDGES = [0.0, -0.0, 5e-324, 1e-310, 1e-40, FLOAT32_TINY, 1.2e-38, 1e-30, 1e-8, 0.5, 1.0, 1.5, 1e30, FLOAT32_MAX,
         3.5e38, 1e300, 1.7976931348623157e308, math.inf, -math.inf, math.nan, -1e-40, -0.5, -1.0]
RAW = st.one_of(st.sampled_from(EDGES), st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True))


def as_kind(x: float, kind: str):
    if kind == "np64":
        return np.float64(x)
    if kind == "np32":
        with np.errstate(over="ignore"):
            return np.float32(x)
    if kind == "t32":
        return torch.tensor(x, dtype=torch.float32)
    if kind == "t64":
        return torch.tensor(x, dtype=torch.float64)
    return x


VALUES = st.tuples(RAW, st.sampled_from(["float", "np64", "np32", "t32", "t64"])).map(lambda p: (as_kind(*p), p[0]))
CONTROLS = ["temperature", "top_p", "min_p", "typical_p", "repetition_penalty"]
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, V, generator=g) * torch.tensor([[1.0], [30.0], [1e-3], [5.0]])
    x[2] -= 50.0  # a row of only negative scores: a tiny temperature must not turn it into -inf / NaN
    return x


@SETTINGS
@given(name=st.sampled_from(CONTROLS), value=VALUES, do_sample=st.booleans(), seed=st.integers(0, 3),
       top_k=st.sampled_from([0, 5]))
def test_every_float_control_is_usable_or_refused_by_name(name, value, do_sample, seed, top_k):
    given_value, raw = value
    cfg = SamplingConfig(do_sample=do_sample, top_k=top_k, **{name: given_value}, eos_token_id=2, pad_token_id=2)
    try:
        cfg.validate(V)
    except ValueError as e:
        assert str(e).startswith(f"{name}="), e
        return
    v = float(given_value)
    assert not math.isnan(v) and abs(v) <= FLOAT32_MAX
    if v != 0 and (name == "repetition_penalty" or name == "temperature" and do_sample):  # divisors
        assert FLOAT32_TINY <= abs(float(np.float32(v))), (name, v)
    controls, plan = build_controls([cfg], [0, 0, 0, 0], V, "cpu")
    history = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(seed))
    cur, step = torch.tensor(6), torch.tensor(0)
    x = logits(seed)
    scores = processors(x, history, cur, step, controls, plan)
    assert not scores.isnan().any() and not scores.isposinf().any(), (name, v)
    if plan.any_sample:
        probs = warp(scores, controls, plan).softmax(-1)
        assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(4)), (name, v)
    noise = torch.empty(4, V if not plan.top_k_bounds else plan.top_k + 2).exponential_(
        generator=torch.Generator().manual_seed(seed)) if plan.any_sample else None
    tok = draw(scores, noise, controls, plan)
    assert ((tok >= 0) & (tok < V)).all() and torch.isfinite(scores.gather(1, tok[:, None])).all(), (name, v)


TRAIN_FLOATS = ["learning_rate", "weight_decay", "adam_eps", "min_lr_ratio", "max_grad_norm", "validation_fraction",
                "dropout", "epochs"]


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(TRAIN_FLOATS), value=VALUES)
def test_every_training_float_is_a_float32_or_refused_by_name(name, value):
    given_value, raw = value
    try:
        cfg = TrainConfig(train_file="t.jsonl", heads=["a"], base="b", **{name: given_value})
    except (ValueError, TypeError) as e:
        assert str(e).startswith(name), e
        return
    got = getattr(cfg, name)
    assert type(got) is float and math.isfinite(got) and not (got == 0 and math.copysign(1, got) < 0)
    assert abs(got) <= FLOAT32_MAX, (name, got)
    if name in ("learning_rate", "adam_eps", "max_grad_norm"):  # they scale or divide float32 updates
        assert got == 0 or FLOAT32_TINY <= abs(got), (name, got)


def test_loss_weights_and_betas_follow_the_same_rule():
    for bad in (1e39, math.nan, -0.5, math.inf):
        with pytest.raises(ValueError, match="loss_weights must be finite numbers >= 0"):
            TrainConfig(train_file="t.jsonl", heads=["a"], base="b", loss_weights={"a": bad})
    with pytest.raises(ValueError, match=r"adam_betas must be two numbers in \[0, 1\)"):
        TrainConfig(train_file="t.jsonl", heads=["a"], base="b", adam_betas=(math.nan, 0.9))
