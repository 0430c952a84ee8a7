"""Benchmark JSON -> a PNG plot beside it, a markdown table on stdout and in results/README.md.

    python benchmarks/report.py benchmarks/results/generate-cpu.json [more.json ...] [--check]

--check prints, for the 3-head batch-1 row, gpt2mh-compiled against the targets of issue 6."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
SYSTEM_LABELS = {
    "gpt2mh-compiled": "gpt2mh, compiled",
    "gpt2mh-eager": "gpt2mh, eager",
    "gpt2mh-int8": "gpt2mh, int8 weights (eager)",
    "gpt2mh-int8-compiled": "gpt2mh, int8 weights, compiled",
    "hf-separate": "transformers, N separate models",
    "hf-nrs": "transformers, 1 model, num_return_sequences=N",
    "ct2-fp32-separate": "CTranslate2 fp32, N separate models",
    "ct2-int8-separate": "CTranslate2 int8, N separate models",
    "ct2-int8-nh": "CTranslate2 int8, 1 model, num_hypotheses=N",
}
COLORS = {"gpt2mh-compiled": "tab:blue", "gpt2mh-eager": "tab:cyan", "gpt2mh-int8": "tab:green",
          "gpt2mh-int8-compiled": "tab:olive", "hf-separate": "tab:red", "hf-nrs": "tab:orange",
          "ct2-fp32-separate": "tab:gray", "ct2-int8-separate": "tab:purple", "ct2-int8-nh": "tab:pink"}
STYLES = ["-", "--", ":", "-."]
# Issue 6's targets, 3 heads, batch 1.
TARGET_VS_SEPARATE, TARGET_VS_NRS, TARGET_X_BOUND, TARGET_RSS_SLACK = 5.0, 4.0, 2.0, 0.15


def load(path: Path) -> dict:
    d = json.loads(path.read_text(encoding="utf-8"))
    if d.get("benchmark") != "generate":
        raise SystemExit(f"{path}: not a generation benchmark result (benchmark={d.get('benchmark')!r})")
    return d


def row(d: dict, system: str, heads: int, batch: int) -> dict | None:
    return next((r for r in d["results"] if (r["system"], r["heads"], r["batch"]) == (system, heads, batch)), None)


def median(xs):
    xs = sorted(x for x in (xs or []) if x is not None)
    return None if not xs else (xs[len(xs) // 2] + xs[(len(xs) - 1) // 2]) / 2


def fmt(x, spec: str = ".1f", scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, spec)


# ---- text -------------------------------------------------------------------------------------
def header(d: dict, path: Path) -> list[str]:
    m, s, bw = d["machine"], d["settings"], d["bandwidth"]
    base = d.get("rss_baseline_bytes") or {}
    lines = [
        f"### Generation, {m['device']} ({m['device_name']}), {s['dtype']} — `{path.name}`",
        "",
        f"- Machine: {m['cpu']}, {m['cpus_usable']} usable CPUs, {s['threads']} torch threads"
        + (f"; GPU {m['device_name']} ({m.get('gpu_memory_bytes', 0) / 2**30:.0f} GiB, CUDA {m.get('cuda')})"
           if m["device"].startswith("cuda") else "")
        + f"; load average at start {fmt(m.get('load_avg_1m_at_start'), '.1f')}",
        f"- Versions: torch {m['torch']}, transformers {m['transformers']}, gpt2mh {m['gpt2mh']}, "
        f"Python {m['python']}; run {m['date']}, {d['elapsed_s'] / 60:.1f} min"
        + ("" if d.get("complete") else " (**incomplete run**)"),
        f"- Workload: weights `{s['weights']}`, prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens "
        f"per stream (EOS banned), sampling {sampling(s['sampling'])}; median of {s['rounds']} round(s), "
        f"scenarios interleaved" + (" (`--quick`)" if s.get("quick") else ""),
        f"- Read bandwidth {bw['read_gbs']:.1f} GB/s ({bw['method']}; samples "
        f"{', '.join(f'{x:.1f}' for x in bw['samples_gbs'])})",
    ]
    if base:
        lines.append("- Interpreter baselines (peak RSS of a child after imports): "
                     + ", ".join(f"{k.removeprefix('baseline-')} {v / MIB:.0f} MiB" for k, v in base.items()))
    return lines + [""]


def sampling(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


def speedup(d: dict, r: dict, other: str) -> float | None:
    o = row(d, other, r["heads"], r["batch"])
    return o["wall_s"] / r["wall_s"] if o and o.get("wall_s") and r.get("wall_s") else None


def table(d: dict) -> list[str]:
    cols = ["system", "N", "B", "wall s", "new tok/s", "× vs N models", "× vs nrs", "prefill ms", "decode round ms",
            "bound ms", "× bound", "GB/s", "compile s", "peak RSS MiB", "weights MiB", "CPU %"]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i == 0 else "--:" for i in range(len(cols))) + "|"]
    order = {s: i for i, s in enumerate(SYSTEM_LABELS)}
    for r in sorted(d["results"], key=lambda r: (r["batch"], r["heads"], order.get(r["system"], 9))):
        rss = (r.get("rss") or {}).get("peak_rss")
        out.append("| " + " | ".join([
            r["system"], str(r["heads"]), str(r["batch"]), fmt(r["wall_s"], ".2f"), fmt(r["new_tokens_per_s"], ".0f"),
            fmt(speedup(d, r, "hf-separate"), ".1f"), fmt(speedup(d, r, "hf-nrs"), ".1f"), fmt(r["prefill_ms"], ".0f"), fmt(r["decode_round_ms"], ".1f"),
            fmt(r["bound_ms"], ".1f"), fmt(r["x_bound"], ".2f"), fmt(r["achieved_gbs"], ".1f"),
            fmt(r["compile_s"], ".0f"), fmt(rss, ".0f", 1 / MIB), fmt(r["weights_bytes"], ".0f", 1 / MIB),
            fmt(median(r.get("cpu_share")), ".0f", 100),
        ]) + " |")
    return out + [""]


LEGEND = """\
How to read it: *wall s* is one generate call (prefill + all new tokens for all N x B streams), median
over rounds; *new tok/s* = N x B x new tokens / wall; *× vs N models* / *× vs nrs* = the wall of
transformers with N separate models / with num_return_sequences=N, over this row's wall; *prefill ms* is a call with max_new_tokens=1; *decode round ms* = (wall - prefill) /
(new tokens - 1), one token for every stream; *bound ms* = weight bytes a round must read (trunk
without the embedding tables + the N heads; N whole models for N separate models; one for
num_return_sequences) / the read bandwidth measured in the same run; *× bound* = decode round / bound;
*GB/s* = those bytes / decode round; *compile s* = first compiled call minus the warm call right after it, never
in the other columns; *peak RSS* = peak resident memory of a fresh child process running that system
alone (load + first call, compile included); *weights* = the bytes it holds; *CPU %* = process CPU
time / (wall x torch threads), median over rounds: well under 100 % means other work had the cores.
"""


def check(d: dict) -> list[str]:
    """Issue 6's targets for 3 heads, batch 1: PASS/MISS with the numbers."""
    me = row(d, "gpt2mh-compiled", 3, 1)
    if not me or me.get("wall_s") is None:
        return ["check: no gpt2mh-compiled row for 3 heads, batch 1 in this file (run with --heads including 3)"]
    out = [f"check ({d['machine']['device']}, 3 heads, batch 1, gpt2mh-compiled {me['wall_s']:.2f} s per call, "
           f"median of {len(me['walls_s'])} round(s), CPU share {fmt(median(me.get('cpu_share')), '.0f', 100)} %):"]

    def line(ok, what):
        out.append(f"  {'n/a ' if ok is None else 'PASS' if ok else 'MISS'}  {what}")

    for other, target, label in (("hf-separate", TARGET_VS_SEPARATE, "3 separate transformers models"),
                                 ("hf-nrs", TARGET_VS_NRS, "1 transformers model, num_return_sequences=3")):
        o, x = row(d, other, 3, 1), speedup(d, me, other)
        line(None if x is None else x >= target,
             f"speed vs {label}: {fmt(o and o['wall_s'], '.2f')} s / {me['wall_s']:.2f} s = {fmt(x, '.2f')}x "
             f"(target >= {target:g}x)")
    xb = me.get("x_bound")
    line(None if xb is None else xb <= TARGET_X_BOUND,
         f"decode round vs bandwidth bound: {fmt(me['decode_round_ms'])} ms / {me['bound_ms']:.1f} ms = "
         f"{fmt(xb, '.2f')}x (target <= {TARGET_X_BOUND:g}x; {d['bandwidth']['read_gbs']:.1f} GB/s measured, "
         f"{fmt(me['achieved_gbs'])} GB/s achieved)")
    rss, base = me.get("rss") or {}, (d.get("rss_baseline_bytes") or {}).get("baseline-gpt2mh")
    if not rss or base is None:
        line(None, "peak RSS: not measured (run with --rss first-batch, all or target)")
        return out
    limit = me["weights_bytes"] * (1 + TARGET_RSS_SLACK) + base
    for key, what in (("peak_rss", "peak RSS (load + first call, compile included)"),
                      ("peak_rss_warm_call", "peak RSS during a warm call")):
        v = rss.get(key)
        line(None if v is None else v <= limit,
             f"{what}: {fmt(v, '.0f', 1 / MIB)} MiB vs limit {limit / MIB:.0f} MiB = weights "
             f"{me['weights_bytes'] / MIB:.0f} MiB x {1 + TARGET_RSS_SLACK:.2f} + interpreter {base / MIB:.0f} MiB"
             + ("" if v is None else f" ({(v - limit) / MIB:+.0f} MiB)"))
    return out


