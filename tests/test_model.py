"""MultiHeadGPT2 against transformers' GPT2LMHeadModel (eager attention, fp32, eval), loaded through
our production loader from checkpoints transformers itself wrote; plus the KV cache, training path,
head initialisation and the settings we refuse."""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import NO_DROPOUT, RINNA_SMALL, TINY, TINY_ODD, hf_logits, left_padded

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.model import padded_causal_mask, position_ids_from_mask

HEADS = ["a", "b", "c"]
# fp32 on both sides, but different (equivalent) kernels: our SDPA vs HF's eager softmax(QK^T)V,
# addmm vs addmm in another order. That is ~1e-6 relative error per op, accumulated over up to 12
# layers and a 768-wide head matmul; observed max |diff| is ~1e-6 on logits of magnitude ~1-5.
# 1e-4 absolute leaves two orders of margin while any wrong key, transpose or mask is O(0.1).
PARITY_ATOL = 1e-4
# Cached vs uncached decoding runs the very same kernels on differently shaped (masked) key sets.
CACHE_ATOL = 1e-5


def config(**kw) -> GPT2Config:
    return GPT2Config.from_hf_dict(kw)


def load(hf_checkpoint, cfg, heads=HEADS):
    hf, folder = hf_checkpoint(cfg)
    return hf, MultiHeadGPT2.from_pretrained(folder, heads=heads)


# (hf, ours) per config, loaded once for this module's read-only parity tests (rinna-size takes ~2 s).
@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    cache = {}

    def get(cfg):
        key = tuple(sorted(cfg.items()))
        if key not in cache:
            cache[key] = load(hf_checkpoint, cfg)
        return cache[key]

    return get


# ---- logits parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("cfg", [TINY, TINY_ODD, RINNA_SMALL], ids=["tiny", "tiny-odd", "rinna-small"])
def test_logits_match_hf_for_every_head(loaded, cfg, padded):
    hf, ours = loaded(cfg)
    B, T = (2, 16) if cfg is RINNA_SMALL else (3, 11)
    ids, mask = left_padded(B, T, cfg["vocab_size"])
    mask = mask if padded else torch.ones_like(mask)
    ref = hf_logits(hf, ids, mask if padded else None)  # (B, T, V)
    with torch.no_grad():
        got = ours(ids, mask if padded else None)  # (N, B, T, V)
    assert got.shape == (len(HEADS), B, T, cfg["vocab_size"])
    keep = mask.bool()  # pad positions are garbage on both sides: compare real tokens only
    for i in range(len(HEADS)):
        torch.testing.assert_close(got[i][keep], ref[keep], atol=PARITY_ATOL, rtol=0)


def test_all_ones_mask_equals_no_mask(loaded):
    _, ours = loaded(TINY)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, torch.ones_like(ids)), ours(ids), atol=CACHE_ATOL, rtol=0)


# ---- KV cache -----------------------------------------------------------------------------------
def prefill_mask(attention_mask: torch.Tensor, L: int) -> torch.Tensor:
    """(B, T) 0/1 -> (B, 1, T, L) bool: the padded causal mask over the first T cache slots."""
    B, T = attention_mask.shape
    mask = torch.zeros(B, 1, T, L, dtype=torch.bool)
    mask[..., :T] = padded_causal_mask(attention_mask)
    return mask


@torch.no_grad()
def cached_greedy(model, ids, attention_mask, steps, cache_rows=None):
    """Prefill then `steps` greedy tokens (head 0 picks) one at a time through the KV cache.

    Returns (new token ids (B, steps), logits (N, B, steps + 1, V) of the last prompt token and each new one)."""
    B, T = ids.shape
    L = T + steps
    model.setup_cache(cache_rows or B, L)
    valid = torch.zeros(B, L, dtype=torch.bool)  # cache slots holding real tokens
    valid[:, :T] = attention_mask.bool()
    pos = position_ids_from_mask(attention_mask)
    h = model.hidden(ids, pos, prefill_mask(attention_mask, L), torch.arange(T))
    logits, tokens = [model.head_logits(h[:, -1])], []  # (N, B, V)
    pos = pos[:, -1]
    for t in range(T, L):
        tok = logits[-1][0].argmax(-1)  # (B,)
        tokens.append(tok)
        pos, valid[:, t] = pos + 1, True
        h = model.hidden(tok[:, None], pos[:, None], valid[:, None, None, :], torch.tensor([t]))
        logits.append(model.head_logits(h[:, -1]))
    model.clear_cache()
    return torch.stack(tokens, 1), torch.stack(logits, 2)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_cached_decoding_equals_full_forward(hf_checkpoint, padded):
    _, ours = load(hf_checkpoint, TINY_ODD)
    steps = 6
    ids, mask = left_padded(3, 9, TINY_ODD["vocab_size"])
    mask = mask if padded else torch.ones_like(mask)
    new, cached = cached_greedy(ours, ids, mask, steps)
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        full = ours(full_ids, full_mask)[:, :, ids.size(1) - 1:]  # (N, B, steps + 1, V)
    torch.testing.assert_close(cached, full, atol=CACHE_ATOL, rtol=0)
    assert torch.equal(cached.argmax(-1), full.argmax(-1))


