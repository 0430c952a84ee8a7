"""The CUDA path in one call: parity, CUDA-graph decoding, bf16 fine-tuning, DDP, and speed.

    python benchmarks/checks/gpu_check.py                       # on a CUDA machine: rinna-small shape, < 6 min
    python benchmarks/checks/gpu_check.py --device cpu --quick  # the same code path on CPU, small shapes (CI)

Writes one JSON (default benchmarks/results/gpu-check-<device>.json) and a short summary on stdout;
exits 1 if any check failed. Every check runs even when an earlier one failed. Random weights of the
chosen shape, written by transformers itself in rinna's HF layout (no download); transformers is
the reference (4.57 and 5.x lines both work). On CPU "compiled" is inductor C++ (no CUDA graphs,
so the cudagraph-fallback check only applies on CUDA)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from gpt2mh import MultiHeadGPT2  # noqa: E402

RINNA_SMALL = dict(vocab_size=32000, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
QUICK = dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=256,
             bos_token_id=1, eos_token_id=2, pad_token_id=3)
PAD, EOS = 3, 2
HEADS3 = ["reading", "entities", "pos"]


# ---- helpers ------------------------------------------------------------------------------------
def hf_model(shape: dict, folder: Path):
    """A random GPT2LMHeadModel (biases and LayerNorms perturbed too) saved by transformers."""
    import transformers

    cfg = transformers.GPT2Config(**shape)
    torch.manual_seed(1234)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


def load_hf(folder: Path, device, dtype=torch.float32):
    import transformers

    try:  # transformers 5.x: dtype=; 4.x: torch_dtype=
        m = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    except TypeError:
        m = transformers.GPT2LMHeadModel.from_pretrained(folder, torch_dtype=dtype, attn_implementation="eager")
    return m.to(device).eval()


def prompts(B: int, T: int, V: int, device, seed: int = 0):
    """(ids, mask): random non-special tokens; row b left-padded by (3 * b) % T // 2 pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        p = (3 * b) % T // 2
        ids[b, :p], mask[b, :p] = PAD, 0
    return ids.to(device), mask.to(device)


def hf_logits(hf, ids, mask):
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        return hf(ids, attention_mask=mask, position_ids=pos).logits


def hf_greedy(hf, ids, mask, new: int, **kw):
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                          pad_token_id=PAD, eos_token_id=EOS, **kw)
    return out[:, ids.shape[1]:]


