"""Per-step cost of the sampling part of a decode step: the full-vocab path against the trimmed one.

`full`: what every step did before the trim (and still does when some sampling stream has no
top_k): [S, V] Exponential noise, the warpers on all V entries (top-p sorts all V), then the race.
`trimmed`: `sampling.draw` as the decode step now runs it: noise for `noise_width(plan, V)`
columns only, top-k/top-p/min-p on the top-k candidates. Both include the noise draw and the
processors, from the same logits; the two paths run interleaved, round by round, so a slow moment
hits both. The ratio full / trimmed is the figure to read (one run, shared machine).

    python benchmarks/bench_sampling.py                 # eager, S = 3 and 24 streams, V = 32000
    python benchmarks/bench_sampling.py --compile       # both paths under torch.compile as well
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, log, machine_info, median, timed, write_json  # noqa: E402

from gpt2mh.inference.controls import SamplingConfig, build_controls
from gpt2mh.inference.sampling import draw, noise_width, processors, sample, warp

SEED_MEMO = dict(do_sample=True, temperature=1.5, top_p=0.95, top_k=40, bad_words_ids=[[0], [1], [2]])
SETTINGS = {  # name -> one config for every stream
    "seed-memo (t=1.5, top_k=40, top_p=0.95)": SEED_MEMO,
    "top_k=40": dict(do_sample=True, top_k=40),
    "top_k=40, top_p=0.9, min_p=0.05": dict(do_sample=True, top_k=40, top_p=0.9, min_p=0.05),
    "top_p=0.95 (no top_k: full path in both)": dict(do_sample=True, top_p=0.95),
}


def full_step(logits, hist, cur, step, c, plan, gen):
    noise = torch.empty(logits.shape, device=logits.device).exponential_(generator=gen)
    return sample(warp(processors(logits, hist, cur, step, c, plan), c, plan), noise, c)


def trimmed_step(logits, hist, cur, step, c, plan, gen):
    noise = torch.empty(logits.shape[0], noise_width(plan, logits.shape[1]), device=logits.device)
    noise.exponential_(generator=gen)
    return draw(processors(logits, hist, cur, step, c, plan), noise, c, plan)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="3,24", help="S values (3 = 3 heads x batch 1)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=100, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="also time both paths torch.compile'd")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "sampling-cpu.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    V = args.vocab
    modes = ["eager"] + (["compiled"] * args.compile)
    rows = []
    for S in (int(s) for s in args.streams.split(",")):
        logits = torch.randn(S, V, generator=torch.Generator().manual_seed(0)) * 3
        hist = torch.randint(3, V, (S, 64), generator=torch.Generator().manual_seed(1))
        cur, step = torch.tensor(40), torch.tensor(8)
        for name, kw in SETTINGS.items():
            cfg = SamplingConfig(**kw, eos_token_id=3, pad_token_id=3)
            c, plan = build_controls([cfg], [0] * S, V, dev)
            for mode in modes:
                fns = {"full": full_step, "trimmed": trimmed_step}
                if mode == "compiled":
                    fns = {k: torch.compile(f, fullgraph=True, dynamic=False) for k, f in fns.items()}
                gens = {k: torch.Generator().manual_seed(2) for k in fns}
                for k, f in fns.items():  # warm-up (and compile)
                    f(logits, hist, cur, step, c, plan, gens[k])
                times = {k: [] for k in fns}
                for r in range(args.repeats):
                    for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                        dt, _ = timed(lambda: [fns[k](logits, hist, cur, step, c, plan, gens[k])
                                               for _ in range(args.steps)], dev)
                        times[k].append(dt / args.steps * 1e3)
                row = dict(streams=S, vocab=V, setting=name, mode=mode, top_k_bounds=plan.top_k_bounds,
                           noise_width=noise_width(plan, V),
                           full_ms=median(times["full"]), trimmed_ms=median(times["trimmed"]),
                           full_ms_all=times["full"], trimmed_ms_all=times["trimmed"])
                row["ratio_full_over_trimmed"] = row["full_ms"] / row["trimmed_ms"]
                rows.append(row)
                log(f"S={S:3d} {mode:8s} {name:45s} full {row['full_ms']:.3f} ms  trimmed {row['trimmed_ms']:.3f} ms"
                    f"  x{row['ratio_full_over_trimmed']:.2f}")
                write_json(args.out, dict(machine=machine_info(dev), args=vars(args), rows=rows))
    print(f"| S | mode | setting | full ms/step | trimmed ms/step | full / trimmed |")
    print("|--:|---|---|--:|--:|--:|")
    for r in rows:
        print(f"| {r['streams']} | {r['mode']} | {r['setting']} | {r['full_ms']:.3f} | {r['trimmed_ms']:.3f} "
              f"| {r['ratio_full_over_trimmed']:.2f} |")


if __name__ == "__main__":
    main()
