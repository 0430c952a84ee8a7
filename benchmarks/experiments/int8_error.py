"""int8 weight mode's error against fp32 on a trained checkpoint: logit error and greedy agreement.

    python benchmarks/experiments/int8_error.py CHECKPOINT [CHECKPOINT ...] [--new-tokens 64] [--random-prompts 8]
        [--out benchmarks/results/int8-error-cpu.json]
    python benchmarks/experiments/int8_error.py --train-larger DIR   # first train the larger model (~4 min on 2 cores)

The committed JSON: a `gpt2mh quickstart` checkpoint and the `--train-larger` one (the quickstart's
data and settings, 4 layers, 256 wide, 300 steps, lr 3e-3).

Prompts: the quickstart's held-out sentences (`gpt2mh.demo.corpus.build_examples("test")`, 50), encoded
with the packaged tokenizer exactly as generation encodes them (`encode_prompts`); and, unless
--random-prompts 0, that many random token-id prompts of 16 tokens (seeded), which reach logits the
training data never did. Per head and prompt set:
  max_logit_err, mean_logit_err  |logit int8 - fp32| over every real position of teacher-forced
                                 sequences (held-out: input + that head's reference target; random:
                                 the prompt), with the fp32 logits' std for scale
  greedy_agree                   share of identical greedy tokens, `--new-tokens` per prompt, EOS
                                 banned (min_new_tokens) so every prompt gives the same count
  mean_first_diff, first_diff_rate  mean position of the first differing token (--new-tokens when
                                 none) and the share of prompts with any difference
  output_exact                   (held-out only) share of prompts whose natural greedy output
                                 (stopping at </s>, at most --new-tokens) is identical in both modes"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from gpt2mh import MultiHeadGPT2
from gpt2mh.demo.corpus import build_examples
from gpt2mh.inputs import encode_input, encode_prompts, encode_target
from gpt2mh.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402  (the harness in benchmarks/)


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s), 1
    return ids, mask


def logit_errors(fp, q, ids, mask, n: int, chunk: int = 8) -> dict:
    """Head n's |int8 - fp32| logits at real positions (max, mean), and the fp32 logits' std there."""
    mx, total, count, s1, s2 = 0.0, 0.0, 0, 0.0, 0.0
    with torch.no_grad():
        for i in range(0, ids.size(0), chunk):
            x, m = ids[i:i + chunk], mask[i:i + chunk]
            real = m.bool()
            ref, got = fp(x, m)[n][real].double(), q(x, m)[n][real].double()  # (positions, V)
            err = (got - ref).abs()
            mx, total, count = max(mx, err.max().item()), total + err.sum().item(), count + err.numel()
            s1, s2 = s1 + ref.sum().item(), s2 + (ref * ref).sum().item()
    mean = s1 / count
    return {"max_logit_err": mx, "mean_logit_err": total / count, "logit_std": (s2 / count - mean * mean) ** 0.5,
            "positions": count // fp.config.vocab_size}


def agreement(a: torch.Tensor, b: torch.Tensor, new: int) -> dict:
    same = a == b  # (B, new)
    first = [int((~row).nonzero()[0]) if (~row).any() else new for row in same]
    return {"greedy_agree": same.float().mean().item(), "mean_first_diff": sum(first) / len(first),
            "first_diff_rate": sum(f < new for f in first) / len(first), "greedy_tokens": same.numel()}


def measure(folder: str, new: int, random_prompts: int, seed: int) -> dict:
    fp = MultiHeadGPT2.from_pretrained(folder).eval()
    q = copy.deepcopy(fp).quantize("int8")
    tok = Tokenizer.from_pretrained(None)  # the packaged (rinna) tokenizer, as the quickstart trains with
    test = build_examples("test")
    texts = [ex.input for ex in test]
    ids, mask = encode_prompts(tok, texts, fp)
    cfg = fp.config
    kw = dict(max_new_tokens=new, compile=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    forced = dict(kw, min_new_tokens=new)
    a, b = fp.generate(ids, mask, **forced), q.generate(ids, mask, **forced)
    na, nb = fp.generate(ids, mask, **kw), q.generate(ids, mask, **kw)
    out = {"checkpoint": folder, "model": {k: getattr(cfg, k) for k in ("n_embd", "n_layer", "n_head", "vocab_size")},
           "heads": list(fp.head_names), "held_out": {"prompts": len(texts), "source": "gpt2mh.demo.corpus test split"},
           "random": {"prompts": random_prompts, "length": 16, "seed": seed}, "new_tokens": new, "results": {}}
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(4, cfg.vocab_size, (random_prompts, 16), generator=g) if random_prompts else None
    if rand is not None:
        ra, rb = fp.generate(rand, **forced), q.generate(rand, **forced)
    for n, name in enumerate(fp.head_names):
        seqs = [encode_input(tok, ex.input) + encode_target(tok, ex.targets.get(name, "")) for ex in test]
        same_out = [x.tolist() == y.tolist() for x, y in zip(na[name], nb[name])]
        res = {"held_out": {**logit_errors(fp, q, *left_pad(seqs, tok.pad_id), n), **agreement(a[name], b[name], new),
                            "output_exact": sum(same_out) / len(same_out)}}
        if rand is not None:
            res["random"] = {**logit_errors(fp, q, rand, torch.ones_like(rand), n), **agreement(ra[name], rb[name], new)}
        out["results"][name] = res
    return out


LARGER = dict(n_embd=256, n_layer=4, n_head=4, n_inner=1024)


def train_larger(out: Path, steps: int = 300) -> str:
    """A larger model than the quickstart's on its data and settings, for the error figures."""
    from gpt2mh.demo.corpus import HEADS, write_dataset
    from gpt2mh.demo.quickstart import SMALL_MODEL, train_settings
    from gpt2mh.train.config import TrainConfig
    from gpt2mh.train.loop import train

    data = write_dataset(out / "data")
    s = dict(train_settings(None, steps), model_config=dict(SMALL_MODEL, **LARGER), learning_rate=3e-3)
    cfg = TrainConfig(**s, train_file=str(data["train"]), validation_file=str(data["test"]), heads=list(HEADS),
                      output_dir=str(out), device="cpu", progress=False)
    return str(train(cfg).last_checkpoint)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--train-larger", type=Path, default=None, help="train the larger model here first, measure it too")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--random-prompts", type=int, default=8, help="random-token prompts too (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    if a.train_larger:
        a.checkpoints.append(train_larger(a.train_larger))
    if not a.checkpoints:
        p.error("give checkpoint folder(s) or --train-larger DIR")
    res = [measure(c, a.new_tokens, a.random_prompts, a.seed) for c in a.checkpoints]
    print(json.dumps(res, indent=1))
    if a.out:
        common.write_json(a.out, res)  # atomic


if __name__ == "__main__":
    main()
