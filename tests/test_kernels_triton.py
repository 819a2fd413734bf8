"""The Triton kernels of bn_accumulate against their plain-PyTorch twins.

Without a GPU the kernels run under Triton's interpreter (conftest sets
TRITON_INTERPRET=1), which is slow: shapes stay small.
"""
import os

import pytest
import torch

pytest.importorskip("triton")

from fastdarts.errors import FastDartsError  # noqa: E402
from fastdarts.kernels import triton_bn_accumulate as tbn  # noqa: E402
from fastdarts.kernels.bn_accumulate import (  # noqa: E402
    accumulator_dtype,
    bn_accumulate_backward_ref,
    bn_accumulate_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter has no bf16; on a GPU it is tested like fp16.
DTYPES = [torch.float32, torch.float64, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCES = {  # (rtol, atol) against the ref in the same dtype
    torch.float32: (1e-6, 1e-6),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (5e-2, 2e-2),
}
SHAPES = [(3, 5, 7, 9), (1, 1, 1, 1), (2, 4, 16, 16), (2, 3, 10), (2, 3, 2, 3, 4)]

pytestmark = pytest.mark.skipif(not tbn.HAS_TRITON, reason=f"triton unusable: {tbn.TRITON_ERROR}")


def batch_stats(z, eps=1e-5):
    """BatchNorm's batch mean and 1/sqrt(biased var + eps), in the accumulator dtype."""
    with torch.no_grad():
        zf = z.to(accumulator_dtype(z.dtype))
        dims = [0] + list(range(2, z.dim()))
        return zf.mean(dims), (zf.var(dims, unbiased=False) + eps).rsqrt()


def make_inputs(shape, dtype, weight_shape=(1,)):
    acc_dtype = accumulator_dtype(dtype)
    z = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(device=DEVICE, dtype=dtype)
    acc = torch.randn(shape, dtype=acc_dtype, device=DEVICE)
    dy = torch.randn(shape, dtype=dtype, device=DEVICE)
    mean, invstd = batch_stats(z)
    weight = torch.full(weight_shape, 0.7, dtype=acc_dtype, device=DEVICE)
    return acc, z, dy, mean, invstd, weight


def as_float64(*tensors):
    return [t.to(torch.float64) for t in tensors]


def assert_close(actual, expected, dtype, scale=1.0):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def test_runs_on_gpu_or_under_interpreter():
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    acc, z, dy, mean, invstd, weight = make_inputs(shape, dtype)
    out = tbn.bn_accumulate_triton(acc, z, mean, invstd, weight)
    assert out.dtype == acc.dtype and out.shape == z.shape
    assert_close(out, bn_accumulate_ref(acc, z, mean, invstd, weight), dtype)

    dz, dweight = tbn.bn_accumulate_backward_triton(dy, z, mean, invstd, weight, True)
    dz_ref, dweight_ref = bn_accumulate_backward_ref(dy, z, mean, invstd, weight, True)
    assert dz.dtype == z.dtype and dz.shape == z.shape
    assert dweight.dtype == dweight_ref.dtype and dweight.shape == ()
    assert_close(dz, dz_ref, dtype)
    # dweight sums M·C terms of size ~1: its absolute error grows with the count.
    assert_close(dweight, dweight_ref, dtype, scale=z.numel() ** 0.5)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d in (torch.float16, torch.bfloat16)], ids=str)
