"""CUDA-graph hazards of the decode loop, checked on the CPU.

A CUDA graph replay writes its outputs into the same static buffers every time, so the previous
step's outputs are overwritten by the next replay; its inputs are copied into static placeholders,
and a host-built tensor per step is a host-to-device copy. These tests run the real loop with a
stand-in for the compiled step that behaves like a replay and check the results do not change."""
from __future__ import annotations

import pytest
import torch

import gpt2mh.inference.decode as dec
import gpt2mh.inference.generate as gen_mod
from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.inference.decode import decode_one_token

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
            static.append(type(out)(*(t.clone() for t in out)))
        else:
            for buf, t in zip(static[0], out):
                buf.copy_(t)
        return static[0]

    return step


def prompts():
    # 4 prompts: a power of two, so compile=True's batch bucketing adds no rows and the sampling
    # noise (one draw per stream) is the same as in the eager call.
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
    monkeypatch.setattr(dec, "compiled_decode_step", lambda device_type: replaying_step())
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
    monkeypatch.setattr(dec, "compiled_decode_step", lambda device_type: replaying_step())
    got = list(gen_mod.stream(model, Ids(), ids, mask, compile=True, **kw))
    model.clear_cache()
    assert got == ref and len(ref) > 20


def test_decode_step_does_not_mutate_its_inputs(model):
    # Under CUDA graphs a mutated graph input that is not a static buffer disables the graph
    # ("skipping cudagraphs due to mutated inputs"): the step must only write the KV cache.
    ids, mask = prompts()
    with gen_mod.decoding(model, ids, mask, None, None, False, None, None, dict(max_new_tokens=4)) as (st, loop):
        first = next(loop)
        fixed, _ = dec.initial_state(model, st, *_padded(st, ids, mask))
        before = [t.clone() for t in first]
        controls, plan = dec.build_controls(st.configs, torch.arange(st.N).repeat_interleave(st.Bp * st.R),
                                                V, model.device)
        out = decode_one_token(model, fixed, first, None, controls, plan)
        for b, t in zip(before, first):
            assert torch.equal(b, t)
        assert int(out.input_pos) == int(first.input_pos) + 1 and int(out.step) == int(first.step) + 1


def _padded(st, ids, mask):
    return ids, mask  # compile=False: no batch bucketing, prepare returns the prompts as given


def test_no_host_tensor_is_built_per_step(model, monkeypatch):
    # input_pos and step live in the state on the device: a torch.tensor(...) per token would be a
    # host-to-device copy (and a sync point) on every step of a CUDA graph loop.
    ids, mask = prompts()
    with gen_mod.decoding(model, ids, mask, None, None, False, 0, None,
                          dict(do_sample=True, top_p=0.9, repetition_penalty=1.2, max_new_tokens=30)) as (st, loop):
        next(loop)

        def refuse(*args, **kwargs):
            raise AssertionError("torch.tensor called inside the decode loop")

        monkeypatch.setattr(torch, "tensor", refuse)
        monkeypatch.setattr(torch, "as_tensor", refuse)
        steps = sum(1 for _ in loop)
    assert steps == 29


def test_compiled_calls_keep_the_cache_buffers(model, monkeypatch):
    # CUDA graphs replay on fixed addresses: a compiled call's KV cache is reused by the next call in
    # the same bucket instead of being reallocated (which would re-record the graphs).
    monkeypatch.setattr(dec, "compiled_decode_step", lambda device_type: replaying_step())
    ids, mask = prompts()
    model.generate(ids, mask, compile=True, max_new_tokens=5)
    ptr = model.transformer.h[0].attn.kv_cache.k_cache.data_ptr()
    model.generate(ids[:, 1:], mask[:, 1:], compile=True, max_new_tokens=6)
    assert model.transformer.h[0].attn.kv_cache.k_cache.data_ptr() == ptr
    model.clear_cache()
    assert model.transformer.h[0].attn.kv_cache is None
    model.generate(ids, mask, compile=False, max_new_tokens=3)
    assert model.transformer.h[0].attn.kv_cache is None  # eager calls free it


def test_generator_must_be_a_generator_on_the_model_device(model):
    ids, _ = prompts()
    with pytest.raises(TypeError, match="torch.Generator"):
        model.generate(ids, do_sample=True, generator=0, compile=False)
