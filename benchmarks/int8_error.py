"""int8 weight mode's error against fp32 on a checkpoint: logit error and greedy agreement.

    python benchmarks/int8_error.py CHECKPOINT [CHECKPOINT ...] [--prompts 8] [--new-tokens 64]

Per head: max and mean |logit int8 - fp32| over teacher-forced prompts (and the fp32 logits' std
for scale), and the share of greedy tokens (64 per prompt) that are identical, with the mean
position of the first difference. Prompts are random token ids (seeded) of 16 tokens."""
from __future__ import annotations

import argparse
import copy
import json

import torch

from gpt2mh import MultiHeadGPT2


def measure(folder: str, prompts: int, new: int, seed: int) -> dict:
    fp = MultiHeadGPT2.from_pretrained(folder).eval()
    q = copy.deepcopy(fp).quantize("int8")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, fp.config.vocab_size, (prompts, 16), generator=g)
    with torch.no_grad():
        ref, got = fp(ids), q(ids)  # (N, B, T, V)
    kw = dict(max_new_tokens=new, min_new_tokens=new, compile=False)
    a, b = fp.generate(ids, **kw), q.generate(ids, **kw)
    out = {"checkpoint": folder, "heads": {}}
    for n, name in enumerate(fp.head_names):
        err = (got[n] - ref[n]).abs()
        same = a[name] == b[name]  # (B, new)
        first = [int((~row).nonzero()[0]) if (~row).any() else new for row in same]
        out["heads"][name] = {"max_logit_err": err.max().item(), "mean_logit_err": err.mean().item(),
                              "logit_std": ref[n].std().item(), "greedy_agree": same.float().mean().item(),
                              "mean_first_diff": sum(first) / len(first)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps([measure(c, a.prompts, a.new_tokens, a.seed) for c in a.checkpoints], indent=1))


if __name__ == "__main__":
    main()
