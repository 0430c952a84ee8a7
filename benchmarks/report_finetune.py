"""Fine-tuning benchmark JSON -> a markdown table on stdout (and in a file with --write).

    python benchmarks/report_finetune.py benchmarks/results/finetune-cpu.json [more.json ...] [--check]

--check prints the gpt2mh / transformers throughput ratio against issue 4's target (>= 2x at N=3)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MIB = 1 << 20
LABELS = {"gpt2mh": "gpt2mh, one trunk + N heads", "hf": "transformers, N separate fine-tunes"}


def load(path: Path) -> dict:
    d = json.loads(path.read_text(encoding="utf-8"))
    if d.get("benchmark") != "finetune":
        raise SystemExit(f"{path}: not a fine-tuning benchmark result (benchmark={d.get('benchmark')!r})")
    return d


def fmt(x, spec: str = ".1f", scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, spec)


def table(d: dict, path: Path) -> list[str]:
    m, s, r = d["machine"], d["settings"], d["ratio"]
    c = s["model_config"]
    rss, disk = d.get("peak_rss") or {}, d.get("disk") or {}
    disk_of = {"gpt2mh": disk.get("gpt2mh_bytes"), "hf": disk.get("hf_bytes")}
    lines = [
        f"### Fine-tuning, {m['device']} ({m['device_name']}) — `{path.name}`",
        "",
        f"- {s['heads']} heads {s['head_names']}; model {c['n_layer']} layers x {c['n_embd']}, vocab "
        f"{c['vocab_size']} ({s['weights']} weights); batch {s['batch']} examples, {s['steps']} timed steps x "
        f"{s['rounds']} rounds after {s['warmup']} warm-up step(s); {s['threads']} torch threads"
        + (f", {s['autocast']} autocast" if s.get("autocast") else ", fp32"),
        f"- torch {m['torch']}, transformers {m['transformers']}, gpt2mh {m['gpt2mh']}; run {m['date']}, "
        f"{d['elapsed_s'] / 60:.1f} min" + ("" if d.get("complete") else " (**incomplete run**)"),
        "",
        "| system | target tok/s | ms / step (all heads) | peak RSS MiB | on disk MiB | CPU share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for res in d["results"]:
        name = res["system"]
        share = min(res["cpu_share"]) if res.get("cpu_share") else None
        lines.append(f"| {LABELS.get(name, name)} | {fmt(res['target_tokens_per_s'])} | "
                     f"{fmt(res['ms_per_step_all_heads'], '.0f')} | {fmt(rss.get(name), '.0f', 1 / MIB)} | "
                     f"{fmt(disk_of.get(name), '.0f', 1 / MIB)} | {fmt(share, '.0%')} |")
    lines += ["", f"gpt2mh / transformers: **{fmt(r['target_tokens_per_s'], '.2f')}x** target tokens/s "
              f"(per round {', '.join(fmt(x, '.2f') for x in r['per_round'])}); peak RSS "
              f"{fmt(d.get('peak_rss_gpt2mh_over_hf'), '.2f')}x; on disk {fmt(disk.get('gpt2mh_over_hf'), '.2f')}x."]
    w = r.get("work_hf_over_gpt2mh") or {}
    if w:
        lines.append(f"transformers / gpt2mh work per target token: trunk positions {fmt(w.get('positions'), '.2f')}x "
                     f"({fmt(w.get('padded_positions'), '.2f')}x with padding), logit rows "
                     f"{fmt(w.get('logit_rows'), '.2f')}x.")
    lines.append("")
    return lines


def check(d: dict) -> str:
    r, n = d["ratio"], d["settings"]["heads"]
    got = r["target_tokens_per_s"]
    verdict = "PASS" if got is not None and got >= r["target"] else "MISS"
    if n != 3:
        verdict += f" (measured at N={n}; the target is for N=3)"
    return f"fine-tuning throughput vs {n} separate fine-tunes: {fmt(got, '.2f')}x, target >= {r['target']}x: {verdict}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", type=Path)
    p.add_argument("--check", action="store_true", help="compare with issue 4's throughput target")
    p.add_argument("--write", type=Path, help="also write the markdown to this file")
    a = p.parse_args(argv)
    lines = []
    for path in a.json:
        d = load(path)
        lines += table(d, path)
        if a.check:
            lines += [check(d), ""]
    text = "\n".join(lines)
    print(text)
    if a.write:
        a.write.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
