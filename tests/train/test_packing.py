"""Shared-prefix packing: layout, mask, length policy, and exact equality with N separate sequences."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import NO_DROPOUT, TINY
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2mh import MultiHeadGPT2
from gpt2mh.config import GPT2Config
from gpt2mh.train.packing import PackReport, collate, label_hidden, pack_example, packed_loss

HEADS = ("a", "b", "c")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(n_heads=3, seed=0):
    torch.manual_seed(seed)
    model = MultiHeadGPT2(GPT2Config(**TINY, **NO_DROPOUT), HEADS[:n_heads])
    with torch.no_grad():  # heads start as copies of wte: make them differ
        model.heads.add_(torch.randn_like(model.heads) * 0.05)
    return model.train()


def random_examples(n, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        inp = torch.randint(3, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        targets = []
        for k in range(3):
            if (i + k) % 4 == 3:  # some rows lack some heads
                targets.append(None)
            else:
                L = int(torch.randint(1, 6, (1,), generator=g))
                targets.append(torch.randint(3, vocab, (L,), generator=g).tolist())
        out.append((inp, targets))
    return out


def reference_loss(model, examples, weights):
    """Σ_k w_k · mean over head k's target tokens of CE, each target run as its own input+target."""
    sums, counts = [0.0] * 3, [0] * 3
    for inp, targets in examples:
        for k, t in enumerate(targets):
            if t is None:
                continue
            seq = torch.tensor(inp + t)[None]
            h = model.hidden(seq, torch.arange(seq.size(1))[None])[0]  # (T, C)
            logits = h[len(inp) - 1 : -1] @ model.heads[k]  # positions that predict the target
            sums[k] = sums[k] + F.cross_entropy(logits, torch.tensor(t), reduction="sum")
            counts[k] += len(t)
    return sum(w * s / c for w, s, c in zip(weights, sums, counts) if c)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_layout_mask_and_positions():
    p = pack_example([10, 11, 2], [[20, 21, 2], None, [30, 2]])
    assert p.input_ids.tolist() == [10, 11, 2, 20, 21, 30]  # each target's </s> is a label only
    assert p.position_ids.tolist() == [0, 1, 2, 3, 4, 3]  # every target starts at len(input)
    assert p.segments.tolist() == [0, 0, 0, 1, 1, 3]
    # (position that predicts, head, token): the input's last position predicts every first token
    labels = list(zip(p.label_pos.tolist(), p.label_head.tolist(), p.label_ids.tolist()))
    assert labels == [(2, 0, 20), (3, 0, 21), (4, 0, 2), (2, 2, 30), (5, 2, 2)]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],  # target 0 sees the input and itself
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],  # target 2 does not see target 0
    ], dtype=torch.bool)
    assert torch.equal(p.mask(), expected)


def test_collate_pads_right_and_masks_pad_keys():
    a, b = pack_example([5, 2], [[7, 2]]), pack_example([5, 6, 2], [[7, 8, 2], [9, 2]])
    batch = collate([a, b], pad_id=0, n_heads=2)
    assert batch.input_ids.tolist() == [[5, 2, 7, 0, 0, 0], [5, 6, 2, 7, 8, 9]]
    assert batch.head_counts == [5, 2]
    assert batch.label_row.tolist() == [0, 0, 1, 1, 1, 1, 1]  # sorted by head, then row
    from gpt2mh.train.packing import packed_mask

    mask = packed_mask(batch.segments)[0, 0]
    assert not mask[:3, 3:].any()  # real queries never see pads
    assert torch.equal(mask[3:, 3:], torch.eye(3, dtype=torch.bool))  # a pad query sees only itself


def test_truncate_and_drop_policies_are_counted():
    rep = PackReport()
    p = pack_example([1, 2, 2], [[3, 4, 5, 2], [6, 2]], max_length=5, truncation="truncate",
             head_names=["x", "y"], report=rep, source="f:1")
    # room 2: x keeps its first two tokens and no </s>; y fits
    assert p.label_ids.tolist() == [3, 4, 6, 2]
    assert rep.truncated == {"x": 1} and "x 1" in rep.summary() and "f:1" in rep.summary()
    rep = PackReport()
    p = pack_example([1, 2, 2], [[3, 4, 5, 2], [6, 2]], max_length=5, truncation="drop",
             head_names=["x", "y"], report=rep, source="f:2")
    assert p.label_head.tolist() == [1, 1] and rep.dropped_targets == {"x": 1}
    rep = PackReport()
    assert pack_example([1] * 6, [[3, 2]], max_length=5, report=rep, source="f:3") is None
    assert rep.dropped_examples == 1 and "f:3" in rep.summary()


def test_packed_loss_and_grads_equal_separate_sequences():
    model = tiny_model()
    examples = random_examples(6, model.config.vocab_size)
    weights = torch.tensor([1.0, 0.5, 2.0])
    batch = collate([pack_example(i, t) for i, t in examples], pad_id=0, n_heads=3)
    out = packed_loss(model, batch, weights)
    packed_grads = grads(model, out.loss)
    ref = reference_loss(model, examples, weights.tolist())
    ref_grads = grads(model, ref)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(packed_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # per-head means and counts
    counts = [sum(len(t[k]) for _, t in examples if t[k] is not None) for k in range(3)]
    assert out.head_tokens.tolist() == counts


def test_head_logits_only_at_labelled_positions():
    model = tiny_model().eval()
    examples = random_examples(4, model.config.vocab_size)
    batch = collate([pack_example(i, t) for i, t in examples], pad_id=0, n_heads=3)
    V = model.config.vocab_size

    class Rows(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            matmul = func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
            if matmul and out.size(-1) == V:
                Rows.rows += out.numel() // V
            return out

    with torch.no_grad(), Rows():
        packed_loss(model, batch)
    assert Rows.rows == batch.tokens  # one logits row per label, nothing for unlabelled positions
    assert batch.tokens < batch.input_ids.numel() * 3


def test_label_gather_backward_is_bitwise_reproducible_on_two_threads():
    # Many labels read the same position (as every head's first token reads the input's last one).
    # h[row, pos]'s backward sums those with racing atomic adds on CPU threads: its last bits changed
    # from call to call, so a seeded quickstart run was not reproducible. 4096 x 128 gradient
    # elements is above ATen's grain size (32768), where that backward goes parallel.
    g = torch.Generator().manual_seed(0)
    h = torch.randn(8, 16, 128, generator=g, requires_grad=True)
    batch = SimpleNamespace(label_row=torch.randint(0, 8, (4096,), generator=g),
                            label_pos=torch.randint(0, 4, (4096,), generator=g))
    upstream = torch.randn(4096, 128, generator=g)
    assert torch.equal(label_hidden(h, batch), h[batch.label_row, batch.label_pos])
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for _ in range(20):
            h.grad = None
            label_hidden(h, batch).backward(upstream)
            results.append(h.grad.clone())
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(r, results[0]) for r in results)