def test_low_precision_error_at_most_twice_the_reference_error(dtype):
    """The flash-attention criterion: against an fp64 ground truth, the
    kernel's error is at most twice that of the PyTorch ref in the same dtype."""
    acc, z, dy, mean, invstd, weight = make_inputs((3, 5, 7, 9), dtype)
    truth_out = bn_accumulate_ref(*as_float64(acc, z, mean, invstd, weight))
    truth_dz, truth_dweight = bn_accumulate_backward_ref(*as_float64(dy, z, mean, invstd, weight), True)
    ref_out = bn_accumulate_ref(acc, z, mean, invstd, weight)
    ref_dz, ref_dweight = bn_accumulate_backward_ref(dy, z, mean, invstd, weight, True)
    out = tbn.bn_accumulate_triton(acc, z, mean, invstd, weight)
    dz, dweight = tbn.bn_accumulate_backward_triton(dy, z, mean, invstd, weight, True)

    for name, kernel, ref, truth in (("out", out, ref_out, truth_out), ("dz", dz, ref_dz, truth_dz),
                                     ("dweight", dweight, ref_dweight, truth_dweight)):
        kernel_error = (kernel.double() - truth).abs().max().item()
        ref_error = (ref.double() - truth).abs().max().item()
        atol = 1e-5 * (1 + truth.abs().max().item())
        assert kernel_error <= 2 * ref_error + atol, f"{name}: kernel {kernel_error:.3g} vs ref {ref_error:.3g}"


def test_non_contiguous_inputs():
    N, C, H, W = 2, 3, 5, 6
    z = (torch.randn(N, C, W, H, device=DEVICE) * 3 - 1).transpose(2, 3)
    acc = torch.randn(N, C, H, 2 * W, device=DEVICE)[..., ::2]
    dy = torch.randn(C, N, H, W, device=DEVICE).permute(1, 0, 2, 3)
    mean, invstd = batch_stats(z)
    mean = torch.stack([mean, torch.zeros_like(mean)], 1)[:, 0]
    invstd = torch.stack([invstd, torch.zeros_like(invstd)], 1)[:, 0]
    weight = torch.full((2,), -1.3, device=DEVICE)[:1]
    assert not any(t.is_contiguous() for t in (z, acc, dy, mean, invstd))

    assert_close(tbn.bn_accumulate_triton(acc, z, mean, invstd, weight),
                 bn_accumulate_ref(acc, z, mean, invstd, weight), torch.float32)
    dz, dweight = tbn.bn_accumulate_backward_triton(dy, z, mean, invstd, weight, True)
    dz_ref, dweight_ref = bn_accumulate_backward_ref(dy, z, mean, invstd, weight, True)
    assert_close(dz, dz_ref, torch.float32)
    assert_close(dweight, dweight_ref, torch.float32, scale=z.numel() ** 0.5)


def test_many_blocks_and_partials(monkeypatch):
    """Small blocks make a tiny tensor exercise what large ones do on a GPU:
    several elementwise programs, several partials per channel, several blocks
    per partial and a masked tail."""
    monkeypatch.setattr(tbn, "ELEMENTWISE_BLOCK", 64)
    monkeypatch.setattr(tbn, "REDUCE_BLOCK", 16)
    monkeypatch.setattr(tbn, "MAX_PARTIALS_PER_CHANNEL", 3)
    acc, z, dy, mean, invstd, weight = make_inputs((3, 5, 7, 9), torch.float64)  # M = 189 per channel
    assert_close(tbn.bn_accumulate_triton(acc, z, mean, invstd, weight),
                 bn_accumulate_ref(acc, z, mean, invstd, weight), torch.float64)
    dz, dweight = tbn.bn_accumulate_backward_triton(dy, z, mean, invstd, weight, True)
    dz_ref, dweight_ref = bn_accumulate_backward_ref(dy, z, mean, invstd, weight, True)
    assert_close(dz, dz_ref, torch.float64)
    assert_close(dweight, dweight_ref, torch.float64, scale=z.numel() ** 0.5)


@pytest.mark.parametrize("weight_shape", [(1,), ()], ids=str)
def test_without_dz_only_the_weight_gradient(weight_shape):
    acc, z, dy, mean, invstd, weight = make_inputs((2, 3, 4, 5), torch.float32, weight_shape)
    dz, dweight = tbn.bn_accumulate_backward_triton(dy, z, mean, invstd, weight, False)
    _, dweight_ref = bn_accumulate_backward_ref(dy, z, mean, invstd, weight, False)
    assert dz.numel() == 0
    assert_close(dweight, dweight_ref, torch.float32, scale=z.numel() ** 0.5)


