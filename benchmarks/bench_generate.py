"""Generation benchmark: gpt2mh against transformers' GPT2LMHeadModel.generate, N heads.

Systems, all with the seed memo's sampling settings, EOS banned (every stream gets exactly
--new-tokens tokens) and the same prompt:
  gpt2mh-compiled  one trunk + N fused heads, `model.generate(compile=True)`
  gpt2mh-eager     the same model, `compile=False`
  gpt2mh-int8      its own copy with int8 weights, `from_pretrained(..., quantize="int8")`, eager
  gpt2mh-int8-compiled  the same int8 model, `compile=True` (fbgemm as a custom op in the graph)
  hf-separate      N separate GPT2LMHeadModel copies, one generate each (the seed memo's first option)
  hf-nrs           one GPT2LMHeadModel, `num_return_sequences=N` (N streams but no distinct heads:
                   a lower bound for what transformers can do)
  ct2-fp32-separate, ct2-int8-separate
                   CTranslate2 (optional `bench` extra), the same folder converted with
                   TransformersConverter at fp32 / int8; N distinct heads as N models one after another
  ct2-int8-nh      one CTranslate2 int8 model, `num_hypotheses=N` (no distinct heads: a lower bound)
                   CTranslate2 systems are skipped with a message when ctranslate2 is not installed.

With --num-beams K every system searches instead of sampling (greedy beam search, K beams per head,
EOS banned, bad words as above): gpt2mh's N heads in one call, transformers' N models with
`num_beams=K`, CTranslate2's N models with `beam_size=K` (hf-nrs and ct2-int8-nh have no beam form):

    python benchmarks/bench_generate.py --num-beams 4 --heads 3 --batch 1 \
        --systems gpt2mh-int8,gpt2mh-int8-compiled,gpt2mh-eager,hf-separate,ct2-int8-separate,ct2-fp32-separate

Scenarios (system x heads x batch) are interleaved round by round, so a slow moment of a shared
machine hits every system alike. Peak RSS comes from a fresh child process per system
(`--isolate`). Writes JSON; `report.py` makes the plot and the table.

    python benchmarks/bench_generate.py --quick
    python benchmarks/bench_generate.py                      # the full grid (~15 min on 2 CPU cores)
    python benchmarks/bench_generate.py --device cuda        # bf16, CUDA graphs
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the harness beside this script)

SYSTEMS = ("gpt2mh-compiled", "gpt2mh-eager", "gpt2mh-int8", "gpt2mh-int8-compiled", "hf-separate", "hf-nrs",
           "ct2-fp32-separate", "ct2-int8-separate", "ct2-int8-nh")
CT2_SYSTEMS = ("ct2-fp32-separate", "ct2-int8-separate", "ct2-int8-nh")
BASELINES = ("baseline-gpt2mh", "baseline-hf")
# rinna/japanese-gpt2-small's shape and special ids (its config.json); random weights, no download.
RINNA_SMALL = dict(vocab_size=32000, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
# The seed memo's generate call (unk, bos, eos banned as bad words; HF keeps EOS out of that ban).
SAMPLING = dict(do_sample=True, temperature=1.5, top_p=0.95, top_k=40, bad_words_ids=[[0], [1], [2]])
QUICK = dict(heads="1,3", batch="1", rounds=1)


def int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="1,2,3,4,8", help="numbers of heads N, comma-separated")
    p.add_argument("--batch", default="1,8", help="prompts per call, comma-separated")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--weights", default="random",
                   help="'random' (rinna-small shape) or a HF GPT-2 checkpoint folder / hub repo id")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="subset of " + ",".join(SYSTEMS))
    p.add_argument("--rss", choices=("first-batch", "all", "target", "none"), default=None,
                   help="scenarios whose peak RSS is measured in a child process each: every N at the "
                        "smallest batch (default), every scenario, only 3 heads batch 1 (--quick's "
                        "default), or none")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-beams", dest="num_beams", type=int, default=1,
                   help="beam search with this many beams per head instead of sampling (default 1: sampling)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generate-<device>.json)")
    p.add_argument("--quick", action="store_true", help="smoke test: heads 1,3; batch 1; 1 round")
    # Internal: run one system in this (child) process and write its memory figures.
    p.add_argument("--isolate", choices=SYSTEMS + BASELINES, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.heads, a.batch, a.rounds = QUICK["heads"], QUICK["batch"], QUICK["rounds"]
    a.rss = a.rss or ("target" if a.quick else "first-batch")
    if a.threads:
        torch.set_num_threads(a.threads)
    a.heads, a.batch, a.systems = int_list(a.heads), int_list(a.batch), a.systems.split(",")
    bad = [s for s in a.systems if s not in SYSTEMS]
    if bad:
        p.error(f"unknown system(s) {bad}; choose from {list(SYSTEMS)}")
    if a.num_beams > 1 and {"hf-nrs", "ct2-int8-nh"} & set(a.systems):
        p.error("--num-beams: hf-nrs and ct2-int8-nh have no beam search form; leave them out of --systems")
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (a decode round is timed from the second token on)")
    a.device = torch.device(a.device)
    a.dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.type == "cuda" else "float32"))
    beams = f"-beam{a.num_beams}" if a.num_beams > 1 else ""
    a.out = Path(a.out or common.RESULTS / f"generate{beams}-{a.device.type}.json")
    return a


# ---- weights ----------------------------------------------------------------------------------
@contextlib.contextmanager
def checkpoint_folder(weights: str, seed: int):
    """A HF GPT-2 checkpoint folder both systems load: random rinna-small shape in a temp dir, or given."""
    if weights != "random":
        from gpt2mh.weights.hub import resolve_checkpoint

        yield resolve_checkpoint(weights)
        return
    import transformers

    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**RINNA_SMALL))
    with tempfile.TemporaryDirectory(prefix="bench-gpt2-") as d:
        hf.save_pretrained(d)
        del hf
        yield Path(d)


@dataclass(frozen=True)
class Shape:
    """Byte counts of one checkpoint at one dtype (from a meta-device model: nothing allocated)."""
    trunk: int      # every trunk parameter (held in memory)
    embed: int      # wte + wpe: a decode step gathers a few rows of them, not the whole tables
    head: int       # one LM head, n_embd x vocab
    kv_token: int   # K and V of one position of one stream, all layers
    tied: bool      # HF's lm_head shares wte's storage (no extra bytes per HF model)

    @classmethod
    def of(cls, cfg, dtype: torch.dtype, tied: bool) -> "Shape":
        from gpt2mh import MultiHeadGPT2

        with torch.device("meta"):
            m = MultiHeadGPT2(cfg, ["h"])
        size = torch.empty((), dtype=dtype).element_size()
        trunk = sum(p.numel() for p in m.transformer.parameters()) * size
        embed = (m.transformer.wte.weight.numel() + m.transformer.wpe.weight.numel()) * size
        return cls(trunk, embed, cfg.n_embd * cfg.vocab_size * size, 2 * cfg.n_layer * cfg.n_embd * size, tied)

    def held(self, system: str, n: int) -> int:
        """Weight bytes a system keeps in memory."""
        hf_one = self.trunk + (0 if self.tied else self.head)
        ct2 = {"ct2-fp32-separate": n * hf_one, "ct2-int8-separate": n * hf_one // 4, "ct2-int8-nh": hf_one // 4}
        return {"hf-separate": n * hf_one, "hf-nrs": hf_one, **ct2}.get(system, self.trunk + n * self.head)

    def read_per_round(self, system: str, n: int) -> int:
        """Weight bytes one decode round must read (one token for every stream)."""
        one = self.trunk - self.embed + self.head
        if system.startswith("ct2-int8"):
            return (n if system.endswith("separate") else 1) * one // 4
        if system == "ct2-fp32-separate":
            return n * one
        if system.startswith("gpt2mh-int8"):  # int8 linears and heads: a quarter of the fp32 bytes (LN/bias ~0.1%)
            return (self.trunk - self.embed + n * self.head) // 4
        return {"hf-separate": n * one, "hf-nrs": one}.get(system, self.trunk - self.embed + n * self.head)


def checkpoint_config(folder: Path):
    from gpt2mh import GPT2Config

    cfg = GPT2Config.from_json(folder / "config.json")
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return cfg, hf.get("tie_word_embeddings", True)


# ---- systems ----------------------------------------------------------------------------------
def controls(cfg, new_tokens: int, num_beams: int = 1) -> dict:
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    how = SAMPLING if num_beams == 1 else dict(do_sample=False, num_beams=num_beams, bad_words_ids=SAMPLING["bad_words_ids"])
    return dict(how, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=cfg.eos_token_id,
                pad_token_id=pad, bos_token_id=cfg.bos_token_id)


class Gpt2mh:
    def __init__(self, model, compile: bool):
        self.model, self.compile = model, compile

    @staticmethod
    def load(folder, n, device, dtype, quantize=None):
        from gpt2mh import MultiHeadGPT2

        return MultiHeadGPT2.from_pretrained(folder, heads=[f"head{i}" for i in range(n)], device=device, dtype=dtype,
                                             quantize=quantize)

    def __call__(self, ids, mask, kw, seed) -> list[torch.Tensor]:
        out = self.model.generate(ids, mask, compile=self.compile, seed=seed, **kw)
        return list(out.values())  # N x (B, new)


class HFSeparate:
    def __init__(self, models):
        self.models = models

    @staticmethod
    def load(folder, device, dtype):
        import transformers

        transformers.logging.set_verbosity_error()
        return transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(device).eval()

    def __call__(self, ids, mask, kw, seed) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [m.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.size(1):] for m in self.models]


class HFReturnSequences:
    def __init__(self, model, n):
        self.model, self.n = model, n

    def __call__(self, ids, mask, kw, seed) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        out = self.model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=self.n, **kw)
        return [out[:, ids.size(1):]]  # (B * N, new): prompt-major, N rows per prompt


class CT2:
    """CTranslate2 Generator(s) on the same checkpoint, run in a child process (`ct2_server`).

    Its own process: after one CTranslate2 generate call in the same process, torch's eager decode
    ran ~1.5x slower (the second OpenMP thread got ~40% less CPU: process CPU share 1.97 -> 1.23 of
    2 cores, gpt2mh int8 3 heads 19.5 -> 31.5 ms/round), so sharing a process would time the other
    systems unfairly. Token strings are "t<id>" (a random folder has no tokenizer; CT2 only needs
    one distinct string per id). A call's pipe round trip (a few KB of ids) is inside its timing."""

    def __init__(self, conn, quant: str, models: int, hypotheses: int = 1):
        self.conn, self.quant, self.models, self.hyp = conn, quant, models, hypotheses
        self.child_cpu_s = 0.0  # the worker's CPU time in the last call (for the CPU-share column)

    @staticmethod
    def convert(folder, quantization: str, out: Path, vocab: int, cfg) -> Path:
        import ctranslate2

        class Tokens:
            bos_token, eos_token, unk_token = f"t{cfg.bos_token_id}", f"t{cfg.eos_token_id}", "t0"

            def get_vocab(self):
                return {f"t{i}": i for i in range(vocab)}

        conv = ctranslate2.converters.TransformersConverter(str(folder))
        conv.load_tokenizer = lambda *a, **k: Tokens()
        return Path(conv.convert(str(out), quantization=quantization, force=True))

    def __call__(self, ids, mask, kw, seed) -> list[torch.Tensor]:
        start = [[f"t{i}" for i, m in zip(row, mrow) if m] for row, mrow in zip(ids.tolist(), mask.tolist())]
        search = dict(beam_size=kw["num_beams"]) if kw.get("num_beams", 1) > 1 else dict(
            sampling_topk=kw["top_k"], sampling_topp=kw["top_p"], sampling_temperature=kw["temperature"])
        opts = dict(search, max_length=kw["max_new_tokens"], min_length=kw["min_new_tokens"],
                    suppress_sequences=[[f"t{i}" for i in w] for w in kw["bad_words_ids"]],
                    include_prompt_in_result=False, num_hypotheses=self.hyp)
        self.conn.send((self.quant, self.models, start, opts, seed))
        out = self.conn.recv()
        if isinstance(out, str):
            raise RuntimeError(f"CTranslate2 worker: {out}")
        out, self.child_cpu_s = out
        return [torch.tensor(o) for o in out]  # per model (B * hyp, new)


