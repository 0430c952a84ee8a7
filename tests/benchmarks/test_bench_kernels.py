"""benchmarks/bench_kernels.py: one "round" is every trunk linear once at S rows plus the heads, and
its bound counts exactly those bytes (a tiny model here; the script itself uses rinna-small's shape)."""

import pytest
from helpers import load_benchmark

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.model import Conv1D


def load():
    return load_benchmark("bench_kernels")


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_a_round_runs_every_linear_once_and_counts_its_bytes(mode):
    bench = load()
    cfg = GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = MultiHeadGPT2(cfg, ["a", "b", "c"]).eval()
    if mode == "int8":
        model.quantize("int8")
    calls = []
    convs = [m for m in model.transformer.modules() if isinstance(m, Conv1D)]
    for conv in convs:
        conv.register_forward_hook(lambda mod, args, out: calls.append((mod, tuple(out.shape))))
    used = []
    if mode == "int8":  # the round goes through the int8 kernels, as generate's decode step does
        for conv in convs:
            kernel = conv.kernel.kernel
            conv.kernel.kernel = lambda *a, k=kernel: used.append(1) or k(*a)
    r = bench.scenario(model, mode, n=3, b=2, repeats=2)
    assert len(used) == (5 * len(convs) if mode == "int8" else 0)
    per_round = len(convs)
    assert len(calls) == (3 + 2) * per_round  # 3 warm-up rounds + 2 timed ones
    assert [m for m, _ in calls[:per_round]] == convs and all(shape[0] == 6 for _, shape in calls)  # S = 3 x 2 rows
    size = 1 if mode == "int8" else 4
    assert r["read_bytes"] == (sum(c.weight.numel() for c in convs) + 3 * 32 * 100) * size
    assert r["rows"] == 6 and r["gemm_ms"] > 0
