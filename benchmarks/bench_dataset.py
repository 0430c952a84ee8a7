"""The data-set job: K real sentences through 3 heads, every system in its own process.

Heads "label", "span", "tags" with token budgets 4 / 16 / 48 (min_new_tokens = max_new_tokens, so EOS
never ends a stream early: every system makes exactly K x 68 tokens), greedy, on a rinna-small-shape
model (random weights: speed does not depend on them). Prompts: hironsancorpus sentences encoded with
rinna's tokenizer (cycled past its 500 for K > 500). Systems:

  engine-fp32, engine-int8   gpt2mh's data-set engine (`generate_rows`' engine), --slots stream slots
                             split between the heads by budget; one prefill per input for all heads
  engine-int8-compiled       the same with the decode step compiled (its compile time is in wall_s,
                             not in generate_s: a warm-up run of 16 inputs goes first)
  static-all                 one `generate` call over all K inputs: every stream in one static batch
                             (what one call did before the engine: memory grows with K)
  static-16                  `generate` on 16 inputs at a time (bounded memory, streams wait for the longest)
  ct2-int8, ct2-fp32         CTranslate2 as 3 models (one per head), `generate_batch` over all K with
                             max_batch_size=16, min_length = max_length = the head's budget
  hf                         transformers as 3 GPT2LMHeadModel, `generate` on batches of 16 (left padded)

With `--model DIR` (a trained gpt2mh checkpoint or run folder, e.g. the quickstart's): natural lengths —
its own heads and generation budgets (the run's eval_max_new_tokens), EOS ends a stream, greedy; the
CTranslate2 and transformers systems load each head exported with `export_hf`. Systems then make
slightly different token counts (int8), so the JSON has each one's count.

Each system runs in a fresh child process (its peak RSS is its own) and reports the seconds spent
generating (model loading, CTranslate2's conversion and compiling excluded; `wall_s` has the whole
process), output tokens/s over those seconds, and peak RSS. Writes JSON (benchmarks/results/dataset-cpu.json) and a plot.

    python benchmarks/bench_dataset.py --quick                   # K=24, small model: a smoke test
    python benchmarks/bench_dataset.py --k 240                   # the comparison (~15 min on 2 cores)
    python benchmarks/bench_dataset.py --k 2400 --systems engine-int8,engine-int8-compiled --add
    python benchmarks/bench_dataset.py --k 500 --model runs/quickstart      # natural lengths
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the harness beside this script)

SYSTEMS = ("engine-fp32", "engine-int8", "engine-int8-compiled", "static-all", "static-16", "ct2-int8", "ct2-fp32", "hf")
HEADS = {"label": 4, "span": 16, "tags": 48}
RINNA_SMALL = dict(vocab_size=32000, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
TINY = dict(RINNA_SMALL, n_embd=128, n_layer=2, n_head=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=240, help="sentences")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--slots", type=int, default=48, help="the engine's stream slots (all heads)")
    p.add_argument("--batch", type=int, default=16, help="inputs per call for static-16, ct2 and hf")
    p.add_argument("--quick", action="store_true", help="K=24 on a 2-layer model: a smoke test")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/dataset-cpu.json)")
    p.add_argument("--add", action="store_true", help="add these rows to the JSON instead of replacing it")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default=None, help="a trained gpt2mh checkpoint: natural lengths (see above)")
    p.add_argument("--heads-json", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.k = min(a.k, 24)
    a.systems = a.systems.split(",")
    bad = [s for s in a.systems if s not in SYSTEMS]
    if bad:
        p.error(f"unknown system(s) {bad}; choose from {list(SYSTEMS)}")
    name = "dataset-cpu-quick.json" if a.quick else "dataset-natural-cpu.json" if a.model else "dataset-cpu.json"
    a.out = Path(a.out or common.RESULTS / name)
    if a.heads_json:  # the child: the heads and budgets the parent chose
        HEADS.clear()
        HEADS.update(json.loads(a.heads_json))
    return a


def prompts(k: int) -> list[list[int]]:
    from gpt2mh import Tokenizer
    from gpt2mh.demo.corpus import build_examples

    tok = Tokenizer.from_pretrained()
    sentences = [ex.input for split in ("train", "test") for ex in build_examples(split)]
    return [tok.encode(sentences[i % len(sentences)], add_eos=True) for i in range(k)]


NATURAL = False  # set in the child of a --model run: EOS ends a stream
EOS = 2


def counted(rows) -> int:
    """Output tokens of generated id rows: up to an EOS (not counted: CTranslate2 leaves it out too)."""
    return sum(row.index(EOS) if EOS in row else len(row) for row in rows)


def controls(budget: int) -> dict:
    return dict(max_new_tokens=budget) if NATURAL else dict(max_new_tokens=budget, min_new_tokens=budget)


def model_folder(folder: Path, head: str | None = None) -> Path:
    """The gpt2mh checkpoint, or (head given) that head exported as a transformers folder beside it."""
    return folder if head is None else folder / "export" / head


# ---- the systems (each in its own process) -----------------------------------------------------
def run_engine(folder: Path, ps, args, quant: bool, compile: bool = False) -> int:
    from gpt2mh import MultiHeadGPT2
    from gpt2mh.inference.controls import SamplingConfig
    from gpt2mh.inference.engine import Engine, Request

    model = MultiHeadGPT2.from_pretrained(folder / "gpt2mh", heads=list(HEADS), quantize="int8" if quant else None).eval()
    cfg = {h: SamplingConfig(**controls(b), eos_token_id=(2,), pad_token_id=3) for h, b in HEADS.items()}
    longest = -(-max(map(len, ps)) // 64) * 64  # the prompt cache sized for the file (a growing one recompiles)
    engine = Engine(model, list(HEADS), slots=args.slots, budgets=HEADS, prompt_len=longest,
                    gen_len=max(HEADS.values()), compile=compile)
    if compile:  # compile outside the timed run
        list(engine.run(Request(i, p, cfg, 0, i) for i, p in enumerate(ps[:16])))
    made = 0
    t0 = time.perf_counter()
    for r in engine.run(Request(i, p, cfg, 0, i) for i, p in enumerate(ps)):
        made += counted([t for rows in r.tokens.values() for t in rows])
    args.timed_s = time.perf_counter() - t0
    return made


def run_static(folder: Path, ps, args, batch: int | None) -> int:
    from gpt2mh import MultiHeadGPT2

    model = MultiHeadGPT2.from_pretrained(folder / "gpt2mh", heads=list(HEADS)).eval()
    per_head = {h: controls(b) for h, b in HEADS.items()}
    made = 0
    step = batch or len(ps)
    t0 = time.perf_counter()
    for i in range(0, len(ps), step):
        chunk = ps[i:i + step]
        T = max(map(len, chunk))
        ids = torch.tensor([[3] * (T - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(ids, mask, per_head=per_head, compile=False, slots=10**9,
                             max_new_tokens=max(HEADS.values()))
        made += counted([row for t in out.values() for row in t.tolist()])
    args.timed_s = time.perf_counter() - t0
    return made


def run_ct2(folder: Path, ps, args, quant: str) -> int:
    import ctranslate2

    from bench_generate import CT2  # the converter with a stand-in tokenizer ("t<id>" tokens)
    from gpt2mh.config import GPT2Config

    cfg = GPT2Config.from_json(folder / "hf" / HEADS_FIRST() / "config.json")
    with tempfile.TemporaryDirectory() as d:
        paths = {h: CT2.convert(folder / "hf" / h, quant, Path(d) / f"ct2-{h}", cfg.vocab_size, cfg) for h in HEADS}
        gens = {h: ctranslate2.Generator(str(paths[h]), device="cpu", inter_threads=1,
                                         intra_threads=torch.get_num_threads()) for h in HEADS}
        start = [[f"t{i}" for i in p] for p in ps]
        made = 0
        t0 = time.perf_counter()
        for h, budget in HEADS.items():  # three fine-tuned models would be three Generators
            out = gens[h].generate_batch(start, max_batch_size=args.batch, beam_size=1, sampling_topk=1,
                                         min_length=0 if NATURAL else budget, max_length=budget,
                                         include_prompt_in_result=False, end_token="t2")
            made += sum(len(r.sequences_ids[0]) for r in out)
        args.timed_s = time.perf_counter() - t0
    return made


def run_hf(folder: Path, ps, args) -> int:
    from transformers import GPT2LMHeadModel

    models = {h: GPT2LMHeadModel.from_pretrained(folder / "hf" / h).eval() for h in HEADS}
    made = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for h, budget in HEADS.items():
            for i in range(0, len(ps), args.batch):
                chunk = ps[i:i + args.batch]
                T = max(map(len, chunk))
                ids = torch.tensor([[3] * (T - len(p)) + p for p in chunk])
                mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in chunk])
                out = models[h].generate(ids, attention_mask=mask, do_sample=False, pad_token_id=3, eos_token_id=2,
                                         **controls(budget))
                made += counted(out[:, T:].tolist())
    args.timed_s = time.perf_counter() - t0
    return made


def HEADS_FIRST() -> str:
    return next(iter(HEADS))


def child(args) -> None:
    global NATURAL
    NATURAL = args.model is not None
    folder = Path(args.folder)
    ps = prompts(args.k)
    sysname = args.child
    common.reset_peak_rss()
    t0 = time.perf_counter()
    args.timed_s = None
    if sysname.startswith("engine"):
        made = run_engine(folder, ps, args, quant="int8" in sysname, compile=sysname.endswith("compiled"))
    elif sysname.startswith("static"):
        made = run_static(folder, ps, args, None if sysname == "static-all" else args.batch)
    elif sysname.startswith("ct2"):
        made = run_ct2(folder, ps, args, "int8" if sysname.endswith("int8") else "float32")
    else:
        made = run_hf(folder, ps, args)
    wall = time.perf_counter() - t0
    want = args.k * sum(HEADS.values())
    if made != want and not NATURAL:
        raise SystemExit(f"{sysname} made {made} tokens, expected {want}")
    common.write_json(args.child_out, {"system": sysname, "k": args.k, "tokens": made, "wall_s": wall,
                                       "generate_s": args.timed_s, "tokens_per_s": made / args.timed_s,
                                       "peak_rss_bytes": common.peak_rss_bytes(),
                                       "threads": torch.get_num_threads()})


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    import transformers

    shape = TINY if args.quick else RINNA_SMALL
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as d:
        if args.model:
            shape = natural_setup(args.model, Path(d))
        else:
            torch.manual_seed(0)
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape))
            hf.save_pretrained(Path(d) / "gpt2mh")
            for h in HEADS:  # three fine-tuned models would be three folders: the same weights here
                hf.save_pretrained(Path(d) / "hf" / h)
        for s in args.systems:
            common.log(f"{s}: K={args.k} ...")
            extra = ["--threads", str(args.threads)] if args.threads else []
            if args.model:
                extra += ["--model", args.model, "--heads-json", json.dumps(HEADS)]
            try:
                r = common.run_child(__file__, ["--child", s, "--folder", d, "--k", str(args.k), "--slots",
                                                str(args.slots), "--batch", str(args.batch), *extra], timeout=7200)
            except RuntimeError as e:
                common.log(f"{s} failed: {e}")
                continue
            common.log(f"{s}: {r['generate_s']:.1f} s generating ({r['wall_s']:.1f} s in all), {r['tokens_per_s']:.0f} tok/s, "
                       f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
            rows.append(r)
    old = json.loads(args.out.read_text())["results"] if args.add and args.out.exists() else []
    keep = [r for r in old if (r["system"], r["k"]) not in {(x["system"], x["k"]) for x in rows}]
    out = {"machine": common.machine_info(torch.device("cpu")), "shape": shape, "heads": HEADS,
           "settings": {"slots": args.slots, "batch": args.batch, "greedy": True,
                        "eos": "ends a stream (natural lengths)" if args.model else "banned (min = max)",
                        "model": args.model},
           "command": "python benchmarks/bench_dataset.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "results": keep + rows}
    common.write_json(args.out, out)
    common.log(f"wrote {args.out}")
    print(table(out["results"]))


def natural_setup(model: str, d: Path) -> dict:
    """A trained checkpoint: its heads and budgets into HEADS, itself in d/gpt2mh, each head exported."""
    from gpt2mh import MultiHeadGPT2
    from gpt2mh.train.evaluate import head_limits, run_settings
    from gpt2mh.weights.export import export_hf
    from gpt2mh.weights.hub import resolve_model

    folder = resolve_model(model)
    m = MultiHeadGPT2.from_pretrained(folder)
    HEADS.clear()
    HEADS.update(head_limits(run_settings(folder)["eval_max_new_tokens"], list(m.head_names)))
    m.save_pretrained(d / "gpt2mh")
    for h in HEADS:
        export_hf(m, h, d / "hf" / h)
    return m.config.to_hf_dict()


def table(results: list[dict]) -> str:
    lines = ["| K | system | generating s | output tok/s | process s (load, convert) | peak RSS GiB |",
             "|--:|---|--:|--:|--:|--:|"]
    for r in sorted(results, key=lambda r: (r["k"], -r["tokens_per_s"])):
        lines.append(f"| {r['k']} | {r['system']} | {r['generate_s']:.1f} | {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
