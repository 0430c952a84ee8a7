"""Shared-prefix packing: one sequence per example, the input once and every head's target after it.

    ids:       [ input ........ | target_0[:-1] | target_1[:-1] | ... ]
    positions: [ 0 ..... L-1    | L, L+1, ...   | L, L+1, ...   | ... ]   every target starts at L
    segment:   [ 0 ..... 0      | 1 ...         | 2 ...         | ... ]   0 = input, k+1 = head k

A target's queries see the input and the earlier tokens of their own target, nothing else, so each
target's hidden states are exactly those of the separate sequence `input + target_k` while the trunk
reads the input once. A target's last token (its </s>) is only ever a label: nothing reads its
hidden state, so it is not fed in. The input's last position predicts every head's first token.

Labels are flat: (row, position of the hidden state that predicts the token, head, token id), sorted
by head so each head's labels are one contiguous slice; a head's logits are computed only there.

Length policy: `max_length` bounds each `input + target_k` (the positions a target reaches).
  "truncate": a target that does not fit keeps its first tokens and loses its </s> (the head is never
              taught to stop in the middle of an answer); counted per head.
  "drop":     that head's target is left out of the example (its other heads still train); counted.
An input that leaves no room for any target drops the whole example; counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..inputs import encode_input, encode_target

TRUNCATION = ("truncate", "drop")
PAD_SEGMENT = -1
_SHOWN = 3  # sources kept per counted reason


@dataclass
class PackedExample:
    input_ids: torch.Tensor     # (T,) input, then each target without its last token
    position_ids: torch.Tensor  # (T,)
    segments: torch.Tensor      # (T,) 0 input, k+1 head k
    label_pos: torch.Tensor     # (M,) the position whose hidden state predicts the label
    label_head: torch.Tensor    # (M,) sorted
    label_ids: torch.Tensor     # (M,)
    source: str = ""

    def __len__(self) -> int:
        return self.input_ids.numel()

    def head_counts(self, n_heads: int) -> torch.Tensor:
        return torch.bincount(self.label_head, minlength=n_heads)  # (N,) labels per head

    def mask(self) -> torch.Tensor:
        return packed_mask(self.segments[None])[0, 0]  # (T, T)


@dataclass
class PackReport:
    examples: int = 0
    kept: int = 0
    truncated: dict[str, int] = field(default_factory=dict)        # head -> targets cut to fit
    dropped_targets: dict[str, int] = field(default_factory=dict)  # head -> targets left out
    dropped_examples: int = 0                                     # no target left (input too long)
    shown: dict[str, list[str]] = field(default_factory=dict)      # reason -> first few sources

    def count(self, reason: str, head: str | None, source: str) -> None:
        if reason == "input too long":
            self.dropped_examples += 1
        else:
            table = self.truncated if reason == "truncated" else self.dropped_targets
            table[head] = table.get(head, 0) + 1
        shown = self.shown.setdefault(reason, [])
        if len(shown) < _SHOWN and source:
            shown.append(source)

    @property
    def clean(self) -> bool:
        return not (self.truncated or self.dropped_targets or self.dropped_examples)

    def summary(self) -> str:
        text = f"packed {self.kept} of {self.examples} examples"
        parts = []
        for name, table in (("truncated", self.truncated), ("dropped", self.dropped_targets)):
            if table:
                where = self.shown.get(name, [])
                parts.append(f"{name} targets over max_length: "
                             + ", ".join(f"{h} {n}" for h, n in table.items())
                             + (f" (e.g. {', '.join(where)})" if where else ""))
        if self.dropped_examples:
            where = self.shown.get("input too long", [])
            parts.append(f"dropped {self.dropped_examples} examples whose input leaves no room for a target"
                         + (f" (e.g. {', '.join(where)})" if where else ""))
        return text + ("; " + "; ".join(parts) if parts else "")


def pack_example(input_ids: Sequence[int], targets: Sequence[Sequence[int] | None], max_length: int | None = None,
         truncation: str = "truncate", head_names: Sequence[str] | None = None,
         report: PackReport | None = None, source: str = "") -> PackedExample | None:
    """One example: input ids and, per head index, a target's ids (with its </s>) or None.

    Returns None when no target is left (counted in `report`)."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    L = len(input_ids)
    if L == 0:
        raise ValueError(f"{source or 'example'}: empty input ids (the prompt format always ends the input in </s>)")
    names = list(head_names) if head_names is not None else [str(k) for k in range(len(targets))]
    room = None if max_length is None else max_length - L
    ids, pos, seg = list(input_ids), list(range(L)), [0] * L
    label_pos, label_head, label_ids = [], [], []
    for k, target in enumerate(targets):
        if not target:
            continue
        target = list(target)
        if room is not None and len(target) > room:
            if room <= 0:
                continue  # counted once for the whole example below when nothing fits
            if truncation == "drop":
                if report is not None:
                    report.count("dropped", names[k], source)
                continue
            target = target[:room]  # keeps a true prefix of the answer, without </s>
            if report is not None:
                report.count("truncated", names[k], source)
        start = len(ids)
        ids += target[:-1]
        pos += range(L, L + len(target) - 1)
        seg += [k + 1] * (len(target) - 1)
        # token j of the target is predicted by the input's last position (j = 0) or by token j-1
        label_pos += [L - 1] + list(range(start, start + len(target) - 1))
        label_head += [k] * len(target)
        label_ids += target
    if not label_ids:
        if report is not None:
            report.count("input too long", None, source)
        return None
    return PackedExample(
        torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
        torch.tensor(seg, dtype=torch.long), torch.tensor(label_pos, dtype=torch.long),
        torch.tensor(label_head, dtype=torch.long), torch.tensor(label_ids, dtype=torch.long), source,
    )


