"""The compiled 3x3 pools against ATen's (their *_ref twins)."""
import pytest
import torch

from fastdarts.errors import FastDartsError
from fastdarts.kernels.pool3x3 import pool3x3_backward_ref, pool3x3_ref

# Skipped without the extension, a failure under FASTDARTS_REQUIRE_CPP=1 (conftest's need_extension).
pytestmark = pytest.mark.usefixtures("need_extension")

SHAPES = [(2, 3, 8, 8), (3, 5, 7, 9), (1, 1, 1, 1), (2, 2, 2, 3), (1, 4, 1, 6)]


def _ops():
    return torch.ops.fastdarts.pool3x3, torch.ops.fastdarts.pool3x3_backward


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("is_max", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_pool_matches_aten_exactly(shape, stride, is_max, dtype):
    pool, pool_backward = _ops()
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    # Whole numbers in a small range: many ties inside windows, where the
    # backward must pick ATen's argmax (the first maximum in window order).
    if is_max:
        x = torch.randint(-2, 3, shape).to(dtype)
    y_ref = pool3x3_ref(x, stride, is_max)
    y = pool(x, stride, is_max)
    assert torch.equal(y, y_ref)
    dy = torch.randn(y.shape).to(dtype)
    dx, dx_ref = pool_backward(dy, x, stride, is_max), pool3x3_backward_ref(dy, x, stride, is_max)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(dx, dx_ref)
    else:
        # ATen adds the gradient shares in fp16/bf16; we add them in fp32 and
        # round once, so ours is at least as close to the exact sum.
        exact = pool3x3_backward_ref(dy.double(), x.double(), stride, is_max)
        assert (dx.double() - exact).abs().max() <= (dx_ref.double() - exact).abs().max() + 1e-12


@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_nan_follows_aten(stride):
    pool, pool_backward = _ops()
    x = torch.randn(1, 2, 6, 7)
    x[0, 0, 2, 3] = float("nan")
    x[0, 1, 4, 4] = float("nan")
    x[0, 1, 4, 5] = float("nan")
    y = pool(x, stride, True)
    torch.testing.assert_close(y, pool3x3_ref(x, stride, True), equal_nan=True)
    dy = torch.randn(y.shape)
    assert torch.equal(pool_backward(dy, x, stride, True), pool3x3_backward_ref(dy, x, stride, True))


def test_pool_on_non_contiguous_input():
    pool, pool_backward = _ops()
    x = torch.randn(2, 8, 9, 3).permute(0, 3, 1, 2)  # [2, 3, 8, 9], channels-last strides
    for is_max in (True, False):
        y = pool(x, 1, is_max)
        assert torch.equal(y, pool3x3_ref(x.contiguous(), 1, is_max))
        dy = torch.randn(9, 2, 3, 8).permute(1, 2, 3, 0)
        assert torch.equal(pool_backward(dy, x, 1, is_max), pool3x3_backward_ref(dy.contiguous(), x, 1, is_max))


@pytest.mark.parametrize("is_max", [True, False])
def test_pool_opcheck_and_gradcheck(is_max):
    pool, _ = _ops()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    for stride in (1, 2):
        torch.library.opcheck(pool, (x, stride, is_max))
        torch.library.opcheck(torch.ops.fastdarts.pool3x3_backward,
                              (torch.randn_like(pool(x, stride, is_max)), x.detach(), stride, is_max))
        # Random input has no ties, where max pool is not differentiable.
        assert torch.autograd.gradcheck(lambda t: pool(t, stride, is_max), (x,))


def test_pool_bad_input_names_the_argument():
    pool, pool_backward = _ops()
    with pytest.raises(RuntimeError, match="x must be \\[N, C, H, W\\]"):
        pool(torch.randn(3, 4, 5), 1, True)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        pool(torch.randn(1, 1, 4, 4), 3, True)
    with pytest.raises(RuntimeError, match="dy must have the pooled shape"):
        pool_backward(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 4, 4), 1, True)
    with pytest.raises(RuntimeError, match="dy has dtype"):
        pool_backward(torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.randn(1, 1, 4, 4), 1, True)
    with pytest.raises(FastDartsError, match="stride must be 1 or 2"):
        pool3x3_ref(torch.randn(1, 1, 4, 4), 3, False)