# ---- plot -------------------------------------------------------------------------------------
def plot(d: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    batches = sorted({r["batch"] for r in d["results"]})
    for system in SYSTEM_LABELS:
        for i, b in enumerate(batches):
            rs = sorted((r for r in d["results"] if r["system"] == system and r["batch"] == b), key=lambda r: r["heads"])
            if not rs:
                continue
            kw = dict(color=COLORS[system], linestyle=STYLES[i % len(STYLES)], marker="o",
                      label=f"{SYSTEM_LABELS[system]}, batch {b}")
            ax1.plot([r["heads"] for r in rs], [r["new_tokens_per_s"] for r in rs], **kw)
            ax2.plot([r["heads"] for r in rs], [r["x_bound"] for r in rs], **kw)
    heads = sorted({r["heads"] for r in d["results"]})
    ax1.set(xlabel="heads N", ylabel="new tokens / s (all streams)", yscale="log", xticks=heads,
            title="throughput")
    ax2.axhline(1, color="grey", lw=1)
    ax2.axhline(TARGET_X_BOUND, color="grey", lw=1, ls="--")
    ax2.text(heads[0], 1, " bound", va="bottom", fontsize=7, color="grey")
    ax2.text(heads[0], TARGET_X_BOUND, f" target <= {TARGET_X_BOUND:g}x", va="bottom", fontsize=7, color="grey")
    ax2.set(xlabel="heads N", ylabel="decode round / memory-bandwidth bound", yscale="log", xticks=heads,
            title=f"time vs bound ({d['bandwidth']['read_gbs']:.1f} GB/s read)")
    ax1.legend(fontsize=7)
    m, s = d["machine"], d["settings"]
    fig.suptitle(f"generate: {m['device_name']} ({m['device']}, {s['dtype']}, {s['threads']} threads), "
                 f"torch {m['torch']}, transformers {m['transformers']}, {m['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", type=Path)
    p.add_argument("--check", action="store_true", help="print the 3-head batch-1 ratios against issue 6's targets")
    p.add_argument("--readme", type=Path, default=RESULTS / "README.md", help="markdown file written with the tables")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if not args.no_plot and not has_matplotlib():
        sys.exit("report.py: error: the plot needs matplotlib, which is not installed: "
                 "pip install -e '.[bench]' (or pass --no-plot for the table only)")
    md = ["# Benchmark results", "", "Generated by `python benchmarks/report.py " +
          " ".join(str(j) for j in args.json) + "` from the JSON files; do not edit by hand.", ""]
    checks = []
    for path in args.json:
        d = load(path)
        md += header(d, path)
        if not args.no_plot:
            png = plot(d, path.with_suffix(".png"))
            md += [f"![{path.stem}]({relative(png, args.readme.parent)})", ""]
        md += table(d)
        if args.check:
            checks += check(d) + [""]
    md.append(LEGEND)
    text = "\n".join(md)
    print(text)
    if checks:
        print("\n".join(checks))
        md += ["```", *checks, "```", ""]
    args.readme.parent.mkdir(parents=True, exist_ok=True)
    args.readme.write_text("\n".join(md), encoding="utf-8")
    print(f"wrote {args.readme}" + ("" if args.no_plot else " and " + ", ".join(str(j.with_suffix('.png')) for j in args.json)),
          file=sys.stderr)


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


if __name__ == "__main__":
    main()
