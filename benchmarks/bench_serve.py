"""`gpt2mh serve` under load: 1 / 8 / 32 concurrent clients against one server process, and the same
requests one at a time in-process (no batching across requests).

A rinna-small-shape model (random weights: speed does not depend on them) with three heads, "tense",
"entities", "pos", budgets 4 / 16 / 32 tokens (min_new_tokens = max_new_tokens: every request makes
exactly 52 tokens), greedy; inputs are hironsancorpus sentences. Each client is a thread with its own
keep-alive connection sending POST /v1/generate, one input per request, every other request streamed
(server-sent events). Per level: requests/s, output tokens/s, latency p50/p95/p99 (to the last byte),
time to first token (streamed requests: to the first text event), errors (must be 0). The baseline
runs the same requests with `generate_text`, one after another, in this process (the server stopped).

Then the drain: 32 clients in a loop, SIGTERM after --sigterm-after seconds; every request the server
accepted (a 200 response started) must be answered in full, the process must exit 0.

Writes JSON (benchmarks/results/serve-cpu.json) and a plot of latency against load (.png beside it).

    python benchmarks/bench_serve.py --quick --requests 20     # a tiny model: a smoke test (~1 min)
    python benchmarks/bench_serve.py                            # the measurement (about an hour on 2 cores)

Needs the serve and bench extras: pip install -e ".[serve,bench]".
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the harness beside this script)

HEADS = {"tense": 4, "entities": 16, "pos": 32}
RINNA_SMALL = dict(vocab_size=32000, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
TINY = dict(RINNA_SMALL, n_embd=64, n_layer=2, n_head=2)
PER_HEAD = {h: {"max_new_tokens": b, "min_new_tokens": b} for h, b in HEADS.items()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,8,32", help="concurrency levels")
    p.add_argument("--requests", type=int, default=1000, help="requests per level")
    p.add_argument("--baseline-requests", type=int, default=None,
                   help="requests of the one-at-a-time baseline (default: --requests)")
    p.add_argument("--head-slots", default="tense=6,entities=18,pos=32",
                   help="the server's stream slots per head (about its share of the tokens)")
    p.add_argument("--sigterm-clients", type=int, default=32)
    p.add_argument("--sigterm-after", type=float, default=10.0, help="seconds of load before SIGTERM")
    p.add_argument("--quick", action="store_true", help="a 2-layer model of rinna's vocabulary: a smoke test")
    p.add_argument("--out", type=Path, default=common.RESULTS / "serve-cpu.json")
    return p.parse_args(argv)


def build_model(folder: Path, shape: dict) -> Path:
    from gpt2mh import GPT2Config, MultiHeadGPT2, Tokenizer

    torch.manual_seed(0)
    model = MultiHeadGPT2(GPT2Config(**shape), list(HEADS))
    return model.save_pretrained(folder, tokenizer=Tokenizer.from_pretrained())


def sentences(n: int) -> list[str]:
    from gpt2mh.demo.corpus import build_examples

    texts = [ex.input for split in ("train", "test") for ex in build_examples(split)]
    return [texts[i % len(texts)] for i in range(n)]


# ---- the server --------------------------------------------------------------------------------
class Server:
    def __init__(self, folder: Path, slots: str, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "gpt2mh", "serve", "--model", str(folder), "--port", str(self.port),
               "--head-slots", slots, "--max-queue", "100000", "--request-timeout", "0", "--drain-timeout", "300"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.RESULTS.parents[1]),
                                                                         os.environ.get("PYTHONPATH")]))}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        import httpx

        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpt2mh serve exited {self.proc.returncode}: {log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("gpt2mh serve did not start")

    def stop(self) -> tuple[int, float]:
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(600)
        self.log.close()
        return code, time.perf_counter() - t0


def request(client, url: str, text: str, stream: bool) -> dict:
    """One POST /v1/generate: latency, time to first token (streamed), new tokens, and whether it is whole."""
    body = {"inputs": [text], "per_head": PER_HEAD, "stream": stream}
    t0 = time.perf_counter()
    rec = {"stream": stream, "ttft": None, "tokens": 0, "status": None, "ok": False}
    try:
        if stream:
            with client.stream("POST", url + "/v1/generate", json=body) as r:
                rec["status"] = r.status_code
                final = None
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        rec["ttft"] = rec["ttft"] or time.perf_counter() - t0
                        final = json.loads(line[6:])
                ok = r.status_code == 200 and final is not None and final.get("done")
        else:
            r = client.post(url + "/v1/generate", json=body)
            rec["status"], final = r.status_code, r.json() if r.status_code == 200 else None
            ok = final is not None and len(final["results"]) == 1
        if ok:
            rec["ok"], rec["tokens"] = True, final["usage"]["new_tokens"]
    except Exception as e:  # noqa: BLE001 - counted as an error
        rec["exception"] = repr(e)
    rec["latency"] = time.perf_counter() - t0
    return rec


def load(url: str, texts: list[str], clients: int) -> tuple[list[dict], float]:
    """Every text once, `clients` at a time; (records, wall seconds)."""
    import httpx

    nxt, lock, records = itertools.count(), threading.Lock(), []

    def client_thread():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    i = next(nxt)
                if i >= len(texts):
                    return
                rec = request(client, url, texts[i], stream=i % 2 == 1)
                with lock:
                    records.append(rec)

    threads = [threading.Thread(target=client_thread) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def summary(records: list[dict], wall: float) -> dict:
    import numpy as np

    lat = np.array([r["latency"] for r in records])
    ttft = np.array([r["ttft"] for r in records if r["ttft"] is not None])
    tokens = sum(r["tokens"] for r in records)
    return {"requests": len(records), "errors": sum(not r["ok"] for r in records), "wall_s": wall,
            "requests_per_s": len(records) / wall, "output_tokens_per_s": tokens / wall, "output_tokens": tokens,
            **{f"latency_p{q}_s": float(np.percentile(lat, q)) for q in (50, 95, 99)},
            **{f"ttft_p{q}_s": float(np.percentile(ttft, q)) if len(ttft) else None for q in (50, 95)}}


def baseline(folder: Path, texts: list[str]) -> dict:
    """The same requests with generate_text, one at a time, in this process."""
    from gpt2mh import MultiHeadGPT2, Tokenizer, generate_text

    model, tok = MultiHeadGPT2.from_pretrained(folder).eval(), Tokenizer.for_model(folder)
    for text in texts[:4]:  # warm-up: the first calls pay for allocations and kernel choices
        generate_text(model, tok, text, per_head=PER_HEAD, compile=False)
    records = []
    t0 = time.perf_counter()
    for text in texts:
        t = time.perf_counter()
        generate_text(model, tok, text, per_head=PER_HEAD, compile=False)
        records.append({"latency": time.perf_counter() - t, "ttft": None, "tokens": sum(HEADS.values()), "ok": True})
    return summary(records, time.perf_counter() - t0)


def sigterm(folder: Path, slots: str, texts: list[str], clients: int, after: float, log: Path) -> dict:
    """Clients in a loop (each stops at its first refusal), SIGTERM after `after` s: who got what."""
    import httpx

    server = Server(folder, slots, log)
    records, lock, stop = [], threading.Lock(), threading.Event()

    def client_thread(k: int):
        with httpx.Client(timeout=600) as client:
            for n in itertools.count():
                rec = request(client, server.url, texts[(k * 7919 + n) % len(texts)], stream=n % 2 == 1)
                with lock:
                    records.append(rec)
                if not rec["ok"] or stop.is_set():
                    return

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(after)
    code, drain_s = server.stop()
    stop.set()
    for t in threads:
        t.join(600)
    accepted = [r for r in records if r["status"] == 200]
    refused = [r for r in records if r["status"] == 503 or "ConnectError" in r.get("exception", "")]
    return {"clients": clients, "after_s": after, "exit_code": code, "drain_s": drain_s, "requests": len(records),
            "accepted": len(accepted), "answered": sum(r["ok"] for r in accepted),
            "refused_while_draining": len(refused),
            "dropped": len(records) - sum(r["ok"] for r in accepted) - len(refused)}


# ---- output ------------------------------------------------------------------------------------
def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = out["levels"]
    x = [r["clients"] for r in levels]
    fig, ax = plt.subplots(figsize=(6, 4))
    for q, style in ((50, "o-"), (95, "s--"), (99, "^:")):
        ax.plot(x, [r[f"latency_p{q}_s"] for r in levels], style, label=f"server p{q}")
    ax.axhline(out["baseline"]["latency_p50_s"], color="gray", lw=1, label="one at a time, p50")
    ax.set(xscale="log", xticks=x, xticklabels=x, xlabel="concurrent clients", ylabel="latency (s)",
           title=f"gpt2mh serve: {out['shape']['n_layer']}-layer model, 52 tokens per request")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(out: dict) -> str:
    lines = ["| clients | requests/s | output tok/s | p50 s | p95 s | p99 s | TTFT p50 s | errors |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    b = out["baseline"]
    lines.append(f"| one at a time (in-process) | {b['requests_per_s']:.2f} | {b['output_tokens_per_s']:.0f} | "
                 f"{b['latency_p50_s']:.2f} | {b['latency_p95_s']:.2f} | {b['latency_p99_s']:.2f} | | {b['errors']} |")
    for r in out["levels"]:
        lines.append(f"| {r['clients']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.0f} | "
                     f"{r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | {r['latency_p99_s']:.2f} | "
                     f"{r['ttft_p50_s']:.2f} | {r['errors']} |")
    s = out["sigterm"]
    lines.append(f"\nSIGTERM under {s['clients']} clients: {s['answered']}/{s['accepted']} accepted requests answered, "
                 f"{s['dropped']} dropped, {s['refused_while_draining']} refused while draining, exit code "
                 f"{s['exit_code']}, drained in {s['drain_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    shape = TINY if args.quick else RINNA_SMALL
    levels = [int(c) for c in args.clients.split(",")]
    texts = sentences(args.requests)
    out = {"machine": common.machine_info(torch.device("cpu")), "shape": shape, "heads": HEADS,
           "settings": {"requests": args.requests, "head_slots": args.head_slots, "greedy": True,
                        "tokens_per_request": sum(HEADS.values()), "stream": "every other request"},
           "command": "python benchmarks/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "levels": []}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as d:
        folder = build_model(Path(d) / "model", shape)
        server = Server(folder, args.head_slots, Path(d) / "serve.log")
        load(server.url, texts[:4], 2)  # warm-up: caches allocated, kernels packed
        for clients in levels:
            common.log(f"{clients} client(s): {args.requests} requests ...")
            records, wall = load(server.url, texts, clients)
            row = {"clients": clients, **summary(records, wall)}
            out["levels"].append(row)
            common.log(f"  {row['requests_per_s']:.2f} req/s, {row['output_tokens_per_s']:.0f} tok/s, "
                       f"p50 {row['latency_p50_s']:.2f} s, p99 {row['latency_p99_s']:.2f} s, {row['errors']} errors")
        code, _ = server.stop()
        out["server_exit_code"] = code
        common.log(f"one at a time, in-process: {args.baseline_requests or args.requests} requests ...")
        out["baseline"] = baseline(folder, texts[:args.baseline_requests or args.requests])
        common.log(f"SIGTERM under {args.sigterm_clients} clients after {args.sigterm_after:g} s ...")
        out["sigterm"] = sigterm(folder, args.head_slots, texts, args.sigterm_clients, args.sigterm_after,
                                 Path(d) / "sigterm.log")
    top = max(out["levels"], key=lambda r: r["clients"])
    out["speedup_at_most_clients"] = top["requests_per_s"] / out["baseline"]["requests_per_s"]
    common.write_json(args.out, out)
    plot(out, args.out.with_suffix(".png"))
    common.log(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    print(table(out))


if __name__ == "__main__":
    main()