def ct2_server(conn, paths: dict, copies: int, threads: int) -> None:
    """The CTranslate2 child process: `copies` Generators per quantization; answers CT2 calls."""
    import ctranslate2

    gens = {q: [ctranslate2.Generator(p, device="cpu", inter_threads=1, intra_threads=threads)
                for _ in range(copies)] for q, p in paths.items()}
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        quant, models, start, opts, seed = msg
        try:
            cpu = time.process_time()
            ctranslate2.set_random_seed(seed)
            out = [[seq for r in g.generate_batch(start, **opts) for seq in r.sequences_ids] for g in gens[quant][:models]]
            conn.send((out, time.process_time() - cpu))
        except Exception as e:  # noqa: BLE001  (reported in the parent)
            conn.send(f"{type(e).__name__}: {e}")


def load_ct2(folder, args, tmp: Path) -> dict[tuple[str, int], object]:
    want = [s for s in CT2_SYSTEMS if s in args.systems]
    if not want:
        return {}
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        common.log(f"ctranslate2 is not installed: skipping {want} (pip install -e '.[bench]')")
        args.systems = [s for s in args.systems if s not in CT2_SYSTEMS]
        return {}
    import multiprocessing

    cfg, _ = checkpoint_config(folder)
    quants = [q for q in ("float32", "int8") if any(("int8" in s) == (q == "int8") for s in want)]
    paths = {q: str(CT2.convert(folder, q, tmp / f"ct2-{q}", cfg.vocab_size, cfg)) for q in quants}
    copies = max(args.heads) if any(s.endswith("separate") for s in want) else 1
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch threads, no inherited state
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=ct2_server, args=(child_conn, paths, copies, torch.get_num_threads()), daemon=True)
    proc.start()
    if conn.recv() != "ready":
        raise RuntimeError("CTranslate2 worker did not start")
    args.ct2_worker = (proc, conn)
    out = {}
    for n in args.heads:
        for s in want:
            q = "int8" if "int8" in s else "float32"
            out[s, n] = CT2(conn, q, n) if s.endswith("separate") else CT2(conn, q, 1, hypotheses=n)
    return out


