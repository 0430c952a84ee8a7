"""int8 weight mode: trunk linears and heads as int8 with one fp32 scale per output channel.

Activations stay fp32 (quantized per row on the fly by the kernel), and so do the embeddings,
LayerNorms and biases. Kernel: fbgemm's `quantized::linear_dynamic` (x86), which streams the int8
weight at ~2-3x the fp32-equivalent speed of any fp32 kernel for few-row inputs (issue 12: 35-57
GB/s fp32-equivalent against 15-34 for fp32 on 2 cores). Fallback where no int8 engine ships
(not x86, or no fbgemm/onednn build): the same int8 weights dequantized per call — same numbers
(up to the kernel's activation rounding), no speed-up.

Under torch.compile (`generate(compile=True)`) the kernel is the custom op `gpt2mh::int8_linear`:
fbgemm's packed weight is a TorchScript object dynamo cannot trace, so the op takes a registry key
instead, and inductor fuses everything between the int8 GEMMs (LayerNorm, GELU, residuals,
sampling). Eager mode calls fbgemm directly (a custom op's Python dispatch costs ~10 us a call)."""
from __future__ import annotations

import itertools
import warnings
import weakref

import torch

from ..model import GPT2, Conv1D
from .linear import linear

ENGINES = ("fbgemm", "x86", "onednn")


def _engine() -> str | None:
    ok = [e for e in ENGINES if e in torch.backends.quantized.supported_engines]
    return ok[0] if ok else None


def quantize_weight(w_out_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] fp32 -> (int8 [out, in], fp32 scale [out]): symmetric, per output channel."""
    scale = (w_out_in.abs().amax(1) / 127).clamp_min(1e-12)
    q = torch.round(w_out_in / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def fingerprint(t: torch.Tensor | None) -> torch.Tensor | None:
    """Per-row sums of a float32 tensor's bit patterns, in wrapping int32 adds: exact, so a change of any
    value changes its row's sum (only a permutation within a row goes unseen). One read of the tensor:
    about 10 ms per 100 MB on a CPU core."""
    if t is None:
        return None
    t = t.detach()
    return t.reshape(t.size(0), -1).view(torch.int32).sum(-1, dtype=torch.int32)


def same_print(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None) == (b is None) and (a is None or torch.equal(a, b))


_PACKS: dict[int, object] = {}  # key -> fbgemm packed weight, for the custom op (freed with its Int8Linear)
_KEYS = itertools.count()


@torch.library.custom_op("gpt2mh::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, key: int, n_out: int) -> torch.Tensor:
    """(M, in) fp32 -> (M, n_out): fbgemm's dynamic int8 linear with the weight registered as `key`."""
    return torch.ops.quantized.linear_dynamic(x, _PACKS[key])


@int8_linear.register_fake
def _(x, key, n_out):
    return x.new_empty(x.size(0), n_out)


