"""The depthwise convolution whose backward is two forward convolutions
(fastdarts/depthwise_conv.py), against ATen's convolution and autograd."""
import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from fastdarts.depthwise_conv import DepthwiseConv2dFunction, depthwise_conv2d, uses_depthwise_backward

# (channels, height, width, kernel, stride, padding, dilation): the search
# space's 3x3/5x5 kernels, dilated, stride 2, odd and non-square sizes,
# non-square kernels, no padding, padding beyond the kernel's reach
# (the flipped kernel's padding would be negative: the transposed path), stride 3.
CASES = [
    (3, 7, 9, 3, 1, 1, 1),
    (3, 7, 9, 5, 1, 2, 1),
    (4, 8, 8, 3, 1, 2, 2),
    (4, 9, 7, 5, 1, 4, 2),
    (2, 9, 9, 3, 2, 1, 1),
    (2, 8, 11, 5, 2, 2, 1),
    (5, 10, 9, 3, 2, 2, 2),
    (5, 11, 11, 5, 2, 4, 2),
    (2, 6, 7, (3, 5), 1, (1, 2), 1),
    (3, 7, 7, 3, 1, 0, 1),
    (3, 6, 6, 3, 1, 3, 1),
    (2, 10, 10, 3, 3, 1, 1),
]


def _grads(fn, x, w, dy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w)
    return (y, *torch.autograd.grad(y, (x, w), dy))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_both_gradients_match_atens_convolution(case, dtype):
    c, h, wd, k, stride, padding, dilation = case
    torch.manual_seed(1)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(3, c, h, wd, dtype=dtype)
    w = torch.randn(c, 1, kh, kw, dtype=dtype)
    out = F.conv2d(x, w, None, stride, padding, dilation, c)
    dy = torch.randn_like(out)
    reference = _grads(lambda x, w: F.conv2d(x, w, None, stride, padding, dilation, c), x, w, dy)
    fused = _grads(lambda x, w: depthwise_conv2d(x, w, stride, padding, dilation), x, w, dy)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype is torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for got, want in zip(fused, reference):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * want.abs().max().item())


@pytest.mark.parametrize("case", [CASES[3], CASES[7], CASES[8]])
def test_gradcheck(case):
    c, h, wd, k, stride, padding, dilation = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(2, c, h, wd, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, 1, kh, kw, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: depthwise_conv2d(x, w, stride, padding, dilation), (x, w))


def test_only_the_wanted_gradient_is_computed():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(3, 1, 5, 5)
    (dx,) = torch.autograd.grad(depthwise_conv2d(x, w, 1, 2, 1).sum(), x)
    assert dx.shape == x.shape
    w.requires_grad_()
    (dw,) = torch.autograd.grad(depthwise_conv2d(x.detach(), w, 1, 2, 1).sum(), w)
    assert dw.shape == w.shape


def test_which_convs_take_it():
    x = torch.randn(2, 4, 8, 8)
    dw5, dw3 = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 3, 3)
    assert uses_depthwise_backward(x, dw5, None, (2, 2), (1, 1), 4)
    assert uses_depthwise_backward(x, dw3, None, (2, 2), (2, 2), 4)  # dilated 3x3
    assert not uses_depthwise_backward(x, dw3, None, (1, 1), (1, 1), 4)  # ATen's fast 3x3 path
    assert not uses_depthwise_backward(x, dw5, torch.zeros(4), (2, 2), (1, 1), 4)  # a bias
    assert not uses_depthwise_backward(x, dw5, None, "same", (1, 1), 4)
    assert not uses_depthwise_backward(x, torch.randn(4, 4, 5, 5), None, (2, 2), (1, 1), 1)  # dense
    assert not uses_depthwise_backward(x, torch.randn(8, 1, 5, 5), None, (2, 2), (1, 1), 4)  # multiplier 2
    assert not uses_depthwise_backward(x.to("meta"), dw5.to("meta"), None, (2, 2), (1, 1), 4)


def test_the_fused_recompute_of_sep_and_dil_convs_takes_it():
    """The fused backend's backward differentiates the 5x5 and dilated
    depthwise convs of an edge with this Function (and gives the reference's
    gradients, which tests/test_fused_mixed_op.py checks for every op)."""
    from fastdarts.mixed_op import MixedOp

    torch.manual_seed(0)
    edge = MixedOp(4, 1, ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"], "fused")
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    weights = torch.softmax(torch.randn(4), 0)
    calls = []
    original = DepthwiseConv2dFunction.backward

    def counting(ctx, dy):
        calls.append(tuple(ctx.saved_tensors[1].shape[-2:]) + (ctx.dilation,))
        return original(ctx, dy)

    with mock.patch.object(DepthwiseConv2dFunction, "backward", staticmethod(counting)):
        edge(x, weights).sum().backward()
    # sep_conv_5x5: two 5x5 convs; dil_conv_3x3 and dil_conv_5x5: one dilated each;
    # sep_conv_3x3's undilated 3x3 convs keep ATen's backward.
    assert sorted(calls) == [(3, 3, (2, 2)), (5, 5, (1, 1)), (5, 5, (1, 1)), (5, 5, (2, 2))]


def test_weight_gradient_under_autocast_is_computed_in_fp32():
    """Under bf16 autocast the weight gradient is computed from the fp32
    input in fp32 and summed over the batch in fp32: closer to fp64 than
    ATen's backward, which works from the bf16 copy of x (measured here:
    0.0015 against 0.0071 of the largest entry; 0.0050 if the products and
    the sum ran in bf16, which this test refuses)."""
    torch.manual_seed(0)
    x = torch.randn(32, 16, 16, 16)
    w = torch.randn(16, 1, 5, 5) * 0.2

    def weight_grad(fn, x, w, autocast):
        w = w.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            y = fn(x, w)
        probe = torch.linspace(-1, 2, y.numel(), dtype=torch.float64).view_as(y)
        return torch.autograd.grad((y.double() * probe).sum(), w)[0].double()

    aten = lambda x, w: F.conv2d(x, w, None, 1, 2, 1, 16)  # noqa: E731
    ours = lambda x, w: depthwise_conv2d(x, w, 1, 2, 1)  # noqa: E731
    exact = weight_grad(aten, x.double(), w.double(), False)
    err = {name: ((weight_grad(fn, x, w, True) - exact).abs().max() / exact.abs().max()).item()
           for name, fn in (("aten", aten), ("ours", ours))}
    assert err["ours"] <= 0.5 * err["aten"], err


def test_no_double_backward():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(3, 1, 5, 5, requires_grad=True)
    y = depthwise_conv2d(x, w, 1, 2, 1)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