def stop_ct2(args) -> None:
    proc, conn = getattr(args, "ct2_worker", (None, None))
    if proc is not None:
        conn.send(None)
        proc.join(30)


def load_systems(folder, args) -> dict[tuple[str, int], object]:
    """(system, N) -> a callable. gpt2mh: one model per N shared by compiled and eager (each holds
    exactly N heads); transformers: max(N) full copies, scenario N uses the first N."""
    out, dev, dt = {}, args.device, args.dtype
    for n in args.heads:
        if {"gpt2mh-compiled", "gpt2mh-eager"} & set(args.systems):
            model = Gpt2mh.load(folder, n, dev, dt)
            out["gpt2mh-compiled", n], out["gpt2mh-eager", n] = Gpt2mh(model, True), Gpt2mh(model, False)
        if {"gpt2mh-int8", "gpt2mh-int8-compiled"} & set(args.systems):
            model = Gpt2mh.load(folder, n, dev, dt, quantize="int8")
            out["gpt2mh-int8", n], out["gpt2mh-int8-compiled", n] = Gpt2mh(model, False), Gpt2mh(model, True)
    if {"hf-separate", "hf-nrs"} & set(args.systems):
        copies = max(args.heads) if "hf-separate" in args.systems else 1
        hf = [HFSeparate.load(folder, dev, dt) for _ in range(copies)]
        for n in args.heads:
            out["hf-separate", n], out["hf-nrs", n] = HFSeparate(hf[:n]), HFReturnSequences(hf[0], n)
    out.update(load_ct2(folder, args, Path(tempfile.mkdtemp(prefix="bench-ct2-"))))
    return {k: v for k, v in out.items() if k[0] in args.systems}


