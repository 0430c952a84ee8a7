"""y = x @ W + b for Conv1D's [in, out] weight: one named kernel dispatch, chosen by measurement.

A decode step multiplies S rows (one per stream) by every trunk weight. Plain MKL sgemm runs such
few-row GEMMs far below memory speed, so each weight should be read once for all S rows by a
kernel that streams it at full speed. Measured on the 2-core dev VM (torch 2.13, `torch.sum` read
bandwidth ~22 GB/s; fp32 weight GB/s of one layer, best of 12, rinna-small shapes 768x2304 ..
768x32000):

    rows M | addmm (MKL) | per-row bmm | MKL packed (`mkl::_mkl_linear`) | oneDNN packed | numpy
         1 |   23-34     |   22-32     |   20-32                         |   13-26       |
         3 |   12-17     |    9-11     |   16-23                         |   15-22       | 1-7
         8 |   12-16     |    6-7      |   15-18                         |   11-18       |
        24 |    8-10     |             |   11-13                         |    9-12       |

So: M = 1 keeps `addmm` (a GEMV already streams the weight); M >= 2 in inference uses MKL's packed
weight (what inductor's `freezing` emits for fp32 linears), which also gives bit-identical results
to `addmm` on these shapes (max |diff| 0.0 measured), so greedy ids do not move. Fallback: `addmm`
(no MKL, not CPU fp32, gradients on, under torch.compile — inductor cannot lower a packed MKL
tensor as a graph input — or a pack that no longer matches the weight). An int8 pack
(`gpt2mh.kernels.int8`) also runs under torch.compile, as a custom op.

A kernel is what `Conv1D.kernel` holds: called as `kernel(x, weight, bias)`, it routes through `linear`,
which uses `pack.kernel` only where it applies. The network never imports this module: the decode
loop calls `prepack_model` after setting up the KV cache."""
from __future__ import annotations

import torch

from ..model import Conv1D

MKL_PACKED = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class Prepacked:
    """A weight repacked for `rows`-row inputs, with what it was built from (to detect staleness)."""

    __slots__ = ("packed", "rows", "version", "data_ptr")
    compiles = False  # under torch.compile `linear` uses addmm (a packed MKL tensor is no graph input)

    def __init__(self, weight: torch.Tensor, rows: int):
        with torch.no_grad():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().t(), rows)
        self.rows, self.version, self.data_ptr = rows, weight._version, weight.data_ptr()

    # A copied or pickled model gets no pack (the packed MKL tensor has no storage to copy); the
    # next setup_cache repacks.
    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return _no_pack, ()

    def matches(self, weight: torch.Tensor, rows: int) -> bool:
        # An optimizer step or load_state_dict bumps _version; `p.data = t` changes data_ptr.
        return self.rows == rows and self.version == weight._version and self.data_ptr == weight.data_ptr()

    def kernel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkl._mkl_linear(x, self.packed, weight.t(), bias, self.rows)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return linear(x, weight, bias, self)


def _no_pack():
    return None


def prepack(weight: torch.Tensor, rows: int, old: Prepacked | None = None) -> Prepacked | None:
    """The packed weight for `rows`-row inference inputs, or None where `addmm` is the best kernel.

    Another kind of pack (int8 mode) is kept: it holds its own weights."""
    if old is not None and not isinstance(old, Prepacked):
        return old
    if rows < 2 or not MKL_PACKED or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    return old if old is not None and old.matches(weight, rows) else Prepacked(weight, rows)


def prepack_layer(layer: Conv1D, rows: int) -> None:
    layer.kernel = prepack(layer.weight, rows, layer.kernel)


def prepack_model(model, rows: int) -> None:
    """Repack the trunk's linear weights for `rows`-row inference inputs (the decode step's S
    streams). Kept across calls and rebuilt when a weight changes."""
    for m in model.transformer.modules():
        if isinstance(m, Conv1D):
            prepack_layer(m, rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pack=None) -> torch.Tensor:
    """(M, in) @ [in, out] + (out,) -> (M, out): the one kernel dispatch."""
    if pack is not None and not torch.is_grad_enabled() and (pack.compiles or not torch.compiler.is_compiling()) \
            and pack.matches(weight, x.size(0)):
        return pack.kernel(x, weight, bias)  # packed fp32 (rows fixed), or int8 (any row count)
    return torch.addmm(bias, x, weight)