class LogCapture(logging.Handler):
    """Collects inductor/dynamo log records: "skipping cudagraphs due to ..." is a perf hint."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def matching(self, *needles) -> list[str]:
        return [m for m in self.lines if any(n in m for n in needles)]


def dynamo_counters():
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"],
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0)}


# ---- checks -------------------------------------------------------------------------------------
def check_parity(folder: Path, dev, quick: bool) -> dict:
    """Logits of every fresh head vs GPT2LMHeadModel: fp32 (TF32 off) and bf16."""
    V = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids, mask = prompts(4, 16 if quick else 64, V, dev)
    out = {}
    ref32 = hf_logits(load_hf(folder, dev), ids, mask).float()
    ours = MultiHeadGPT2.from_pretrained(folder, heads=HEADS3, device=dev).eval()
    with torch.no_grad():
        got = ours(ids, mask).float()  # (N, B, T, V)
    keep = mask.bool()  # pad positions are never used
    err32 = max(float((g - ref32)[keep].abs().max()) for g in got)
    out["fp32"] = {"max_abs_err": err32, "tolerance": 1e-4, "ok": err32 <= 1e-4}
    # bf16: both sides round every matmul input to 8 mantissa bits, in different kernel orders, so the
    # two bf16 results differ by about as much as each differs from fp32. The check: our bf16 error
    # against the fp32 reference stays within 1.5x transformers' own bf16 error (+ 1e-2 slack).
    if dev.type == "cuda" or not quick:
        hf16 = hf_logits(load_hf(folder, dev, torch.bfloat16), ids, mask).float()
        ours16 = MultiHeadGPT2.from_pretrained(folder, heads=HEADS3, device=dev, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            got16 = ours16(ids, mask).float()
        e_ours = max(float((g - ref32)[keep].abs().max()) for g in got16)
        e_hf = float((hf16 - ref32)[keep].abs().max())
        tol = 1.5 * e_hf + 1e-2
        out["bf16"] = {"max_abs_err_vs_fp32": e_ours, "hf_bf16_err_vs_fp32": e_hf, "tolerance": tol,
                       "ok": e_ours <= tol}
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def check_greedy(folder: Path, dev, quick: bool, logs: LogCapture) -> dict:
    """Greedy ids, 3 heads, batch 1 and 8 left-padded: compiled == eager == transformers; the
    compiled step makes no new graph for new prompt lengths in one bucket; no cudagraph fallback."""
    V = json.loads((folder / "config.json").read_text())["vocab_size"]
    hf = load_hf(folder, dev)
    model = MultiHeadGPT2.from_pretrained(folder, heads=HEADS3, device=dev).eval()
    new = 12 if quick else 32
    out = {}
    for B in (1, 8):
        ids, mask = prompts(B, 20, V, dev, seed=B)
        ref = hf_greedy(hf, ids, mask, new)
        eager = model.generate(ids, mask, compile=False, max_new_tokens=new, min_new_tokens=new)
        comp = model.generate(ids, mask, compile=True, max_new_tokens=new, min_new_tokens=new)
        out[f"batch{B}"] = {
            "eager_eq_hf": all(torch.equal(eager[h], ref) for h in HEADS3),
            "compiled_eq_eager": all(torch.equal(comp[h], eager[h]) for h in HEADS3),
        }
    # new prompt lengths in the same 64-token cache bucket: no new graph
    before = dynamo_counters()["unique_graphs"]
    for T in (17, 23, 29):
        ids, mask = prompts(8, T, V, dev, seed=T)
        model.generate(ids, mask, compile=True, max_new_tokens=new, min_new_tokens=new)
    out["new_graphs_over_3_calls"] = dynamo_counters()["unique_graphs"] - before
    skips = logs.matching("skipping cudagraphs", "cudagraph", "re-recording") if dev.type == "cuda" else []
    out["cudagraph_fallback_log"] = [s for s in skips if "skipping" in s]
    out["cudagraph_rerecord_log"] = [s for s in skips if "re-record" in s]
    out["cudagraph_skips_counter"] = dynamo_counters()["cudagraph_skips"]
    out["ok"] = (all(v["eager_eq_hf"] and v["compiled_eq_eager"] for k, v in out.items() if k.startswith("batch"))
                 and out["new_graphs_over_3_calls"] == 0 and not out["cudagraph_fallback_log"]
                 and out["cudagraph_skips_counter"] == 0)
    model.clear_cache()
    return out


def check_sampling(folder: Path, dev, quick: bool) -> dict:
    """The seed memo's sampling settings with a seed: the same tokens run to run (compiled)."""
    V = json.loads((folder / "config.json").read_text())["vocab_size"]
    model = MultiHeadGPT2.from_pretrained(folder, heads=HEADS3, device=dev).eval()
    ids, mask = prompts(8, 20, V, dev, seed=7)
    kw = dict(do_sample=True, temperature=1.5, top_p=0.95, top_k=40, max_new_tokens=12 if quick else 32,
              bad_words_ids=[[0], [1], [2]], compile=True)
    a = model.generate(ids, mask, seed=0, **kw)
    b = model.generate(ids, mask, seed=0, **kw)
    c = model.generate(ids, mask, seed=1, **kw)
    model.clear_cache()
    same = all(torch.equal(a[h], b[h]) for h in HEADS3)
    differs = any(not torch.equal(a[h], c[h]) for h in HEADS3)
    return {"same_seed_same_tokens": same, "other_seed_differs": differs, "ok": same and differs}