def make_prompt(batch: int, length: int, cfg, seed: int, device):
    g = torch.Generator().manual_seed(seed + batch)
    ids = torch.randint(4, cfg.vocab_size, (batch, length), generator=g)  # no special ids
    return ids.to(device), torch.ones_like(ids).to(device)


def check_output(outs: list[torch.Tensor], rows: int, new: int, cfg, what: str) -> None:
    """Equal lengths, as the comparison needs: every stream has `new` tokens, none banned or EOS."""
    total = sum(o.size(0) for o in outs)
    banned = torch.tensor([0, 1, 2, cfg.eos_token_id], device=outs[0].device)
    for o in outs:
        if o.size(1) != new or torch.isin(o, banned).any():
            raise AssertionError(f"{what}: got {tuple(o.shape)} with banned ids present="
                                 f"{bool(torch.isin(o, banned).any())}; expected (rows, {new}) and none")
    if total != rows:
        raise AssertionError(f"{what}: {total} output rows, expected {rows}")


# ---- timing -----------------------------------------------------------------------------------
@dataclass
class Record:
    system: str
    heads: int
    batch: int
    first_call_s: float | None = None
    warm_call_s: float | None = None
    walls: list = field(default_factory=list)
    prefills: list = field(default_factory=list)
    cpu_share: list = field(default_factory=list)  # process CPU time / (wall x threads), per full call
    gpu_peak_bytes: int | None = None
    rss: dict | None = None


