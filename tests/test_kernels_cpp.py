"""The compiled ops torch.ops.fastdarts.bn_accumulate{,_backward} (csrc/) against
their plain-PyTorch twins in fastdarts/kernels/bn_accumulate.py: CPU kernels
always, CUDA kernels when there is a GPU.

Skipped when the extension is not built (``pip install --no-build-isolation -e .``
builds it), unless FASTDARTS_REQUIRE_CPP=1 (CI), which makes that a failure.
"""
import pytest
import torch

from fastdarts.kernels import extension
from fastdarts.kernels.bn_accumulate import accumulator_dtype, bn_accumulate_backward_ref, bn_accumulate_ref

EPS = 1e-5


# Skipped without the extension, a failure under FASTDARTS_REQUIRE_CPP=1 (conftest's need_extension).
pytestmark = pytest.mark.usefixtures("need_extension")


def ops():
    return torch.ops.fastdarts.bn_accumulate, torch.ops.fastdarts.bn_accumulate_backward


def stats(z):
    """z's batch mean and 1/sqrt(biased var + eps), in the accumulator dtype, as constants."""
    with torch.no_grad():
        zf = z.to(accumulator_dtype(z.dtype))
        dims = [0] + list(range(2, z.dim()))
        return zf.mean(dims), (zf.var(dims, unbiased=False) + EPS).rsqrt()


def make_inputs(shape, dtype, device="cpu", weight=0.7):
    acc_dtype = accumulator_dtype(dtype)
    z = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).to(device=device, dtype=dtype)
    acc = torch.randn(shape, dtype=acc_dtype, device=device)
    dy = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    w = torch.tensor([weight], dtype=acc_dtype, device=device)
    return acc, z, dy, *stats(z), w


def sum_scale(dy, z, mean, invstd):
    """Σ|dy·x̂|: the scale a sum's rounding error is relative to."""
    shape = (1, -1) + (1,) * (z.dim() - 2)
    xhat = (z.double() - mean.double().view(shape)) * invstd.double().view(shape)
    return (dy.double() * xhat).abs().sum().item()


