"""Fine-tuning benchmark: gpt2mh multi-head training against N separate transformers fine-tunes.

Systems, on the same data (hironsancorpus' multi-task training set, rinna's tokenizer), the same
steps, batch size, optimizer settings and initial weights:
  gpt2mh  one trunk + N heads: the library's own training step, `gpt2mh.train.train_step`
          (the object `train(TrainConfig)` drives: shared-prefix packing, `packed_loss`, clipping,
          fused AdamW, scheduler), each example's input once followed by all N targets
  hf      N `transformers.GPT2LMHeadModel`s, one per head, each trained on `input + target_k`
          (labels -100 on the input), one after another: the seed's alternative

Rounds interleave the systems (the order alternates), so a slow moment of a shared machine hits
both alike. Peak RSS comes from a fresh child process per system (`--isolate`). Writes JSON;
`report_finetune.py` makes the table.

    python benchmarks/bench_finetune.py --quick                # smoke test, small model, ~3 min on 2 CPU cores
    python benchmarks/bench_finetune.py                        # rinna-small shape, N=3
    python benchmarks/bench_finetune.py --device cuda          # bf16 autocast for both
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the harness beside this script)

SYSTEMS = ("gpt2mh", "hf")
CHILDREN = SYSTEMS + ("baseline",)
# rinna/japanese-gpt2-small's shape and special ids (its config.json); random weights, no download.
RINNA_SMALL = dict(vocab_size=32000, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
SMALL = dict(n_layer=4, n_embd=256, n_head=4)  # --small: same vocab (the tokenizer's), thinner trunk
QUICK = dict(small=True, steps=1, rounds=3, batch=8)
TARGET_RATIO = 2.0  # issue 4 / issue 6: >= 2x the target tokens/s of N separate fine-tunes at N=3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=3, help="N: heads of gpt2mh, separate models of transformers")
    p.add_argument("--batch", type=int, default=8, help="examples per optimizer step, both systems")
    p.add_argument("--steps", type=int, default=2, help="timed steps per system (per model for hf) per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, after the warm-up steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per system (per model) before the rounds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weights", default="random",
                   help="'random' (rinna-small shape, or --small) or a HF GPT-2 checkpoint folder / hub repo id")
    p.add_argument("--small", action="store_true", help=f"random weights of a small model: {SMALL}")
    p.add_argument("--no-rss", dest="rss", action="store_false", help="skip the peak-RSS child processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/finetune-<device>.json)")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK}")
    # Internal: train one system in this (child) process and write its memory figures.
    p.add_argument("--isolate", choices=CHILDREN, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    if a.heads < 1 or a.batch < 1 or a.steps < 1 or a.rounds < 1 or a.warmup < 0:
        p.error("--heads, --batch, --steps and --rounds must be >= 1, --warmup >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    a.device = torch.device(a.device)
    a.out = Path(a.out or common.RESULTS / f"finetune-{a.device.type}.json")
    return a


def head_columns(n: int) -> dict[str, str]:
    """N head names -> the corpus column each one learns; past 3 heads the columns repeat."""
    from gpt2mh.demo.corpus import HEADS

    return {(c if k < len(HEADS) else f"{c}{k // len(HEADS) + 1}"): c
            for k, c in ((k, HEADS[k % len(HEADS)]) for k in range(n))}


# ---- weights and data -------------------------------------------------------------------------
@contextlib.contextmanager
def checkpoint_folder(args):
    """A HF GPT-2 checkpoint folder both systems start from: random weights in a temp dir, or given."""
    if args.weights != "random":
        from gpt2mh.weights.hub import resolve_checkpoint

        yield resolve_checkpoint(args.weights)
        return
    import transformers

    torch.manual_seed(args.seed)
    shape = {**RINNA_SMALL, **(SMALL if args.small else {})}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape))
    with tempfile.TemporaryDirectory(prefix="bench-ft-gpt2-") as d:
        hf.save_pretrained(d)
        del hf
        yield Path(d)


def write_data(folder: Path) -> Path:
    from gpt2mh.demo.corpus import build_examples
    from gpt2mh.train.data import write_jsonl

    return write_jsonl(folder / "train.jsonl", build_examples("train"))


# ---- gpt2mh: the library's training step -------------------------------------------------------
def gpt2mh_run(folder: Path, data: Path, out_dir: Path, args):
    """`gpt2mh.train.setup`: the run `train(TrainConfig(...))` builds and steps, evaluation and saving off.
    The model comes from `load_model(folder, heads)`, the loader of `MultiHeadGPT2.from_pretrained`."""
    from gpt2mh.train.config import TrainConfig
    from gpt2mh.train.distributed import Dist
    from gpt2mh.train.setup import setup

    cols = head_columns(args.heads)
    cfg = TrainConfig(train_file=str(data), heads=list(cols), columns=cols, base=str(folder),
                      output_dir=str(out_dir), batch_size=args.batch, max_steps=total_steps(args),
                      eval_every=0, save_every=0, eval_samples=0, progress=False, seed=args.seed,
                      device=str(args.device))
    return setup(cfg, Dist(device=args.device))


def gpt2mh_step(run) -> tuple[int, list[float], dict]:
    """One optimizer step; returns (labelled target tokens, per-head mean loss, work done)."""
    from gpt2mh.train.loop import train_step

    r = train_step(run)
    tokens = int(r.labels.sum())
    # logits only at labelled positions, each through its own head
    return tokens, r.head_loss.tolist(), work(sum(r.lengths), len(r.lengths) * max(r.lengths), tokens)


def work(positions: int, padded: int, logit_rows: int) -> dict:
    """What a step feeds the trunk (real and padded positions) and how many rows of logits it makes."""
    return {"positions": positions, "padded_positions": padded, "logit_rows": logit_rows}


# ---- transformers: N separate fine-tunes --------------------------------------------------------
def hf_rows(run, examples) -> list[list[tuple[list[int], list[int]] | None]]:
    """Per example, per head: (input ids, target ids) in gpt2mh's prompt format, or None.

    Checked against the packed examples gpt2mh trains on: both systems learn the same tokens."""
    from gpt2mh.inputs import encode_input, encode_target

    cols = list(head_columns(len(run.heads.names)).values())
    if len(examples) != len(run.data.train):
        raise AssertionError(f"{len(examples)} corpus examples but gpt2mh packed {len(run.data.train)}")
    rows = []
    for ex, p in zip(examples, run.data.train):
        inp = encode_input(run.tokenizer, ex.input)
        row = [(inp, encode_target(run.tokenizer, ex.targets[c])) if c in ex.targets else None for c in cols]
        if p.input_ids[p.segments == 0].tolist() != inp:
            raise AssertionError(f"{ex.source}: input ids differ between the systems")
        for k, r in enumerate(row):
            if (r[1] if r else []) != p.label_ids[p.label_head == k].tolist():
                raise AssertionError(f"{ex.source}: head {k}'s target ids differ between the systems")
        rows.append(row)
    return rows


def hf_batch(pairs, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded `input + target` rows; labels -100 on the input and on pads (HF shifts them)."""
    T = max(len(i) + len(t) for i, t in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(pairs), T, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    for b, (i, t) in enumerate(pairs):
        ids[b, : len(i) + len(t)] = torch.tensor(i + t)
        mask[b, : len(i) + len(t)] = 1
        labels[b, len(i): len(i) + len(t)] = torch.tensor(t)
    return {k: v.to(device) for k, v in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


@dataclass
class HFFineTune:
    """One GPT2LMHeadModel fine-tuned on one head's target, with gpt2mh's optimizer settings
    (`make_optimizer`: fused AdamW, no decay on biases/LayerNorm; same scheduler, same clipping)."""
    model: object
    optimizer: object
    scheduler: object
    head: int
    step: int = 0

    @classmethod
    def load(cls, folder: Path, head: int, cfg, device, total: int) -> "HFFineTune":
        import transformers

        from gpt2mh.train.setup import make_optimizer, make_scheduler

        transformers.logging.set_verbosity_error()
        model = transformers.GPT2LMHeadModel.from_pretrained(folder).to(device).train()
        opt = make_optimizer(model, cfg, device)
        return cls(model, opt, make_scheduler(opt, cfg, total), head)

    def train_step(self, rows, cfg, pad_id: int, device) -> tuple[int, float, dict]:
        from gpt2mh.train.setup import step_indices

        idx = step_indices(self.step, len(rows), cfg.batch_size, cfg.seed)  # gpt2mh's data order
        pairs = [rows[i][self.head] for i in idx if rows[i][self.head] is not None]
        batch = hf_batch(pairs, pad_id, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = self.model(**batch).loss  # mean cross-entropy over the labelled tokens
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens, T = sum(len(t) for _, t in pairs), batch["input_ids"].size(1)
        # the LM head runs at every position, input and pads included
        return tokens, float(loss.detach()), work(sum(len(i) + len(t) for i, t in pairs), len(pairs) * T,
                                                 len(pairs) * T)


def total_steps(args) -> int:
    return args.warmup + args.rounds * args.steps


# ---- timing -----------------------------------------------------------------------------------
@dataclass
class Record:
    system: str
    warmup_s: list = field(default_factory=list)     # untimed steps (hf: every model's)
    step_s: list = field(default_factory=list)       # every timed step (hf: one model's step)
    round_s: list = field(default_factory=list)      # a round: `steps` steps (hf: of all N models)
    round_tokens: list = field(default_factory=list)
    cpu_share: list = field(default_factory=list)    # per round: process CPU time / (wall x threads)
    work: dict = field(default_factory=dict)         # summed over the timed steps, see `work`
    first_loss: list | None = None                   # per head, the first step's loss
    last_loss: list | None = None


def warm_up(run, hfs, rows, args, recs) -> None:
    pad = run.tokenizer.pad_id
    for _ in range(args.warmup):
        dt, (_, loss, _) = common.timed(lambda: gpt2mh_step(run), args.device)
        recs["gpt2mh"].warmup_s.append(dt)
        recs["gpt2mh"].first_loss = recs["gpt2mh"].first_loss or loss
        first = []
        for m in hfs:
            dt, (_, hf_loss, _) = common.timed(lambda: m.train_step(rows, run.cfg, pad, args.device), args.device)
            recs["hf"].warmup_s.append(dt)
            first.append(hf_loss)
        recs["hf"].first_loss = recs["hf"].first_loss or first
    common.log(f"warm-up ({args.warmup} step(s)): gpt2mh {sum(recs['gpt2mh'].warmup_s):.2f} s, "
               f"hf ({len(hfs)} models) {sum(recs['hf'].warmup_s):.2f} s")


def run_system(name, run, hfs, rows, args, rec) -> None:
    """`steps` steps of one system (hf: of each model, one model after another), timed per step."""
    pad, tokens, losses = run.tokenizer.pad_id, 0, []
    cpu, wall = time.process_time(), 0.0
    jobs = [lambda: gpt2mh_step(run)] if name == "gpt2mh" else \
        [lambda m=m: m.train_step(rows, run.cfg, pad, args.device) for m in hfs]
    for job in jobs:  # hf: model k runs all its steps before model k+1, as separate fine-tunes would
        for _ in range(args.steps):
            dt, (n, loss, w) = common.timed(job, args.device)
            rec.step_s.append(dt)
            rec.work = {k: rec.work.get(k, 0) + v for k, v in w.items()}
            wall, tokens = wall + dt, tokens + n
        losses.append(loss)
    rec.round_s.append(wall)
    rec.round_tokens.append(tokens)
    rec.cpu_share.append((time.process_time() - cpu) / wall / torch.get_num_threads())
    rec.last_loss = losses[0] if name == "gpt2mh" else losses


def timed_round(r, run, hfs, rows, args, recs) -> None:
    order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
    for name in order:
        run_system(name, run, hfs, rows, args, recs[name])
        rec = recs[name]
        common.log(f"round {r + 1}/{args.rounds} {name:6s}: {rec.round_s[-1]:7.2f} s, "
                   f"{rec.round_tokens[-1] / rec.round_s[-1]:8.1f} target tok/s (CPU share {rec.cpu_share[-1]:.0%})")


def summarize(rec: Record, n_models: int) -> dict:
    tokens, secs = sum(rec.round_tokens), sum(rec.round_s)
    step = common.median(rec.step_s)
    return {
        "system": rec.system,
        "target_tokens": tokens, "seconds": secs,
        "target_tokens_per_s": tokens / secs if secs else None,
        "round_target_tokens_per_s": [t / s for t, s in zip(rec.round_tokens, rec.round_s)],
        "round_s": rec.round_s, "round_target_tokens": rec.round_tokens,
        "ms_per_step": step * 1e3 if step else None,            # one model's optimizer step
        "ms_per_step_all_heads": step * n_models * 1e3 if step else None,  # B examples, all N targets
        "work": rec.work, "steps_s": rec.step_s, "warmup_steps_s": rec.warmup_s, "cpu_share": rec.cpu_share,
        "first_loss": rec.first_loss, "last_loss": rec.last_loss,
    }


# ---- size on disk -------------------------------------------------------------------------------
def dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def disk_sizes(run, hfs, tmp: Path) -> dict:
    """gpt2mh: one checkpoint (trunk + N heads); transformers: N `save_pretrained` folders."""
    from gpt2mh.weights.folder import save_model

    g = save_model(run.model, tmp / "gpt2mh")
    hf = [m.model.save_pretrained(tmp / f"hf-{m.head}") or tmp / f"hf-{m.head}" for m in hfs]
    out = {"gpt2mh_bytes": dir_bytes(g), "hf_bytes": sum(dir_bytes(p) for p in hf),
           "gpt2mh_files": sorted(f.name for f in g.iterdir()), "hf_files_each": sorted(f.name for f in hf[0].iterdir())}
    out["gpt2mh_over_hf"] = out["gpt2mh_bytes"] / out["hf_bytes"]
    return out


# ---- peak RSS in a child process ---------------------------------------------------------------
def child(args) -> None:
    """One system in this fresh process: load, warm-up + `steps` steps; hf: the N models one after
    another, each freed before the next (as N separate runs would)."""
    import transformers  # noqa: F401
    from transformers import GPT2LMHeadModel  # noqa: F401  (the lazy module: import the model code)

    import gpt2mh  # noqa: F401

    fig = {"system": args.isolate, "rss_after_import": common.rss_bytes()}
    common.gpu_peak_reset(args.device)
    if args.isolate != "baseline":
        folder, steps = Path(args.weights), args.warmup + args.steps
        with tempfile.TemporaryDirectory(prefix="bench-ft-child-") as d:
            run = gpt2mh_run(folder, Path(args.data), Path(d) / "run", args)
            fig["rss_after_load"] = common.rss_bytes()
            if args.isolate == "gpt2mh":
                for _ in range(steps):
                    gpt2mh_step(run)
            else:
                from gpt2mh.demo.corpus import build_examples

                rows, cfg, pad = hf_rows(run, build_examples("train")), run.cfg, run.tokenizer.pad_id
                del run
                gc.collect()
                for k in range(args.heads):
                    m = HFFineTune.load(folder, k, cfg, args.device, steps)
                    for _ in range(steps):
                        m.train_step(rows, cfg, pad, args.device)
                    del m
                    gc.collect()
    fig["rss_end"] = common.rss_bytes()
    # VmHWM, this process's own high-water mark. Linux's ru_maxrss is not: exec keeps the larger of
    # the old and new peaks, so a child forked from the big parent reports at least the parent's RSS.
    fig["peak_rss"] = common.peak_rss_bytes()
    fig["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    fig["gpu_peak_bytes"] = common.gpu_peak_bytes(args.device)
    common.write_json(args.child_out, fig)


def measure_rss(args, folder: Path, data: Path) -> dict:
    script, out = Path(__file__).resolve(), {}
    for what in CHILDREN:
        a = ["--isolate", what, "--weights", str(folder), "--data", str(data), "--heads", str(args.heads),
             "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--device", str(args.device), "--seed", str(args.seed),
             *(["--threads", str(args.threads)] if args.threads else [])]
        out[what] = common.run_child(script, a)
        common.log(f"peak RSS {what:8s}: {out[what]['peak_rss'] / 2**20:.0f} MiB")
    return out


# ---- main -------------------------------------------------------------------------------------
def settings(args, run, hfs) -> dict:
    """What was run, read from the live objects (the models are freed before the RSS children)."""
    return {"heads": args.heads, "head_names": list(run.heads.names), "batch": args.batch,
            "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "device": str(args.device),
            "autocast": "bf16" if args.device.type == "cuda" else None, "weights": args.weights,
            "small": args.small, "quick": args.quick, "seed": args.seed, "threads": torch.get_num_threads(),
            "model_config": run.model.config.to_hf_dict(), "examples": len(run.data.train),
            "params_gpt2mh": sum(p.numel() for p in run.model.parameters()),
            "params_hf_each": sum(p.numel() for p in hfs[0].model.parameters()),
            "learning_rate": run.cfg.learning_rate, "lr_schedule": run.cfg.lr_schedule,
            "max_grad_norm": run.cfg.max_grad_norm,
            "optimizer": "AdamW, fused on CPU/CUDA (gpt2mh.train.make_optimizer, both systems)",
            "gpt2mh_step": "gpt2mh.train.train_step(setup(TrainConfig(..., eval/save off)))",
            "hf_step": "GPT2LMHeadModel(input_ids, attention_mask, labels).loss.backward(), clip, step"}


def payload(args, info, recs, extra, started, complete) -> dict:
    g, h = summarize(recs["gpt2mh"], 1), summarize(recs["hf"], args.heads)
    ratio = g["target_tokens_per_s"] / h["target_tokens_per_s"] if g["seconds"] and h["seconds"] else None
    rounds = [a / b for a, b in zip(g["round_target_tokens_per_s"], h["round_target_tokens_per_s"])]
    rss, disk = extra.get("rss"), extra.get("disk")
    return {
        "benchmark": "finetune", "complete": complete,
        "machine": common.machine_info(args.device),
        "settings": info,
        "results": [g, h],
        "ratio": {"target_tokens_per_s": ratio, "per_round": rounds, "median_per_round": common.median(rounds),
                  "target": TARGET_RATIO,
                  "work_hf_over_gpt2mh": {k: h["work"][k] / v for k, v in g["work"].items() if v}},
        "peak_rss": rss and {k: v["peak_rss"] for k, v in rss.items()},
        "peak_rss_gpt2mh_over_hf": rss and rss["gpt2mh"]["peak_rss"] / rss["hf"]["peak_rss"],
        "rss_children": rss,
        "disk": disk,
        "elapsed_s": time.time() - started,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.isolate:
        return child(args)
    started = time.time()
    from gpt2mh.demo.corpus import build_examples

    with checkpoint_folder(args) as folder, tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp:
        tmp = Path(tmp)
        data = write_data(tmp)
        run = gpt2mh_run(folder, data, tmp / "run", args)
        rows = hf_rows(run, build_examples("train"))
        hfs = [HFFineTune.load(folder, k, run.cfg, args.device, total_steps(args)) for k in range(args.heads)]
        info = settings(args, run, hfs)
        common.log(f"loaded gpt2mh (heads {run.heads.names}) and {len(hfs)} transformers models; "
                   f"{len(rows)} examples, batch {args.batch}")
        recs, extra = {s: Record(s) for s in SYSTEMS}, {}

        def write(done: bool) -> dict:
            out = payload(args, info, recs, extra, started, done)
            common.write_json(args.out, out)
            return out

        warm_up(run, hfs, rows, args, recs)
        for r in range(args.rounds):
            timed_round(r, run, hfs, rows, args, recs)
            write(False)
        extra["disk"] = disk_sizes(run, hfs, tmp)
        common.log(f"on disk: gpt2mh {extra['disk']['gpt2mh_bytes'] / 2**20:.0f} MiB, "
                   f"hf {extra['disk']['hf_bytes'] / 2**20:.0f} MiB")
        del run, hfs  # free the parent's models before the children load theirs
        gc.collect()
        if args.rss:
            extra["rss"] = measure_rss(args, folder, data)
        result = write(True)
    common.log(f"gpt2mh / hf target tokens/s: {result['ratio']['target_tokens_per_s']:.2f}x "
               f"(target {TARGET_RATIO}x); wrote {args.out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
