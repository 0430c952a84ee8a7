"""Soak: generate for thousands of prompts in one process; memory must stay flat and the compiled
decode step must not be rebuilt per call (issue 7).

Every call varies the batch size within one power-of-2 batch bucket and the prompt length (and its
left padding) within one cache-length bucket, with the seed memo's sampling settings and a new seed
per call. After the warm-up calls every call must reuse the compiled graph. Measured: resident set
size (RSS) after the warm-up and at the end (after `gc.collect()`), with a trace in between, and the
number of graphs dynamo built after the warm-up. Writes JSON; exits 1 when a criterion fails:

    RSS growth after warm-up < --max-rss-growth (5%)      recompiles after warm-up == 0

    python benchmarks/checks/soak.py                               # 2,000 prompts, tiny random model, CPU
    python benchmarks/checks/soak.py --prompts 60 --out /tmp/soak.json    # what tests/test_soak.py runs
    python benchmarks/checks/soak.py --device cuda --weights rinna/japanese-gpt2-small
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402  (the harness in benchmarks/)

from gpt2mh import GPT2Config, MultiHeadGPT2  # noqa: E402
from gpt2mh.inference.request import LEN_BUCKET, bucket_batch, round_up  # noqa: E402

# A tiny random GPT-2 (rinna's special ids): the soak is about the loop, not the arithmetic.
TINY = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
            pad_token_id=3)
SAMPLING = dict(do_sample=True, temperature=1.5, top_p=0.95, top_k=40, bad_words_ids=[[0], [1], [2]])


def int_pair(s: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in s.split(","))
    return lo, hi


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2000)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--batch", type=int_pair, default=(5, 8), help="MIN,MAX prompts per call (one power-of-2 bucket)")
    p.add_argument("--prompt-len", type=int_pair, default=(4, 40), help="MIN,MAX prompt tokens (one cache bucket)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--warmup-calls", type=int, default=3, help="calls before the RSS and graph baselines")
    p.add_argument("--weights", default="random", help="'random' (a tiny GPT-2) or a checkpoint folder / hub id")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/soak-<device>.json)")
    args = p.parse_args(argv)
    check_buckets(p, args)
    return args


def check_buckets(p: argparse.ArgumentParser, args) -> None:
    (blo, bhi), (tlo, thi) = args.batch, args.prompt_len
    if not 1 <= blo <= bhi or bucket_batch(blo) != bucket_batch(bhi):
        p.error(f"--batch {blo},{bhi}: sizes must share one power-of-2 bucket (e.g. 5,8 or 3,4)")
    if not 1 <= tlo <= thi or round_up(tlo + args.new_tokens, LEN_BUCKET) != round_up(thi + args.new_tokens, LEN_BUCKET):
        p.error(f"--prompt-len {tlo},{thi} with --new-tokens {args.new_tokens}: prompt + new tokens must stay in "
                f"one cache bucket of {LEN_BUCKET}")
    if args.prompts < 1 or args.warmup_calls < 1:
        p.error("--prompts and --warmup-calls must be >= 1")


def build_model(args, device, dtype) -> MultiHeadGPT2:
    heads = [f"h{i}" for i in range(args.heads)]
    if args.weights == "random":
        torch.manual_seed(args.seed)
        model = MultiHeadGPT2(GPT2Config(**TINY), heads)
    else:
        model = MultiHeadGPT2.from_pretrained(args.weights, heads=heads)
    return model.to(device=device, dtype=dtype).eval()


def make_batch(rng: random.Random, args, vocab: int, pad: int, n_real: int):
    """(ids, mask): max(n_real, batch min) left-padded random prompts (extra rows fill a short last call)."""
    B = max(n_real, args.batch[0])
    T = rng.randint(*args.prompt_len)
    ids = torch.tensor([[rng.randrange(4, vocab) for _ in range(T)] for _ in range(B)])
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        pads = rng.randint(0, T - 1)
        ids[b, :pads], mask[b, :pads] = pad, 0
    return ids, mask


def new_tokens(rows: torch.Tensor, eos: int) -> int:
    hit = (rows == eos).long()
    return int(((hit.cumsum(1) - hit) == 0).sum())  # tokens up to and including each row's EOS


def soak(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args, device, dtype)
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    rng = random.Random(args.seed)
    done = calls = tokens = 0
    warm = {}
    trace, shapes = [], set()
    trace_every = max(1, round(args.prompts / (sum(args.batch) / 2) / 10))  # ~10 points
    t0 = time.perf_counter()
    while done < args.prompts:
        n = min(rng.randint(*args.batch), args.prompts - done)
        ids, mask = make_batch(rng, args, cfg.vocab_size, pad, n)
        out = model.generate(ids.to(device), mask.to(device), compile=args.compile, seed=args.seed + calls,
                             max_new_tokens=args.new_tokens, **SAMPLING)
        common.sync(device)
        if warm:
            shapes.add(tuple(ids.shape))
        tokens += sum(new_tokens(rows[:n], cfg.eos_token_id) for rows in out.values())
        done, calls = done + n, calls + 1
        if calls == args.warmup_calls:
            gc.collect()
            warm = dict(calls=calls, prompts=done, seconds=time.perf_counter() - t0, rss_bytes=common.rss_bytes(),
                        graphs=counters["stats"]["unique_graphs"], t=time.perf_counter())
            common.log(f"warm after {calls} calls ({warm['seconds']:.1f} s): RSS {warm['rss_bytes'] / 2**20:.1f} MiB, "
                       f"{warm['graphs']} graph(s)")
        if warm and (calls - args.warmup_calls) % trace_every == 0:
            trace.append([done, common.rss_bytes()])  # [prompts done, RSS bytes]
    if not warm:
        raise SystemExit(f"--prompts {args.prompts} ran only {calls} call(s): fewer than --warmup-calls "
                         f"{args.warmup_calls}")
    gc.collect()
    rss_end, graphs_end = common.rss_bytes(), counters["stats"]["unique_graphs"]
    seconds = time.perf_counter() - warm["t"]
    growth = (rss_end - warm["rss_bytes"]) / warm["rss_bytes"]
    recompiles = graphs_end - warm["graphs"]
    rss_ok = growth < args.max_rss_growth
    passed = rss_ok and recompiles == 0
    return {
        "benchmark": "soak",
        "machine": common.machine_info(device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": dict(dataclasses.asdict(cfg), heads=list(model.head_names), dtype=str(dtype)),
        "sampling": SAMPLING,
        "prompts": done,
        "calls": calls,
        "new_tokens": tokens,
        "warmup": {k: v for k, v in warm.items() if k != "t"},
        "rss_end_bytes": rss_end,
        "rss_growth": growth,
        "rss_trace": trace,
        "rss_growth_ok": rss_ok,  # growth < criteria.rss_growth_below (--max-rss-growth)
        "shapes_after_warmup": sorted(shapes),  # (batch, prompt length) of each call: all reuse one graph
        "graphs_after_warmup": warm["graphs"],
        "graphs_end": graphs_end,
        "recompiles_after_warmup": recompiles,
        "seconds_after_warmup": seconds,
        "prompts_per_s_after_warmup": (done - warm["prompts"]) / seconds if seconds > 0 else None,
        "criteria": {"rss_growth_below": args.max_rss_growth, "recompiles_after_warmup": 0},
        "passed": passed,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    result = soak(args)
    out = Path(args.out) if args.out else common.RESULTS / f"soak-{torch.device(args.device).type}.json"
    common.write_json(out, result)
    common.log(f"{result['prompts']} prompts in {result['calls']} calls: RSS {result['rss_growth']:+.2%} after "
               f"warm-up, {result['recompiles_after_warmup']} recompile(s) -> {'PASS' if result['passed'] else 'FAIL'} "
               f"({out})")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