def run_once(fn, ids, mask, kw, seed, device):
    common.gpu_peak_reset(device)
    dt, out = common.timed(lambda: fn(ids, mask, kw, seed), device)
    return dt, out, common.gpu_peak_bytes(device)


def warm_up(systems, scenarios, prompts, cfg, args, records):
    """First call of each scenario, outputs checked. gpt2mh-compiled compiles its decode step there
    and makes one more (warm) call: compile time = first call - warm call."""
    kw = controls(cfg, args.new_tokens, args.num_beams)
    for n, b in scenarios:
        for name in args.systems:
            ids, mask, fn, rec = *prompts[b], systems[name, n], records[name, n, b]
            dt, out, rec.gpu_peak_bytes = run_once(fn, ids, mask, kw, args.seed, args.device)
            check_output(out, n * b, args.new_tokens, cfg, f"{name} N={n} B={b}")
            rec.first_call_s = dt
            if name.endswith("-compiled"):
                rec.warm_call_s, _ = common.timed(lambda: fn(ids, mask, kw, args.seed), args.device)
            common.timed(lambda: fn(ids, mask, controls(cfg, 1, args.num_beams), args.seed), args.device)
            common.log(f"warm-up {name:16s} N={n} B={b}: first call {dt:7.2f} s"
                       + (f", warm call {rec.warm_call_s:.2f} s" if rec.warm_call_s else ""))


def timed_round(r, systems, scenarios, prompts, cfg, args, records):
    full, pre = controls(cfg, args.new_tokens, args.num_beams), controls(cfg, 1, args.num_beams)
    order = args.systems[r % len(args.systems):] + args.systems[: r % len(args.systems)]
    for n, b in scenarios:
        for name in order:
            ids, mask = prompts[b]
            fn, rec = systems[name, n], records[name, n, b]
            cpu = time.process_time()
            wall, _ = common.timed(lambda: fn(ids, mask, full, args.seed + r), args.device)
            cpu = time.process_time() - cpu + getattr(fn, "child_cpu_s", 0.0)  # CTranslate2: its worker's
            rec.cpu_share.append(cpu / wall / torch.get_num_threads())
            prefill, _ = common.timed(lambda: fn(ids, mask, pre, args.seed + r), args.device)
            rec.walls.append(wall)
            rec.prefills.append(prefill)
            common.log(f"round {r + 1}/{args.rounds} {name:16s} N={n} B={b}: {wall:7.3f} s (prefill "
                       f"{prefill * 1e3:.0f} ms, CPU share {rec.cpu_share[-1]:.0%})")


