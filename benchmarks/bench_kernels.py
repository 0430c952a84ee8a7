"""The GEMM floor of a decode round: every weight GEMM of one round alone, through the library's own
dispatch, against the bandwidth bound.

A decode round multiplies S = N x batch rows by every trunk linear weight (12 layers x c_attn,
attn.c_proj, mlp.c_fc, mlp.c_proj at rinna-small's shapes) and each head by its batch rows. This
script times exactly those GEMMs, back to back with nothing else (no attention, LayerNorm, GELU,
sampling, Python of the decode step), with the kernels `generate` uses: `gpt2mh.kernels.linear`'s dispatch
after `prepack_model(model, S)` (fp32) or the int8 packs of `model.quantize("int8")`, and
`gpt2mh.model.heads_matmul` for the heads. Its `x_bound` is what the best kernel this CPU has can
reach at all; a decode round (bench_generate.py) cannot be closer to the bound than this.

    python benchmarks/bench_kernels.py                         # N = 1, 3, 8; batch 1; fp32 and int8
    python benchmarks/bench_kernels.py --heads 1,2,3,4,8 --batch 1,8

Per shape it also reports the achieved GB/s of one layer's weight (the best of 4 x --repeats calls
on the same weight, so part of it may stay in the CPU's last-level cache: an upper figure; the
round, which reads 340 MB of distinct weights, is the one that counts), beside `torch.sum`'s read
bandwidth measured in the same run."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the harness beside this script)
from bench_generate import RINNA_SMALL, int_list  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="1,3,8", help="numbers of heads N, comma-separated")
    p.add_argument("--batch", default="1", help="prompts per call, comma-separated")
    p.add_argument("--modes", default="fp32,int8", help="fp32 and/or int8")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per scenario (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(common.RESULTS / "kernels-cpu.json"))
    a = p.parse_args(argv)
    a.heads, a.batch, a.modes = int_list(a.heads), int_list(a.batch), a.modes.split(",")
    bad = [m for m in a.modes if m not in ("fp32", "int8")]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from fp32, int8")
    return a


def build(n_heads: int, mode: str, seed: int):
    """A rinna-small-shaped MultiHeadGPT2 with random weights (fp32 or int8 packs)."""
    from gpt2mh import GPT2Config, MultiHeadGPT2

    torch.manual_seed(seed)
    model = MultiHeadGPT2(GPT2Config(**RINNA_SMALL), [f"h{i}" for i in range(n_heads)]).eval()
    return model.quantize("int8") if mode == "int8" else model


def layers(model):
    from gpt2mh.model import Conv1D

    return [m for m in model.transformer.modules() if isinstance(m, Conv1D)]


def gemm_round(convs, xs, h, heads):
    """One decode round's weight GEMMs: every trunk linear at S rows, then the heads."""
    from gpt2mh.model import heads_matmul

    for conv, x in zip(convs, xs):
        conv(x)
    heads_matmul(h, heads)


@torch.no_grad()  # as generate: the dispatch uses packs (and int8 heads) only without autograd
def scenario(model, mode: str, n: int, b: int, repeats: int) -> dict:
    from gpt2mh.inference.engine import selected_heads
    from gpt2mh.kernels.linear import prepack_model

    S, C = n * b, model.config.n_embd
    prepack_model(model, S)  # what generate's setup does for the decode step's S rows (fp32)
    convs = layers(model)
    xs = [torch.randn(S, conv.weight.size(0)) for conv in convs]
    h = torch.randn(n, b, C)
    idx = list(range(n))
    heads = model.head_weights(idx) if mode == "int8" else selected_heads(model, idx)
    for _ in range(3):  # warm-up: thread pool, packs, page faults
        gemm_round(convs, xs, h, heads)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gemm_round(convs, xs, h, heads)
        times.append(time.perf_counter() - t0)
    size = 1 if mode == "int8" else 4
    read = (sum(conv.weight.numel() for conv in convs) + n * C * model.config.vocab_size) * size
    return {"mode": mode, "heads": n, "batch": b, "rows": S, "gemm_ms": common.median(times) * 1e3,
            "gemm_best_ms": min(times) * 1e3, "read_bytes": read}


@torch.no_grad()
def per_shape(model, mode: str, rows: int, repeats: int) -> list[dict]:
    """Achieved weight GB/s (its own bytes, int8 or fp32) of one layer of each trunk shape, best of repeats."""
    from gpt2mh.kernels.linear import prepack_model

    prepack_model(model, rows)
    seen, out = set(), []
    for conv in layers(model):
        shape = tuple(conv.weight.shape)
        if shape in seen:
            continue
        seen.add(shape)
        x = torch.randn(rows, shape[0])
        for _ in range(3):
            conv(x)
        best = min(common.timed(lambda: conv(x), torch.device("cpu"))[0] for _ in range(repeats * 4))
        nbytes = conv.weight.numel() * (1 if mode == "int8" else 4)
        out.append({"mode": mode, "rows": rows, "shape": list(shape), "gbs": nbytes / best / 1e9})
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu")
    bandwidth = common.read_bandwidth(device)
    common.log(f"torch.sum read bandwidth {bandwidth / 1e9:.1f} GB/s; {torch.get_num_threads()} threads")
    results, shapes = [], []
    for mode in args.modes:
        for n in args.heads:
            model = build(n, mode, args.seed)
            for b in args.batch:
                r = scenario(model, mode, n, b, args.repeats)
                r["bound_ms"] = r["read_bytes"] / bandwidth * 1e3
                r["x_bound"] = r["gemm_ms"] / r["bound_ms"]
                r["achieved_gbs"] = r["read_bytes"] / r["gemm_ms"] / 1e6
                results.append(r)
                shapes += per_shape(model, mode, n * b, args.repeats)
                common.log(f"{mode} N={n} B={b}: GEMMs {r['gemm_ms']:.1f} ms (best {r['gemm_best_ms']:.1f}), "
                           f"bound {r['bound_ms']:.1f} ms, {r['x_bound']:.2f}x the bound")
            del model
    bandwidth_after = common.read_bandwidth(device)
    out = {"benchmark": "kernels", "machine": common.machine_info(device),
           "bandwidth": {"before_gbs": bandwidth / 1e9, "after_gbs": bandwidth_after / 1e9},
           "settings": {"heads": args.heads, "batch": args.batch, "repeats": args.repeats, "shape": RINNA_SMALL},
           "results": results, "per_shape": shapes}
    common.write_json(args.out, out)
    print(f"\nGEMMs of one decode round alone (torch.sum: {bandwidth / 1e9:.1f} GB/s before, "
          f"{bandwidth_after / 1e9:.1f} after):")
    print(f"  {'mode':<5} {'N':>2} {'B':>2}  {'GEMM ms':>8} {'bound ms':>8} {'x bound':>7} {'GB/s':>6}")
    for r in results:
        print(f"  {r['mode']:<5} {r['heads']:>2} {r['batch']:>2}  {r['gemm_ms']:8.2f} {r['bound_ms']:8.2f} "
              f"{r['x_bound']:7.2f} {r['achieved_gbs']:6.1f}")
    print("one layer's weight, achieved GB/s (best):")
    for s in shapes:
        print(f"  {s['mode']:<5} rows {s['rows']:>2}  {s['shape'][0]}x{s['shape'][1]:<5}  {s['gbs']:6.1f}")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