SHAPES = [(3, 5, 7, 9), (1, 1, 1, 1), (2, 16, 32, 32), (4, 6, 10), (2, 3, 4, 5, 6), (8, 3, 1, 1)]
TIGHT = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_ref(shape, dtype):
    acc, z, _, mean, invstd, w = make_inputs(shape, dtype)
    out = ops()[0](acc, z, mean, invstd, w)
    assert out.dtype == acc.dtype and out.is_contiguous()
    torch.testing.assert_close(out, bn_accumulate_ref(acc, z, mean, invstd, w), **TIGHT[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_ref(shape, dtype):
    _, z, dy, mean, invstd, w = make_inputs(shape, dtype)
    dz, dweight = ops()[1](dy, z, mean, invstd, w, True)
    ref_dz, ref_dweight = bn_accumulate_backward_ref(dy, z, mean, invstd, w)
    assert dz.dtype == z.dtype and dz.shape == z.shape and dz.is_contiguous()
    assert dweight.dtype == mean.dtype and dweight.dim() == 0
    # dz subtracts per-channel means: the cancellation costs a few ulps on small elements.
    tol = TIGHT[dtype]
    torch.testing.assert_close(dz, ref_dz, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    assert abs(dweight.item() - ref_dweight.item()) <= tol["rtol"] * sum_scale(dy, z, mean, invstd) + tol["atol"]


def test_fp32_sums_are_accurate_for_large_m():
    """The CPU kernel sums in double: fp32 dweight within ~1e-6 of the exact value
    even with 2^18 elements per channel."""
    _, z, dy, mean, invstd, w = make_inputs((64, 2, 64, 64), torch.float32)
    _, dweight = ops()[1](dy, z, mean, invstd, w, False)
    exact = bn_accumulate_backward_ref(dy.double(), z.double(), mean.double(), invstd.double(), w.double())[1]
    assert abs(dweight.item() - exact.item()) <= 1e-6 * sum_scale(dy, z, mean, invstd)


def test_noncontiguous_inputs():
    base_z = torch.randn(3, 9, 8, 4) * 2
    z = base_z.transpose(2, 3)[:, ::2]              # [3, 5, 4, 8], strided
    acc = torch.randn(5, 3, 8, 4).permute(1, 0, 3, 2)  # [3, 5, 4, 8], permuted
    dy = torch.randn(3, 5, 4, 16)[..., ::2]
    mean_full, invstd_full = stats(torch.cat([z, z], 1))
    mean, invstd = mean_full[::2], invstd_full[::2]  # stride-2 vectors of length 5
    w = torch.full((2, 2), 0.3)[:1, 1]               # one element, not contiguous storage start
    assert not any(t.is_contiguous() for t in (z, acc, dy, mean, invstd))
    out = ops()[0](acc, z, mean, invstd, w)
    torch.testing.assert_close(out, bn_accumulate_ref(acc, z, mean, invstd, w), **TIGHT[torch.float32])
    dz, dweight = ops()[1](dy, z, mean, invstd, w, True)
    ref_dz, ref_dweight = bn_accumulate_backward_ref(dy, z, mean, invstd, w)
    torch.testing.assert_close(dz, ref_dz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dweight, ref_dweight, rtol=1e-5, atol=1e-5)


LOW_PRECISION_TOL = {torch.float16: dict(rtol=5e-3, atol=1e-2), torch.bfloat16: dict(rtol=1e-2, atol=5e-2)}


def _exact(acc, z, dy, mean, invstd, w):
    """The twins in fp64 on the same (rounded) inputs: the ground truth."""
    d = [t.double() for t in (acc, z, dy, mean, invstd, w)]
    acc, z, dy, mean, invstd, w = d
    return bn_accumulate_ref(acc, z, mean, invstd, w), *bn_accumulate_backward_ref(dy, z, mean, invstd, w)


def _check_low_precision(out, dz, dweight, acc, z, dy, mean, invstd, w):
    ref_out = bn_accumulate_ref(acc, z, mean, invstd, w)
    ref_dz, ref_dweight = bn_accumulate_backward_ref(dy, z, mean, invstd, w)
    exact_out, exact_dz, exact_dweight = _exact(acc, z, dy, mean, invstd, w)
    tol = LOW_PRECISION_TOL[z.dtype]
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(dz, ref_dz, **tol)
    scale = sum_scale(dy, z, mean, invstd)
    assert abs(dweight.item() - ref_dweight.item()) <= tol["rtol"] * scale
    # Flash-attention criterion: no more than ~2x the error the reference makes in the same dtype.
    for got, ref, exact, atol in ((out, ref_out, exact_out, 1e-5), (dz, ref_dz, exact_dz, 1e-5),
                                  (dweight, ref_dweight, exact_dweight, 1e-6 * scale)):
        err = (got.double() - exact).abs().max().item()
        ref_err = (ref.double() - exact).abs().max().item()
        assert err <= 2 * ref_err + atol, (err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 16, 32, 32), (4, 6, 10), (1, 1, 1, 1)], ids=str)
def test_low_precision(shape, dtype):
    acc, z, dy, mean, invstd, w = make_inputs(shape, dtype)
    out = ops()[0](acc, z, mean, invstd, w)
    dz, dweight = ops()[1](dy, z, mean, invstd, w, True)
    assert out.dtype == torch.float32 and dz.dtype == dtype and dweight.dtype == torch.float32
    _check_low_precision(out, dz, dweight, acc, z, dy, mean, invstd, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_compute_dz_false(dtype):
    _, z, dy, mean, invstd, w = make_inputs((2, 4, 5, 5), dtype)
    dz, dweight = ops()[1](dy, z, mean, invstd, w, False)
    assert dz.numel() == 0 and dz.dtype == dtype
    assert torch.equal(dweight, ops()[1](dy, z, mean, invstd, w, True)[1])


def test_empty_batch():
    acc, z, dy = torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4)
    mean, invstd, w = torch.zeros(3), torch.ones(3), torch.ones(1)
    assert ops()[0](acc, z, mean, invstd, w).shape == z.shape
    dz, dweight = ops()[1](dy, z, mean, invstd, w, True)
    assert dz.shape == z.shape and dweight.item() == 0


def test_backward_is_deterministic():
    _, z, dy, mean, invstd, w = make_inputs((16, 8, 33, 17), torch.float32)
    first = ops()[1](dy, z, mean, invstd, w, True)
    for _ in range(3):
        again = ops()[1](dy, z, mean, invstd, w, True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_opcheck():
    acc, z, dy, mean, invstd, w = make_inputs((2, 3, 4, 5), torch.float32)
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) for t in (acc, z)] + [mean, invstd,
                                                                            w.clone().requires_grad_(requires_grad)]
        torch.library.opcheck(torch.ops.fastdarts.bn_accumulate.default, tuple(args))
    half = make_inputs((3, 2, 5), torch.float16)
    torch.library.opcheck(torch.ops.fastdarts.bn_accumulate.default, (half[0], half[1], *half[3:]))
    for compute_dz in (True, False):
        torch.library.opcheck(torch.ops.fastdarts.bn_accumulate_backward.default,
                              (dy, z, mean, invstd, w, compute_dz))