def test_cache_longer_than_context_refused(hf_checkpoint):
    _, ours = load(hf_checkpoint, TINY)
    with pytest.raises(ValueError, match="n_positions"):
        ours.setup_cache(1, TINY["n_positions"] + 1)


# ---- training path ------------------------------------------------------------------------------
def loss_and_grads(model, ids, mask=None):
    logits = model(ids, mask)  # (N, B, T, V); mask None takes SDPA's is_causal path
    labels = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = sum(F.cross_entropy(lg[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100) for lg in logits)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_gradients_flow_and_checkpointing_matches(padded):
    model = MultiHeadGPT2(config(**TINY, **NO_DROPOUT), ["a", "b"]).train()
    ids, mask = left_padded(3, 12, TINY["vocab_size"])
    mask = mask if padded else None
    loss, grads = loss_and_grads(model, ids, mask)
    assert torch.isfinite(loss)
    for name, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, f"no gradient reaches {name}"

    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing = True
    loss_c, grads_c = loss_and_grads(ckpt, ids, mask)
    torch.testing.assert_close(loss_c, loss)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], msg=name)


def test_training_without_mask_uses_causal_path():
    model = MultiHeadGPT2(config(**TINY, **NO_DROPOUT)).train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    logits = model(ids)
    logits.sum().backward()
    # position 3's logits must not depend on later tokens
    ids2 = ids.clone()
    ids2[:, 4:] = (ids2[:, 4:] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids2)[:, :, :4], logits.detach()[:, :, :4], atol=CACHE_ATOL, rtol=0)


# ---- heads --------------------------------------------------------------------------------------
def test_fresh_heads_equal_wte_transposed():
    model = MultiHeadGPT2(config(**TINY), HEADS)
    assert model.heads.shape == (3, TINY["n_embd"], TINY["vocab_size"])
    for i in range(3):
        assert torch.equal(model.heads[i], model.transformer.wte.weight.t())


@pytest.mark.parametrize("names, match", [
    (["a", "a"], "duplicate"), (["a", ""], "non-empty"), (["a", "  "], "non-empty"), ([], "at least one head"),
])
def test_bad_head_names_refused(names, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadGPT2(config(**TINY), names)


def test_unknown_head_name_lists_heads():
    model = MultiHeadGPT2(config(**TINY), HEADS)
    assert model.head_index(["c", "a"]) == [2, 0] and model.head_index(None) == [0, 1, 2]
    with pytest.raises(KeyError, match=r"'zzz'.*\['a', 'b', 'c'\]"):
        model.head_index(["a", "zzz"])


# ---- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, match", [
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn"),
    ("add_cross_attention", True, "add_cross_attention"),
    ("scale_attn_weights", False, "scale_attn_weights"),
    ("activation_function", "relu", "activation_function='relu'"),
    ("n_embd", 30, "n_embd=30 is not divisible by n_head=4"),
    ("model_type", "gpt_neo", "model_type"),
])
def test_unsupported_config_refused(key, value, match):
    d = transformers.GPT2Config(**TINY).to_dict()
    d[key] = value
    with pytest.raises(ValueError, match=match):
        GPT2Config.from_hf_dict(d)


def test_unsupported_config_in_checkpoint_refused(hf_checkpoint, tmp_path):
    import json
    import shutil

    _, folder = hf_checkpoint(TINY)
    shutil.copytree(folder, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["scale_attn_by_inverse_layer_idx"] = True
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*scale_attn_by_inverse_layer_idx"):
        MultiHeadGPT2.from_pretrained(tmp_path / "ckpt")


def test_prompt_longer_than_context_refused():
    model = MultiHeadGPT2(config(**TINY))
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, TINY["n_positions"] + 1, dtype=torch.long))


def test_n_inner_absent_is_four_n_embd_like_transformers():
    # HF's GPT2MLP: n_inner if set, else 4 * n_embd — for GPT2Config(...), config.json and model_config alike
    from gpt2mh.tokenizer import Tokenizer
    from gpt2mh.train.config import TrainConfig
    from gpt2mh.train.setup import build_model

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=50))
    hf_width = hf.transformer.h[0].mlp.c_fc.weight.shape[1]
    assert hf_width == 256
    assert GPT2Config(n_embd=64, n_head=4).n_inner == hf_width
    assert GPT2Config.from_hf_dict(hf.config.to_dict()).n_inner == hf_width
    assert GPT2Config(n_embd=64, n_head=4, n_inner=100).n_inner == 100
    cfg = TrainConfig(train_file="unused.jsonl", heads=["a"], model_config=dict(n_embd=64, n_layer=1, n_head=4))
    model, _ = build_model(cfg, Tokenizer.from_pretrained())
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (64, 256)  # Conv1D layout [in, out]
    with pytest.raises(ValueError, match="n_inner=0"):
        GPT2Config(n_embd=64, n_head=4, n_inner=0)