def summarize(rec: Record, shape: Shape, bandwidth: float, args) -> dict:
    """One scenario's figures from its rounds (medians) and the bandwidth bound."""
    wall, prefill = common.median(rec.walls), common.median(rec.prefills)
    new, n, b, T = args.new_tokens, rec.heads, rec.batch, args.prompt_len
    # Each round's prefill call runs right after its full call: pair them, then take the median.
    rnd = common.median([(w - p) / (new - 1) for w, p in zip(rec.walls, rec.prefills)])
    rnd = rnd if rnd and rnd > 0 else None  # <= 0 only when noise swamped a very short run
    read = shape.read_per_round(rec.system, n)
    kv = n * b * shape.kv_token * (T + new / 2)  # mean cache length over the decode
    bound = read / bandwidth
    return {
        "system": rec.system, "heads": n, "batch": b,
        "wall_s": wall, "walls_s": rec.walls,
        "new_tokens_per_s": n * b * new / wall if wall else None,
        "prefill_ms": prefill * 1e3 if prefill is not None else None, "prefills_ms": [x * 1e3 for x in rec.prefills],
        "decode_round_ms": rnd * 1e3 if rnd is not None else None,
        "first_call_s": rec.first_call_s, "warm_call_s": rec.warm_call_s, "cpu_share": rec.cpu_share,
        "compile_s": rec.first_call_s - rec.warm_call_s if rec.warm_call_s else None,
        "weights_bytes": shape.held(rec.system, n),
        "read_bytes_per_round": read, "kv_bytes_per_round": int(kv),
        "bound_ms": bound * 1e3, "bound_with_kv_ms": (read + kv) / bandwidth * 1e3,
        "x_bound": rnd / bound if rnd is not None else None,
        "achieved_gbs": read / rnd / 1e9 if rnd else None,
        "gpu_peak_bytes": rec.gpu_peak_bytes,
        "rss": rec.rss,
    }


