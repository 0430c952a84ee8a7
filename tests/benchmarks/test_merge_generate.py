"""benchmarks/merge_generate.py: parts of one grid become one file, bounds on one bandwidth."""

from helpers import load_benchmark


def load():
    return load_benchmark("merge_generate")


def part(gbs, heads, batch, round_ms):
    row = {"system": "s", "heads": heads, "batch": batch, "read_bytes_per_round": 2e9 / 1e3,
           "kv_bytes_per_round": 0, "decode_round_ms": round_ms, "bound_ms": 0.0, "x_bound": 0.0}
    return {"benchmark": "generate", "complete": True, "elapsed_s": 10.0, "machine": {"date": "d"},
            "settings": {"heads": [heads], "batch": [batch]},
            "bandwidth": {"read_gbs": gbs, "samples_gbs": [gbs], "method": "m"}, "results": [row]}


def test_merge_recomputes_bounds_on_the_best_bandwidth():
    m = load().merge([part(10.0, 1, 1, 1.0), part(20.0, 3, 8, 0.5)])
    assert m["bandwidth"]["read_gbs"] == 20.0 and m["bandwidth"]["samples_gbs"] == [10.0, 20.0]
    assert m["settings"]["heads"] == [1, 3] and m["settings"]["batch"] == [1, 8]
    assert len(m["parts"]) == 2 and m["elapsed_s"] == 20.0
    # 2 MB per round at 20 GB/s = 0.1 ms
    assert [round(r["bound_ms"], 9) for r in m["results"]] == [0.1, 0.1]
    assert [round(r["x_bound"], 9) for r in m["results"]] == [10.0, 5.0]
