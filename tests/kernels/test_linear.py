"""gpt2mh.kernels.linear: the few-row kernel dispatch gives x @ W + b, tracks weight updates, keeps autograd."""
import copy

import pytest
import torch

from gpt2mh.kernels.linear import MKL_PACKED, linear, prepack, prepack_layer
from gpt2mh.model import Conv1D

FP32 = dict(rtol=1.3e-6, atol=1e-5)  # fp32 GEMM rounding, K = 96


@pytest.fixture
def layer():
    torch.manual_seed(0)
    m = Conv1D(96, 200)
    with torch.no_grad():
        m.weight.normal_(0, 0.02)
        m.bias.normal_(0, 0.02)
    return m


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 24])
def test_prepacked_matches_addmm(layer, rows):
    prepack_layer(layer, rows)
    assert (layer.kernel is not None) == (rows >= 2 and MKL_PACKED)
    for M in (rows, 1, rows + 1):  # other row counts take the fallback
        x = torch.randn(M, 96)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), torch.addmm(layer.bias, x, layer.weight), **FP32)


def test_stale_pack_is_not_used(layer):
    prepack_layer(layer, 3)
    x = torch.randn(3, 96)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an optimizer step would do the same: _version moves
        torch.testing.assert_close(layer(x), torch.addmm(layer.bias, x, layer.weight), **FP32)
    layer.weight.data = torch.randn(96, 200)  # new storage, same version counter
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.addmm(layer.bias, x, layer.weight), **FP32)
    prepack_layer(layer, 3)  # rebuilt for the new weight
    assert layer.kernel is None or layer.kernel.matches(layer.weight, 3)


def test_training_path_has_gradients(layer):
    prepack_layer(layer, 3)
    x = torch.randn(3, 96)
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_copy_drops_the_pack(layer):
    prepack_layer(layer, 3)
    twin = copy.deepcopy(layer)
    assert twin.kernel is None
    x = torch.randn(3, 96)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x), **FP32)


def test_no_pack_off_cpu_fp32():
    assert prepack(torch.randn(8, 8, dtype=torch.float64), 3) is None
    assert prepack(torch.randn(8, 8), 1) is None
    w, b, x = torch.randn(8, 4), torch.randn(4), torch.randn(2, 8)
    torch.testing.assert_close(linear(x, w, b, None), x @ w + b)
