"""CUDA-graph hazards of the engine's decode step, checked on the CPU.

A CUDA graph replay writes its outputs into the same static buffers every time, so the previous
step's outputs are overwritten by the next replay; its inputs are copied into static placeholders,
and a host-built tensor per step is a host-to-device copy. These tests run the real engine with a
stand-in for the compiled step that behaves like a replay and check the results do not change."""
from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import gpt2mh.inference.decode as dec
import gpt2mh.inference.engine as eng
import gpt2mh.inference.generate as gen_mod
from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.inference.controls import SamplingConfig
from gpt2mh.inference.engine import Engine, Request, Result, Tokens

V = 300
CFG = GPT2Config(vocab_size=V, n_positions=96, n_embd=32, n_layer=2, n_head=4, n_inner=128,
                 bos_token_id=1, eos_token_id=2, pad_token_id=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultiHeadGPT2(CFG, ["a", "b", "c"]).eval()


def replaying_step():
    """A decode step that returns the same output tensors on every call, overwritten in place —
    what `torch.compile(mode="reduce-overhead")` replays do on CUDA."""
    static: list[tuple] = []

    def step(*args):
        out = dec.decode_one_token(*args)
        if not static:
            static.append(pytree.tree_map(torch.clone, out))  # SlotState nests Beams: every tensor leaf
        else:
            for buf, t in zip(pytree.tree_leaves(static[0]), pytree.tree_leaves(out)):
                buf.copy_(t)
        return static[0]

    return step


def prompts():
    # 4 prompts: a power of two, so compile=True's slot bucketing adds no slots.
    ids = torch.randint(4, V, (4, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids, mask


CASES = {
    "greedy": dict(max_new_tokens=20),
    "sampled": dict(do_sample=True, temperature=1.3, top_k=40, top_p=0.9, max_new_tokens=20, seed=3,
                    num_return_sequences=2),
    "eos": dict(max_new_tokens=20, eos_token_id=[2, 17, 99], per_head={"b": dict(max_new_tokens=5)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_survives_outputs_overwritten_by_the_next_step(model, monkeypatch, case):
    ids, mask = prompts()
    ref = model.generate(ids, mask, compile=False, **CASES[case])
    monkeypatch.setattr(eng, "compiled_decode_step", lambda device_type: replaying_step())
    got = model.generate(ids, mask, compile=True, **CASES[case])  # "compiled" = the replaying stand-in
    model.clear_cache()
    assert list(got) == list(ref)
    for h in ref:
        assert torch.equal(got[h], ref[h]), h
    assert any(ref[h].size(1) > 8 for h in ref)  # long enough that many steps were replayed


def test_stream_survives_outputs_overwritten_by_the_next_step(model, monkeypatch):
    class Ids:  # a stand-in tokenizer: text is the ids, one character each
        vocab_size = V

        def decode(self, ids):
            return "".join(chr(0x4E00 + i) for i in ids)

    ids, mask = prompts()
    kw = dict(do_sample=True, top_k=20, max_new_tokens=12, seed=5)
    ref = list(gen_mod.stream(model, Ids(), ids, mask, compile=False, **kw))
    monkeypatch.setattr(eng, "compiled_decode_step", lambda device_type: replaying_step())
    got = list(gen_mod.stream(model, Ids(), ids, mask, compile=True, **kw))
    model.clear_cache()
    assert got == ref and len(ref) > 20


def _engine(model, **controls):
    cfg = SamplingConfig(**controls, eos_token_id=(2,), pad_token_id=3)
    engine = Engine(model, ["a", "b"], slots=8, prompt_len=8, gen_len=cfg.max_new_tokens)
    ids, mask = prompts()
    requests = [Request(b, row[m.bool()].tolist(), {"a": cfg, "b": cfg}, 0, b) for b, (row, m) in enumerate(zip(ids, mask))]
    return engine, requests


def test_decode_step_does_not_mutate_its_inputs(model):
    # Under CUDA graphs a mutated graph input that is not a static buffer disables the graph
    # ("skipping cudagraphs due to mutated inputs"): the step must only write the KV cache.
    engine, requests = _engine(model, max_new_tokens=4)
    events = engine.events(requests)
    assert isinstance(next(events), Tokens)  # every input admitted, its first tokens drawn
    state = engine.state
    before = [t.clone() for t in pytree.tree_leaves(state)]
    out = dec.decode_one_token(model, engine._fixed(), state, engine.controls, engine.plan)
    for b, t in zip(before, pytree.tree_leaves(state)):
        assert torch.equal(b, t)
    live = state.unfinished
    assert torch.equal(out.n_gen, state.n_gen + live.long()) and bool(live.any())
    events.close()


def test_no_host_tensor_is_built_per_step(model, monkeypatch):
    # Positions, steps and noise live in the state on the device: a torch.tensor(...) per token would
    # be a host-to-device copy (and a sync point) on every step of a CUDA graph loop.
    engine, requests = _engine(model, do_sample=True, top_p=0.9, repetition_penalty=1.2, max_new_tokens=30,
                               min_new_tokens=30)
    events = engine.events(requests)
    assert isinstance(next(events), Tokens)

    steps, built = 0, []
    real = torch.tensor

    def record(*args, **kwargs):  # host tensors are fine when streams end (the slot layout changes), not per step
        built.append(steps)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", record)
    monkeypatch.setattr(torch, "as_tensor", record)
    for event in events:  # every stream runs 30 tokens: 29 steps, then they all end
        if isinstance(event, Result):
            break
        steps += 1
    monkeypatch.undo()
    events.close()
    assert steps == 29 and set(built) <= {29}


def test_compiled_calls_keep_the_cache_buffers(model, monkeypatch):
    # CUDA graphs replay on fixed addresses: a compiled call's KV cache is reused by the next call of
    # the same layout instead of being reallocated (which would re-record the graphs).
    monkeypatch.setattr(eng, "compiled_decode_step", lambda device_type: replaying_step())
    ids, mask = prompts()
    model.generate(ids, mask, compile=True, max_new_tokens=5)
    ptr = model.transformer.h[0].attn.kv_cache.k_gen.data_ptr()
    model.generate(ids[:, 1:], mask[:, 1:], compile=True, max_new_tokens=6)
    assert model.transformer.h[0].attn.kv_cache.k_gen.data_ptr() == ptr
    model.clear_cache()
    assert model.transformer.h[0].attn.kv_cache is None
    model.generate(ids, mask, compile=False, max_new_tokens=3)
    assert model.transformer.h[0].attn.kv_cache is None  # eager calls free it


def test_generator_must_be_a_generator_on_the_model_device(model):
    ids, _ = prompts()
    with pytest.raises(TypeError, match="torch.Generator"):
        model.generate(ids, do_sample=True, generator=0, compile=False)