class Int8Linear:
    """y = x @ W + b with W held as int8; built from Conv1D's [in, out] weight (fp32 kept untouched).

    A `Conv1D.kernel`: `matches` tells the dispatch (`gpt2mh.kernels.linear`) whether the fp32 weight changed
    since (then it is not used)."""

    compiles = True  # runs under torch.compile too (the custom op `gpt2mh::int8_linear`)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        with torch.no_grad():
            w = weight.detach().t().float()  # (out, in)
            q, scale = quantize_weight(w)
            b = None if bias is None else bias.detach().float().contiguous()
            self.engine = _engine()
            if self.engine is not None:
                torch.backends.quantized.engine = self.engine
                with warnings.catch_warnings():  # qint8 tensors are "deprecated"; fbgemm's packing still takes them
                    warnings.simplefilter("ignore", UserWarning)
                    qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
                self.packed = torch.ops.quantized.linear_prepack(qw, b)
                self.key, self.n_out = next(_KEYS), q.size(0)
                _PACKS[self.key] = self.packed
                weakref.finalize(self, _PACKS.pop, self.key, None)
            else:
                self.q, self.scale, self.bias = q, scale, b
        self.version, self.data_ptr = weight._version, weight.data_ptr()
        self.bias_ref, self.bias_version = bias, None if bias is None else bias._version
        self.print, self.bias_print = fingerprint(weight), fingerprint(bias)
        self.stale = False

    def matches(self, weight: torch.Tensor, rows: int | None = None) -> bool:
        """Cheap, every call: version counters and storage (an optimizer step, a no_grad copy_, `p.data = t`).
        Writes that bypass the version counter (`p.data.copy_(t)`, numpy views) are found by `verify`."""
        if torch.compiler.is_compiling():  # checked before compiled generation instead (`stale_layers`)
            return True
        bias = self.bias_ref
        return not self.stale and self.version == weight._version and self.data_ptr == weight.data_ptr() \
            and (bias is None or self.bias_version == bias._version)

    def verify(self, weight: torch.Tensor) -> bool:
        """The full check (one read of the weight and bias): marks the int8 copy stale for good when the fp32
        values differ from those it was built from, by whatever route they changed."""
        if not self.stale and not (self.matches(weight) and same_print(self.print, fingerprint(weight))
                                   and same_print(self.bias_print, fingerprint(self.bias_ref))):
            self.stale = True
        return not self.stale

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return linear(x, weight, bias, self)

    def kernel(self, x: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
        """x @ W + b with the int8 W and the bias it was built with."""
        if self.engine is not None:
            x = x.float().contiguous()
            if torch.compiler.is_compiling():
                return int8_linear(x, self.key, self.n_out)
            return torch.ops.quantized.linear_dynamic(x, self.packed)
        y = (x.float() @ self.q.t().float()) * self.scale
        return y if self.bias is None else y + self.bias

    def __deepcopy__(self, memo):  # a copied model is fp32 again (quantize it anew)
        return None


class Int8Heads:
    """The N heads [N, C, V] as N int8 linears; `matmul` is the int8 kernel behind `model.heads_matmul`."""

    def __init__(self, heads: torch.Tensor, linears: list[Int8Linear] | None = None, version: int = 0,
                 trunk=()):
        self.source, self.version = heads, version
        self.linears = linears if linears is not None else [Int8Linear(h, None) for h in heads.unbind(0)]
        self.print = fingerprint(heads.reshape(heads.size(0), -1)) if linears is None else None
        self.subsets: dict[tuple[int, ...], Int8Heads] = {}
        self.trunk = list(trunk)  # (name, Conv1D) of the quantized trunk layers, for `fresh`

    def fresh(self, heads: torch.Tensor) -> bool:
        """Whether the int8 heads still hold `heads`' values; verifies every quantized trunk layer too (a
        stale one falls back to fp32). Called once per generate / score call and model forward."""
        stale_layers_of(self.trunk)
        if self.version == heads._version and self.print is not None and \
                not same_print(self.print, fingerprint(heads.reshape(heads.size(0), -1))):
            self.version = -1  # changed behind the version counter: stale for good
        return self.version == heads._version

    def size(self, dim: int) -> int:
        return len(self.linears) if dim == 0 else self.source.size(dim)

    def select(self, idx: list[int]) -> "Int8Heads":
        """The heads idx, as one object per subset (a compiled step sees the same one each call)."""
        key = tuple(idx)
        if key not in self.subsets:
            self.subsets[key] = Int8Heads(self.source, [self.linears[i] for i in idx], self.version, self.trunk)
        return self.subsets[key]

    def matmul(self, h: torch.Tensor) -> torch.Tensor:
        """(N, M, C) -> (N, M, V): each head at its own streams' rows."""
        return torch.stack([lin.kernel(x) for lin, x in zip(self.linears, h.unbind(0))])

    def matmul_groups(self, parts) -> torch.Tensor:
        """N row groups (M_n, C) -> (sum M_n, V): group n through head n (model.heads_matmul_groups)."""
        return torch.cat([lin.kernel(x) for lin, x in zip(self.linears, parts) if x.size(0)])  # 0 rows: an idle group

    def __deepcopy__(self, memo):
        return None


def quantize_model(model: GPT2, mode: str | None = "int8") -> GPT2:
    """Inference with int8 weights: every trunk linear and every head stored as int8 with a
    per-output-channel scale (embeddings, LayerNorms, biases stay fp32). The fp32 parameters
    are kept (saving and training use them); a changed weight drops back to its fp32 kernel.
    mode=None: back to exact fp32. Error vs fp32: benchmarks/README.md (int8 error)."""
    if mode not in ("int8", None):
        raise ValueError(f"quantize(mode={mode!r}): supported modes are 'int8' and None (fp32)")
    if mode == "int8" and (model.device.type != "cpu" or model.dtype != torch.float32):
        raise ValueError(f"quantize('int8') needs a CPU float32 model (this one is {model.device.type} "
                         f"{model.dtype}); int8 kernels are CPU-only here")
    trunk = [(f"transformer.{name}", m) for name, m in model.transformer.named_modules() if isinstance(m, Conv1D)]
    for _, m in trunk:
        m.kernel = Int8Linear(m.weight, m.bias) if mode else None
    model.int8_heads = Int8Heads(model.heads, version=model.heads._version, trunk=trunk) if mode else None
    hook = getattr(model, "_int8_check", None)
    if hook is not None:
        hook.remove()
    # model(ids) without gradients uses the int8 trunk: check it once per call, as generate and score do
    model._int8_check = model.register_forward_pre_hook(_check_before_forward) if mode else None
    return model


def _check_before_forward(model, args) -> None:
    if model.int8_heads is not None and not torch.is_grad_enabled():
        model.int8_heads.fresh(model.heads)


def stale_layers_of(trunk) -> list[str]:
    return [name for name, m in trunk if isinstance(m.kernel, Int8Linear) and not m.kernel.verify(m.weight)]


def stale_layers(model: GPT2) -> list[str]:
    """Every int8 layer whose fp32 values changed since quantize('int8'), by any route (an optimizer step,
    a no_grad copy, `.data` writes, numpy views): the full check, one read of the weights. Eager decoding
    falls back to fp32 for them; a compiled graph cannot, so compiled generation refuses (`request.use_compile`)."""
    q = model.int8_heads
    if q is None:
        return []
    return stale_layers_of(q.trunk) + ([] if q.fresh(model.heads) else ["heads"])