def copy_bandwidth(dev) -> float:
    """Bytes/s moved by a device copy (read + write) of 1 GiB (0.25 GiB on CPU), best of several."""
    n = (common.GIB if dev.type == "cuda" else common.GIB // 4) // 4
    x = torch.ones(n, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    best = min(common.timed(lambda: y.copy_(x), dev)[0] for _ in range(20 if dev.type == "cuda" else 3))
    return 2 * x.numel() * 4 / best


def round_ms(fn_full, fn_prefill, new: int, dev, repeats: int) -> float:
    """Median ms of one decode round: (full call - prefill-only call) / (new - 1)."""
    rounds = []
    for _ in range(repeats):
        wall, _ = common.timed(fn_full, dev)
        pre, _ = common.timed(fn_prefill, dev)
        rounds.append((wall - pre) / (new - 1) * 1e3)
    return common.median(rounds)


def check_speed(folder: Path, dev, quick: bool, deadline: float) -> dict:
    """ms per decode round for N heads x B prompts, GB/s of weights read, beside transformers."""
    V = json.loads((folder / "config.json").read_text())["vocab_size"]
    new, T, repeats = (16, 16, 2) if quick else (64, 32, 3)
    copy_bw = copy_bandwidth(dev)
    out = {"copy_bandwidth_GBps": copy_bw / 1e9, "new_tokens": new, "prompt_tokens": T, "rows": []}
    hf = load_hf(folder, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out["dtype"] = str(dtype)
    for N in (1, 3, 8):
        model = MultiHeadGPT2.from_pretrained(folder, heads=[f"h{i}" for i in range(N)], device=dev, dtype=dtype).eval()
        n_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "wpe" not in n)
        for B in (1, 8):
            if time.monotonic() > deadline:
                out["rows"].append({"N": N, "B": B, "skipped": "time budget reached"})
                continue
            ids, mask = prompts(B, T, V, dev, seed=N * 10 + B)
            kw = dict(compile=True, max_new_tokens=new, min_new_tokens=new)
            t_compile, _ = common.timed(lambda: model.generate(ids, mask, **kw), dev)  # warm-up and compile
            ms = round_ms(lambda: model.generate(ids, mask, **kw),
                          lambda: model.generate(ids, mask, compile=True, max_new_tokens=1), new, dev, repeats)
            row = {"N": N, "B": B, "gpt2mh_round_ms": ms, "rounds_per_s": 1e3 / ms,
                   "first_call_s": t_compile, "weights_GB": n_bytes / 1e9,
                   "achieved_GBps": n_bytes / (ms / 1e3) / 1e9, "x_copy_bound": ms / 1e3 / (n_bytes / (copy_bw / 2))}
            # transformers: N distinct heads need N models; one model's round, measured, times N
            hf_kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=PAD, eos_token_id=EOS)
            hf_ms = hf_round_ms(hf, ids, mask, hf_kw, new, dev, repeats)
            row["hf_one_model_round_ms"] = hf_ms
            row["hf_N_models_round_ms"] = N * hf_ms
            if dev.type == "cuda":  # transformers' static cache (it compiles the forward itself)
                hs_ms = hf_round_ms(hf, ids, mask, dict(hf_kw, cache_implementation="static"), new, dev, repeats)
                row["hf_static_one_model_round_ms"] = hs_ms
                row["hf_static_N_models_round_ms"] = N * hs_ms
            row["x_vs_hf_N_models"] = row["hf_N_models_round_ms"] / ms
            out["rows"].append(row)
            common.log(f"speed N={N} B={B}: {ms:.2f} ms/round, {row['achieved_GBps']:.0f} GB/s; "
                       f"transformers x{N}: {row['hf_N_models_round_ms']:.2f} ms")
        model.clear_cache()
        del model
    out["ok"] = True  # figures, not a pass/fail check
    return out


@torch.no_grad()
def hf_round_ms(hf, ids, mask, kw: dict, new: int, dev, repeats: int) -> float:
    """ms per decode round of one transformers model: `new` tokens minus a 1-token run (the prefill), after a warm-up."""
    one = {**kw, "max_new_tokens": 1, "min_new_tokens": 1}
    hf.generate(ids, attention_mask=mask, **kw)
    return round_ms(lambda: hf.generate(ids, attention_mask=mask, **kw),
                    lambda: hf.generate(ids, attention_mask=mask, **one), new, dev, repeats)


def write_data(folder: Path, n: int = 16) -> Path:
    """A tiny multi-task JSONL (kana strings; the tokenizer is rinna's, shipped with gpt2mh)."""
    import random

    rng = random.Random(0)
    kana = [chr(c) for c in range(0x30A2, 0x30F3)]
    path = folder / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            s = "".join(rng.choice(kana) for _ in range(rng.randint(4, 12)))
            f.write(json.dumps({"input": s, "reading": s[::-1], "entities": s[:3], "pos": "名詞 " * 3},
                               ensure_ascii=False) + "\n")
    return path


def train_config(data: Path, out: Path, dev, steps: int, **kw):
    from gpt2mh.train.config import TrainConfig

    # A constant learning rate: a schedule over max_steps would give the run stopped early other
    # learning rates than the uninterrupted one, and the resumed step a different loss.
    return TrainConfig(train_file=str(data), heads=HEADS3, output_dir=str(out), max_steps=steps, batch_size=4,
                       learning_rate=1e-3, warmup_steps=0, lr_schedule="constant", model_config=dict(QUICK, vocab_size=32000),
                       bf16=dev.type == "cuda", device=str(dev), dropout=0.0, eval_every=0, eval_samples=0,
                       save_every=1, keep_last=None, log_every=1, progress=False, seed=0, **kw)


def check_finetune(dev, work: Path) -> dict:
    """One bf16 (CUDA) step of the packed multi-head loss, checkpoint, resume: the next step's loss
    equals the uninterrupted run's."""
    from gpt2mh.train.loop import train

    data = write_data(work)
    full = train(train_config(data, work / "full", dev, 3))
    train(train_config(data, work / "split", dev, 2))
    resumed = train(train_config(data, work / "split", dev, 3, resume=True))
    a, b = full.losses[-1], resumed.losses[-1]
    # Same ops in the same order on the same device after restoring weights, optimizer and RNG: the
    # losses agree to rounding (bf16 autocast matmuls are deterministic for a fixed shape).
    tol = 1e-5 * max(1.0, abs(a))
    return {"bf16": dev.type == "cuda", "loss_uninterrupted": a, "loss_resumed": b, "abs_diff": abs(a - b),
            "tolerance": tol, "resumed_steps": len(resumed.losses), "ok": abs(a - b) <= tol and len(resumed.losses) == 1}


def check_torchrun(dev, work: Path) -> dict:
    """`torchrun --nproc_per_node=1` through gpt2mh's training entry point (nccl on CUDA, gloo on CPU)."""
    data = work / "train.jsonl" if (work / "train.jsonl").exists() else write_data(work)
    cfg = train_config(data, work / "ddp", dev, 2).to_dict()
    path = work / "ddp.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29533",
           "-m", "gpt2mh", "train", "--config", str(path), "--set", "progress=false"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    log = proc.stdout + proc.stderr
    backend = "nccl" if dev.type == "cuda" else "gloo"
    ckpt = (work / "ddp" / "checkpoint-2" / "model.safetensors").exists()
    return {"backend": backend, "exit_code": proc.returncode, "checkpoint_written": ckpt,
            "log_tail": log[-1500:] if proc.returncode else "", "ok": proc.returncode == 0 and ckpt}


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small shapes and few tokens (the CPU/CI form)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="speed cells not started by then are skipped (the whole run stays under 6 min on an H200)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu-check-<device>.json)")
    p.add_argument("--only", default=None, help="comma-separated checks: parity,greedy,sampling,finetune,torchrun,speed")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; run on a GPU machine or pass --device cpu --quick",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means true fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    logs = LogCapture()
    for name in ("torch._inductor", "torch._dynamo"):
        logging.getLogger(name).addHandler(logs)
    try:
        torch._logging.set_logs(perf_hints=True)
    except Exception:  # older logging API: the counters still tell
        pass
    shape = QUICK if args.quick else RINNA_SMALL
    only = set(args.only.split(",")) if args.only else None
    result = {"machine": common.machine_info(dev), "shape": shape, "quick": args.quick, "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = hf_model(shape, work / "hf")
        checks = [("parity", lambda: check_parity(folder, dev, args.quick)),
                  ("greedy", lambda: check_greedy(folder, dev, args.quick, logs)),
                  ("sampling", lambda: check_sampling(folder, dev, args.quick)),
                  ("finetune", lambda: check_finetune(dev, work)),
                  ("torchrun", lambda: check_torchrun(dev, work)),
                  ("speed", lambda: check_speed(folder, dev, args.quick, t0 + args.budget_s))]
        for name, fn in checks:
            if only and name not in only:
                continue
            c0 = time.monotonic()
            try:
                res = fn()
            except Exception as e:  # record and go on: one broken check must not hide the others
                res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            res["seconds"] = time.monotonic() - c0
            result["checks"][name] = res
            common.log(f"{name}: {'ok' if res['ok'] else 'FAILED'} ({res['seconds']:.0f} s)")
    result["seconds"] = time.monotonic() - t0
    result["ok"] = all(c["ok"] for c in result["checks"].values())
    out = Path(args.out) if args.out else common.RESULTS / f"gpu-check-{dev.type}.json"
    common.write_json(out, result)
    print(summary(result, out))
    return 0 if result["ok"] else 1


def summary(result: dict, out: Path) -> str:
    lines = [f"gpu_check on {result['machine']['device_name']} ({result['machine']['device']}), "
             f"{'quick' if result['quick'] else 'rinna-small shape'}: {'ALL OK' if result['ok'] else 'FAILURES'} "
             f"in {result['seconds']:.0f} s -> {out}"]
    for name, c in result["checks"].items():
        detail = c.get("error") or ""
        if name == "parity":
            detail = ", ".join(f"{k} err {v.get('max_abs_err', v.get('max_abs_err_vs_fp32')):.2e} (tol {v['tolerance']:.1e})"
                               for k, v in c.items() if isinstance(v, dict))
        elif name == "speed" and "rows" in c:
            detail = "; ".join(f"N={r['N']} B={r['B']} {r['gpt2mh_round_ms']:.2f} ms ({r['x_vs_hf_N_models']:.1f}x HF)"
                               for r in c["rows"] if "gpt2mh_round_ms" in r)
        lines.append(f"  {name:9s} {'ok' if c['ok'] else 'FAILED':6s} {detail}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