def _bn_accumulate_with_batch_stats(acc, z, w):
    # Stats are recomputed from z on every call, so the numeric derivative sees the
    # full BN derivative that the autograd formula implements.
    return torch.ops.fastdarts.bn_accumulate(acc, z, *stats(z), w)


def test_gradcheck():
    acc, z, _, _, _, w = make_inputs((3, 4, 3, 2), torch.float64)
    inputs = tuple(t.requires_grad_() for t in (acc, z, w))
    assert torch.autograd.gradcheck(_bn_accumulate_with_batch_stats, inputs)


def test_autograd_matches_ref_and_skips_unneeded_work():
    acc, z, _, _, _, w = make_inputs((4, 3, 6, 6), torch.float32)
    for needs in ((True, True, True), (False, False, True), (False, True, False), (True, False, False)):
        leaves = [t.clone().requires_grad_(n) for t, n in zip((acc, z, w), needs)]
        ref_leaves = [t.clone().requires_grad_(n) for t, n in zip((acc, z, w), needs)]
        grad = torch.randn(z.shape)
        out = torch.ops.fastdarts.bn_accumulate(leaves[0], leaves[1], *stats(z), leaves[2])
        # The reference with the statistics inside the graph: the full BN derivative.
        zr = ref_leaves[1]
        mean = zr.mean((0, 2, 3))
        invstd = (zr.var((0, 2, 3), unbiased=False) + EPS).rsqrt()
        ref_out = bn_accumulate_ref(ref_leaves[0], zr, mean, invstd, ref_leaves[2])
        out.backward(grad)
        ref_out.backward(grad)
        for leaf, ref_leaf in zip(leaves, ref_leaves):
            if leaf.requires_grad:
                assert leaf.grad.shape == leaf.shape
                torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-4, atol=1e-5)
            else:
                assert leaf.grad is None


def _bad(change):
    acc, z, dy, mean, invstd, w = make_inputs((2, 3, 4, 4), torch.float32)
    args = dict(acc=acc, z=z, dy=dy, mean=mean, invstd=invstd, weight=w)
    args.update(change(args))
    return args