def test_ops_match_launchers():
    acc, z, dy, mean, invstd, weight = make_inputs((2, 3, 4, 5), torch.float32)
    assert torch.equal(torch.ops.fastdarts_triton.bn_accumulate(acc, z, mean, invstd, weight),
                       tbn.bn_accumulate_triton(acc, z, mean, invstd, weight))
    for got, want in zip(torch.ops.fastdarts_triton.bn_accumulate_backward(dy, z, mean, invstd, weight, True),
                         tbn.bn_accumulate_backward_triton(dy, z, mean, invstd, weight, True)):
        assert torch.equal(got, want)


def _opcheck_samples():
    for shape, dtype in (((2, 3, 4, 5), torch.float32), ((2, 3, 7), torch.float64)):
        acc, z, dy, mean, invstd, weight = make_inputs(shape, dtype)
        yield acc, z, dy, mean, invstd, weight


def test_opcheck_bn_accumulate():
    for acc, z, _, mean, invstd, weight in _opcheck_samples():
        torch.library.opcheck(torch.ops.fastdarts_triton.bn_accumulate, (acc, z, mean, invstd, weight))
        grad_args = (acc.requires_grad_(), z.requires_grad_(), mean, invstd, weight.requires_grad_())
        torch.library.opcheck(torch.ops.fastdarts_triton.bn_accumulate, grad_args)


def test_opcheck_bn_accumulate_backward():
    for _, z, dy, mean, invstd, weight in _opcheck_samples():
        for compute_dz in (True, False):
            torch.library.opcheck(torch.ops.fastdarts_triton.bn_accumulate_backward,
                                  (dy, z, mean, invstd, weight, compute_dz))


def test_gradcheck_is_the_full_batchnorm_derivative():
    # The statistics are recomputed from z (without autograd) at every
    # evaluation, so the numeric derivative includes their dependence on z,
    # which the autograd formula folds into s1 and s2.
    def f(acc, z, weight):
        return torch.ops.fastdarts_triton.bn_accumulate(acc, z, *batch_stats(z), weight)

    acc, z, _, _, _, weight = make_inputs((2, 3, 4), torch.float64)
    torch.autograd.gradcheck(f, (acc.requires_grad_(), z.requires_grad_(), weight.requires_grad_()))


def test_autograd_honours_needs_input_grad():
    acc, z, _, mean, invstd, weight = make_inputs((2, 3, 4), torch.float64)
    weight.requires_grad_()
    torch.ops.fastdarts_triton.bn_accumulate(acc, z, mean, invstd, weight).sum().backward()
    assert acc.grad is None and z.grad is None and weight.grad.shape == weight.shape


@pytest.mark.parametrize("case, argument", [
    ("acc shape", "acc"),
    ("acc dtype", "acc"),
    ("dy shape", "dy"),
    ("mean length", "mean"),
    ("invstd dtype", "invstd"),
    ("weight size", "weight"),
])
def test_bad_input_names_the_argument(case, argument):
    acc, z, dy, mean, invstd, weight = make_inputs((2, 3, 4), torch.float32)
    if case == "acc shape":
        acc = acc[:1]
    elif case == "acc dtype":
        acc = acc.half()
    elif case == "dy shape":
        dy = dy[:, :2]
    elif case == "mean length":
        mean = mean[:2]
    elif case == "invstd dtype":
        invstd = invstd.double()
    elif case == "weight size":
        weight = torch.ones(2, device=DEVICE)
    with pytest.raises(FastDartsError, match=argument):
        if argument == "dy":
            tbn.bn_accumulate_backward_triton(dy, z, mean, invstd, weight, True)
        else:
            tbn.bn_accumulate_triton(acc, z, mean, invstd, weight)
    with pytest.raises(FastDartsError, match=argument):
        if argument == "dy":
            torch.ops.fastdarts_triton.bn_accumulate_backward(dy, z, mean, invstd, weight, True)
        else:
            torch.ops.fastdarts_triton.bn_accumulate(acc, z, mean, invstd, weight)