# ---- peak RSS in a child process ---------------------------------------------------------------
def child(args) -> None:
    """One system, one scenario, in this fresh process: RSS after import, load, first and warm call."""
    what = args.isolate
    if what in ("baseline-hf", "hf-separate", "hf-nrs"):
        import transformers  # noqa: F401
        from transformers import GPT2LMHeadModel  # noqa: F401  (the lazy module: import the model code)
    import gpt2mh  # noqa: F401

    fig = {"system": what, "rss_after_import": common.rss_bytes()}
    if what not in BASELINES:
        n, b, folder = args.heads[0], args.batch[0], Path(args.weights)
        cfg, _ = checkpoint_config(folder)
        if what.startswith("gpt2mh"):
            q = "int8" if what.startswith("gpt2mh-int8") else None
            fn = Gpt2mh(Gpt2mh.load(folder, n, args.device, args.dtype, quantize=q), what.endswith("-compiled"))
        else:
            hf = [HFSeparate.load(folder, args.device, args.dtype) for _ in range(n if what == "hf-separate" else 1)]
            fn = HFSeparate(hf) if what == "hf-separate" else HFReturnSequences(hf[0], n)
        fig["rss_after_load"] = common.rss_bytes()
        ids, mask = make_prompt(b, args.prompt_len, cfg, args.seed, args.device)
        kw = controls(cfg, args.new_tokens, args.num_beams)
        fn(ids, mask, kw, args.seed)
        fig["peak_rss_first_call"] = common.peak_rss_bytes()  # load + first call (+ compile)
        fig["peak_reset"] = common.reset_peak_rss()
        common.gpu_peak_reset(args.device)
        fn(ids, mask, kw, args.seed + 1)
        fig["peak_rss_warm_call"] = common.peak_rss_bytes() if fig["peak_reset"] else None
        fig["gpu_peak_bytes_warm_call"] = common.gpu_peak_bytes(args.device)
        fig["rss_end"] = common.rss_bytes()
    fig["peak_rss"] = max(v for k, v in fig.items() if k.startswith(("peak_rss", "rss_")) and v)
    fig["children_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    common.write_json(args.child_out, fig)


def child_args(args, what: str, n: int, b: int, folder: Path) -> list[str]:
    return ["--isolate", what, "--heads", str(n), "--batch", str(b), "--weights", str(folder),
            "--device", str(args.device), "--dtype", str(args.dtype).removeprefix("torch."),
            "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--seed", str(args.seed),
            "--num-beams", str(args.num_beams),
            *(["--threads", str(args.threads)] if args.threads else [])]


def rss_wanted(args, n: int, b: int) -> bool:
    if args.rss == "target":
        return (n, b) == (3, 1)
    return args.rss == "all" or b == min(args.batch)


def measure_rss(args, folder, records) -> dict:
    script = Path(__file__).resolve()
    base = {w: common.run_child(script, child_args(args, w, 1, 1, folder))["peak_rss"] for w in BASELINES}
    common.log(f"RSS baselines: {', '.join(f'{k} {v / 2**20:.0f} MiB' for k, v in base.items())}")
    for (name, n, b), rec in records.items():
        if rss_wanted(args, n, b) and name not in CT2_SYSTEMS:  # CTranslate2: no child-process RSS (not wired)
            rec.rss = common.run_child(script, child_args(args, name, n, b, folder))
            common.log(f"RSS {name:16s} N={n} B={b}: peak {rec.rss['peak_rss'] / 2**20:.0f} MiB")
    return base


# ---- main -------------------------------------------------------------------------------------
def payload(args, records, shape, bandwidths, baselines, started, complete) -> dict:
    bw = max(bandwidths)
    return {
        "benchmark": "generate", "complete": complete,
        "machine": common.machine_info(args.device),
        "settings": {"heads": args.heads, "batch": args.batch, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "rounds": args.rounds, "device": str(args.device),
                     "dtype": str(args.dtype).removeprefix("torch."), "weights": args.weights,
                     "systems": args.systems, "sampling": SAMPLING if args.num_beams == 1 else None,
                     "num_beams": args.num_beams, "seed": args.seed, "quick": args.quick,
                     "threads": torch.get_num_threads(), "rss_scenarios": args.rss},
        "model": {"trunk_bytes": shape.trunk, "embedding_bytes": shape.embed, "head_bytes": shape.head,
                  "kv_bytes_per_token_per_stream": shape.kv_token, "hf_lm_head_tied": shape.tied},
        "bandwidth": {"read_gbs": bw / 1e9, "samples_gbs": [x / 1e9 for x in bandwidths],
                      "method": "best torch.sum over a 1 GiB float32 tensor"},
        "rss_baseline_bytes": baselines,
        "results": [summarize(r, shape, bw, args) for r in records.values()],
        "elapsed_s": time.time() - started,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.isolate:
        return child(args)
    started = time.time()
    with checkpoint_folder(args.weights, args.seed) as folder:
        cfg, tied = checkpoint_config(folder)
        shape = Shape.of(cfg, args.dtype, tied)
        bandwidths = [common.read_bandwidth(args.device)]
        common.log(f"read bandwidth {bandwidths[0] / 1e9:.1f} GB/s; loading {args.systems}")
        systems = load_systems(folder, args)
        scenarios = [(n, b) for b in args.batch for n in args.heads]
        prompts = {b: make_prompt(b, args.prompt_len, cfg, args.seed, args.device) for b in args.batch}
        records = {(s, n, b): Record(s, n, b) for n, b in scenarios for s in args.systems}
        write = lambda done, base=None: common.write_json(  # noqa: E731
            args.out, payload(args, records, shape, bandwidths, base, started, done))
        warm_up(systems, scenarios, prompts, cfg, args, records)
        for r in range(args.rounds):
            timed_round(r, systems, scenarios, prompts, cfg, args, records)
            bandwidths.append(common.read_bandwidth(args.device))
            write(False)
        del systems  # free the parent's models before the children load theirs
        stop_ct2(args)
        baselines = measure_rss(args, folder, records) if args.rss != "none" else None
        write(True, baselines)
    common.log(f"wrote {args.out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