BAD_INPUTS = {
    "z_1d": (lambda a: dict(z=torch.randn(5)), "z"),
    "z_int": (lambda a: dict(z=a["z"].long()), "z"),
    "mean_shape": (lambda a: dict(mean=torch.zeros(4)), "mean"),
    "invstd_2d": (lambda a: dict(invstd=torch.ones(3, 1)), "invstd"),
    "weight_two": (lambda a: dict(weight=torch.ones(2)), "weight"),
    "mean_dtype": (lambda a: dict(mean=a["mean"].double()), "mean"),
    "weight_dtype": (lambda a: dict(weight=a["weight"].half()), "weight"),
    "acc_shape": (lambda a: dict(acc=torch.zeros(2, 3, 4, 5)), "acc"),
    "acc_dtype": (lambda a: dict(acc=a["acc"].double()), "acc"),
    "dy_shape": (lambda a: dict(dy=torch.zeros(2, 3, 4)), "dy"),
    "dy_dtype": (lambda a: dict(dy=a["dy"].half()), "dy"),
    "fp16_acc": (lambda a: dict(z=a["z"].half(), acc=a["acc"].half()), "acc"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_inputs_name_the_argument(case):
    change, name = BAD_INPUTS[case]
    a = _bad(change)
    forward, backward = ops()
    if not name == "dy":
        with pytest.raises(RuntimeError, match=rf"bn_accumulate: {name}\b"):
            forward(a["acc"], a["z"], a["mean"], a["invstd"], a["weight"])
    if not name == "acc":
        with pytest.raises(RuntimeError, match=rf"bn_accumulate_backward: {name}\b"):
            backward(a["dy"], a["z"], a["mean"], a["invstd"], a["weight"], True)


def test_device_mix_names_the_argument():
    # Without a GPU: call the CPU kernel directly with one argument elsewhere (the
    # dispatcher itself would pick the meta kernel for a CPU/meta mix).
    acc, z, dy, mean, invstd, w = make_inputs((2, 3, 4, 4), torch.float32)
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"bn_accumulate: weight is on meta but z is on cpu"):
        torch.ops.fastdarts.bn_accumulate.default.redispatch(cpu, acc, z, mean, invstd, w.to("meta"))
    with pytest.raises(RuntimeError, match=r"bn_accumulate_backward: dy is on meta"):
        torch.ops.fastdarts.bn_accumulate_backward.default.redispatch(cpu, dy.to("meta"), z, mean, invstd, w, True)


# --- CUDA -------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and extension.HAS_CUDA_KERNELS),
                                reason="needs a GPU and the extension built with CUDA kernels")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (1, 1, 1, 1), (2, 16, 32, 32), (4, 6, 10), (2, 3, 4, 5, 6),
                                   (64, 4, 64, 64), (8, 1500, 3, 3)], ids=str)
def test_cuda_matches_ref(shape, dtype):
    acc, z, dy, mean, invstd, w = make_inputs(shape, dtype, device="cuda")
    out = ops()[0](acc, z, mean, invstd, w)
    dz, dweight = ops()[1](dy, z, mean, invstd, w, True)
    assert out.is_cuda and dz.is_cuda and dweight.is_cuda
    # Bit-identical on a rerun: the reductions have a fixed order.
    again_dz, again_dweight = ops()[1](dy, z, mean, invstd, w, True)
    assert torch.equal(dz, again_dz) and torch.equal(dweight, again_dweight)
    assert ops()[1](dy, z, mean, invstd, w, False)[0].numel() == 0
    if dtype in LOW_PRECISION_TOL:
        _check_low_precision(out, dz, dweight, acc, z, dy, mean, invstd, w)
        return
    # float32 accumulation on the GPU (the CPU kernel sums in double): a looser sum tolerance.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, bn_accumulate_ref(acc, z, mean, invstd, w), **tol)
    ref_dz, ref_dweight = bn_accumulate_backward_ref(dy, z, mean, invstd, w)
    torch.testing.assert_close(dz, ref_dz, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    assert abs(dweight.item() - ref_dweight.item()) <= tol["rtol"] * sum_scale(dy, z, mean, invstd)


@needs_cuda
def test_cuda_noncontiguous_and_device_mix():
    acc, z, dy, mean, invstd, w = make_inputs((4, 6, 8, 8), torch.float32, device="cuda")
    zt, acct, dyt = z.transpose(2, 3), acc.transpose(2, 3), dy.transpose(2, 3)
    torch.testing.assert_close(ops()[0](acct, zt, mean, invstd, w), bn_accumulate_ref(acct, zt, mean, invstd, w),
                               rtol=1e-5, atol=1e-5)
    dz, dweight = ops()[1](dyt, zt, mean, invstd, w, True)
    ref_dz, ref_dweight = bn_accumulate_backward_ref(dyt, zt, mean, invstd, w)
    torch.testing.assert_close(dz, ref_dz, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dweight, ref_dweight, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"bn_accumulate: weight is on cpu but z is on cuda"):
        ops()[0](acc, z, mean, invstd, w.cpu())


@needs_cuda
def test_cuda_gradcheck():
    acc, z, _, _, _, w = make_inputs((3, 4, 3, 2), torch.float64, device="cuda")
    inputs = tuple(t.requires_grad_() for t in (acc, z, w))
    assert torch.autograd.gradcheck(_bn_accumulate_with_batch_stats, inputs)
