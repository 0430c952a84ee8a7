"""Merge generation-benchmark JSONs of one grid, run as several invocations (one lock hold each).

    python benchmarks/merge_generate.py OUT.json PART.json [PART.json ...]

Results are concatenated; every row's bound is recomputed with the best read bandwidth of all the
parts (each part measured its own: `parts` keeps their settings and bandwidth samples)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the harness beside this script)


def merge(parts: list[dict]) -> dict:
    out = dict(parts[0])
    samples = [x for p in parts for x in p["bandwidth"]["samples_gbs"]]
    bw = max(samples) * 1e9
    out["bandwidth"] = {**parts[0]["bandwidth"], "read_gbs": bw / 1e9, "samples_gbs": samples}
    out["settings"] = {**parts[0]["settings"],
                       "heads": sorted({n for p in parts for n in p["settings"]["heads"]}),
                       "batch": sorted({b for p in parts for b in p["settings"]["batch"]})}
    out["complete"] = all(p["complete"] for p in parts)
    out["elapsed_s"] = sum(p["elapsed_s"] for p in parts)
    out["parts"] = [{"settings": p["settings"], "bandwidth": p["bandwidth"], "date": p["machine"]["date"],
                     "load_avg_1m_at_start": p["machine"].get("load_avg_1m_at_start")} for p in parts]
    rows = []
    for r in (r for p in parts for r in p["results"]):
        r = dict(r)
        r["bound_ms"] = r["read_bytes_per_round"] / bw * 1e3
        r["bound_with_kv_ms"] = (r["read_bytes_per_round"] + r["kv_bytes_per_round"]) / bw * 1e3
        r["x_bound"] = r["decode_round_ms"] / r["bound_ms"] if r.get("decode_round_ms") else None
        rows.append(r)
    out["results"] = rows
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the merged JSON")
    p.add_argument("parts", nargs="+", help="the JSONs of the grid's invocations")
    args = p.parse_args(argv)
    parts = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.parts]
    common.write_json(args.out, merge(parts))


if __name__ == "__main__":
    main()