def pack_examples(examples, tokenizer, head_names: Sequence[str], max_length: int | None = None,
                  truncation: str = "truncate") -> tuple[list[PackedExample], PackReport]:
    """data.Example rows -> packed examples in the prompt format (gpt2mh.inputs). Heads of the
    example that are not in head_names are ignored."""
    report = PackReport(examples=len(examples))
    packed = []
    for ex in examples:
        targets = [encode_target(tokenizer, ex.targets[h]) if h in ex.targets else None for h in head_names]
        p = pack_example(encode_input(tokenizer, ex.input), targets, max_length, truncation, head_names, report, ex.source)
        if p is not None:
            packed.append(p)
    report.kept = len(packed)
    return packed, report


def packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool attention mask, True = attend.

    A query sees earlier keys (causal) that are input or in its own segment; pad keys are never
    seen. A pad query sees only itself (SDPA gives NaN for a row with no key); nothing reads it."""
    T = segments.size(1)
    q, k = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    mask = causal & ((k == 0) | (k == q)) & (k != PAD_SEGMENT)
    mask |= torch.eye(T, dtype=torch.bool, device=segments.device) & (q == PAD_SEGMENT)
    return mask[:, None]


@dataclass
class Batch:
    input_ids: torch.Tensor     # (B, T) right-padded
    position_ids: torch.Tensor  # (B, T), 0 on pads
    segments: torch.Tensor      # (B, T), PAD_SEGMENT on pads
    label_row: torch.Tensor     # (M,) labels sorted by head
    label_pos: torch.Tensor     # (M,)
    label_ids: torch.Tensor     # (M,)
    head_counts: list[int]      # labels per head: the split sizes of the label tensors

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (
            self.input_ids, self.position_ids, self.segments, self.label_row, self.label_pos, self.label_ids)),
            self.head_counts)

    @property
    def tokens(self) -> int:
        return int(sum(self.head_counts))


def collate(examples: Sequence[PackedExample], pad_id: int, n_heads: int) -> Batch:
    """Right-pad to the longest example; labels of all rows merged and sorted by head."""
    if not examples:
        raise ValueError("collate needs at least one example")
    B, T = len(examples), max(len(e) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    segments = torch.full((B, T), PAD_SEGMENT, dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e)] = e.input_ids
        position_ids[b, : len(e)] = e.position_ids
        segments[b, : len(e)] = e.segments
    rows = torch.cat([torch.full_like(e.label_ids, b) for b, e in enumerate(examples)])
    heads = torch.cat([e.label_head for e in examples])
    order = torch.sort(heads, stable=True).indices
    pos = torch.cat([e.label_pos for e in examples])[order]
    ids = torch.cat([e.label_ids for e in examples])[order]
    counts = torch.bincount(heads, minlength=n_heads).tolist()
    return Batch(input_ids, position_ids, segments, rows[order], pos, ids, counts)


@dataclass
class LossOutput:
    loss: torch.Tensor        # () the weighted objective (what backward() is called on)
    head_sums: torch.Tensor   # (N,) summed cross-entropy per head, detached, fp32
    head_tokens: torch.Tensor  # (N,) labels per head in this batch


def packed_loss(model, batch: Batch, weights: torch.Tensor | None = None,
                denominators: torch.Tensor | None = None, scale: float = 1.0) -> LossOutput:
    """Σ_k w_k · (summed cross-entropy of head k) / denominators[k], times `scale`.

    denominators default to this batch's label counts (a per-head token mean). Training passes the
    counts of the whole optimizer step (all micro-batches, all processes), so accumulated and
    data-parallel steps equal one big batch. Logits exist only at labelled positions, per head."""
    counts = torch.tensor(batch.head_counts, dtype=torch.float32)
    denominators = counts if denominators is None else denominators.float().cpu()
    h = model.hidden(batch.input_ids, batch.position_ids, packed_mask(batch.segments))  # (B, T, C)
    h = label_hidden(h, batch)  # (M, C): only positions that predict a label
    sums = []
    loss = h.new_zeros((), dtype=torch.float32)
    heads = model.heads.unbind(0)  # backward stacks the N head grads once (heads[k] would zero-fill N times)
    # Ragged on purpose: head k only at its own M_k rows. model.heads_matmul would give every head
    # every labelled row, N x the (M, V) logits and their memory.
    for k, (h_k, y_k) in enumerate(zip(h.split(batch.head_counts), batch.label_ids.split(batch.head_counts))):
        if not len(y_k):
            sums.append(loss.new_zeros(()))
            continue
        ce = F.cross_entropy((h_k @ heads[k]).float(), y_k, reduction="sum")  # (M_k, V) logits
        sums.append(ce.detach())
        w = 1.0 if weights is None else float(weights[k])
        if w and denominators[k] > 0:
            loss = loss + ce * (w / float(denominators[k]))
    return LossOutput(loss * scale, torch.stack(sums).float().cpu(), counts)


def label_hidden(h: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, T, C) hidden states -> (M, C), the state that predicts each label.

    One position predicts several labels (the input's last position predicts every head's first
    token), so the gather's backward sums duplicates. h[label_row, label_pos] would do that with
    index_put_(accumulate=True), which on CPU with more than one thread adds with racing atomics: the
    sum's order, hence its last bits, changes from run to run and a seeded training run is not
    reproducible. index_select's backward (index_add_) adds in index order on CPU."""
    B, T, C = h.shape
    return h.reshape(B * T, C).index_select(0, batch.label_row * T + batch.label_pos)


class PackedLoss(nn.Module):
    """`packed_loss` as a module (not a language model): its forward is the loss, so
    DistributedDataParallel can wrap it (DDP hooks `forward`; the loss reads the trunk and the
    heads tensor directly)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, weights=None, denominators=None, scale: float = 1.0) -> tuple:
        out = packed_loss(self.model, batch, weights, denominators, scale)
        return out.loss, out.head_sums, out.head_tokens
