"""Kernel micro-benchmarks: each kernel implementation against its plain-PyTorch
twin (``*_ref``) on the feature maps of the paper's search setting.

    pip install -e '.[bench]'
    pytest benchmarks --benchmark-only
    pytest benchmarks --benchmark-only --benchmark-min-rounds=3 --benchmark-max-time=0.2   # quick
    pytest benchmarks --benchmark-only --benchmark-json=kernels.json

Not part of the test command (``testpaths = ["tests"]``). One report group
per op, device and shape, so each kernel sits next to its ``ref``; the end
of the run prints each kernel's median as a multiple of its ``ref``'s.

Implementations: ``ref`` (the ``*_ref`` functions) and ``cpp`` (the compiled
extension's CPU kernels, when it is built) on the CPU; with a GPU also
``ref``, ``cuda`` (the extension's CUDA kernels) and ``triton`` on it. Triton
is never benchmarked without a GPU: its interpreter is far too slow to say
anything about the kernels. The 3x3 pools have compiled kernels for the CPU
only, so they are benchmarked there alone.

Shapes, from the search setting (batch 64, 32x32 CIFAR images, C=16, 8 cells,
reductions at cells 2 and 5): every edge of a normal cell, and every mixed
op's output, is [64, 16, 32, 32], [64, 32, 16, 16] or [64, 64, 8, 8]; the
stride-2 edges of the reduction cells take [64, 32, 32, 32] and
[64, 64, 16, 16] to half the size. fp32, as the search runs.

The depthwise convolutions' backward (``fastdarts/depthwise_conv.py``, two
forward convolutions) against ATen's ``convolution_backward`` (``ref``),
for the depthwise convs of the op set: sep_conv's 3x3 and 5x5, dil_conv's
3x3 and 5x5 with dilation 2, at stride 1 and 2. The fused backend takes the
formulas for all but the undilated 3x3 (CPU only).
"""
import pytest

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (the 'bench' extra)")

import torch  # noqa: E402

from fastdarts.depthwise_conv import depthwise_conv2d_backward  # noqa: E402
from fastdarts.kernels import extension, triton_bn_accumulate  # noqa: E402
from fastdarts.kernels.bn_accumulate import bn_accumulate_backward_ref, bn_accumulate_ref  # noqa: E402
from fastdarts.kernels.pool3x3 import pool3x3_backward_ref, pool3x3_ref  # noqa: E402

EPS = 1e-5
EDGE_SHAPES = [(64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8)]
REDUCTION_INPUT_SHAPES = [(64, 32, 32, 32), (64, 64, 16, 16)]  # stride-2 edges: inputs, output at half size
POOL_CASES = [(1, s) for s in EDGE_SHAPES] + [(2, s) for s in REDUCTION_INPUT_SHAPES]

HAS_CUDA = torch.cuda.is_available()
BN_IMPLS = [("cpu", "ref"), ("cpu", "cpp")] + ([("cuda", "ref"), ("cuda", "cuda"), ("cuda", "triton")]
                                               if HAS_CUDA else [])
POOL_IMPLS = [("cpu", "ref"), ("cpu", "cpp")]


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


def _impl_id(impl) -> str:
    return "-".join(impl)


def _skip_unless_built(impl: str) -> None:
    if impl in ("cpp", "cuda") and not extension.HAS_EXTENSION:
        pytest.skip(f"fastdarts._C is not built ({extension.EXTENSION_ERROR})")
    if impl == "cuda" and not extension.HAS_CUDA_KERNELS:
        pytest.skip("fastdarts._C was built without CUDA kernels")
    if impl == "triton":
        if not triton_bn_accumulate.HAS_TRITON:
            pytest.skip(f"triton is not importable ({triton_bn_accumulate.TRITON_ERROR})")
        if triton_bn_accumulate.INTERPRETED:
            pytest.skip("TRITON_INTERPRET=1: the interpreter's times say nothing about the kernels")


def _bn_ops(impl: str):
    if impl == "ref":
        return bn_accumulate_ref, bn_accumulate_backward_ref
    if impl == "triton":
        return torch.ops.fastdarts_triton.bn_accumulate, torch.ops.fastdarts_triton.bn_accumulate_backward
    # cpp and cuda: the same dispatcher ops, the tensors' device picks the kernel
    return torch.ops.fastdarts.bn_accumulate, torch.ops.fastdarts.bn_accumulate_backward


def _pool_ops(impl: str):
    if impl == "ref":
        return pool3x3_ref, pool3x3_backward_ref
    if not extension.HAS_POOL_KERNELS:
        pytest.skip("fastdarts._C was built without the pool kernels")
    return torch.ops.fastdarts.pool3x3, torch.ops.fastdarts.pool3x3_backward


def _bn_inputs(shape, device):
    torch.manual_seed(0)
    z = torch.randn(shape, device=device) * 1.5 + 0.3
    dims = [0] + list(range(2, z.dim()))
    mean, invstd = z.mean(dims), (z.var(dims, unbiased=False) + EPS).rsqrt()
    acc = torch.randn(shape, device=device)
    dy = torch.randn(shape, device=device)
    weight = torch.tensor([0.7], device=device)
    return acc, z, dy, mean, invstd, weight


def _run(benchmark, group: str, device: str, impl: str, fn, kernel_medians) -> None:
    """Benchmark ``fn`` (warmed up once: Triton compiles on its first call),
    synchronising CUDA inside the timed callable."""
    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    timed()
    benchmark.group = group
    benchmark.extra_info.update(device=device, impl=impl, threads=torch.get_num_threads())
    benchmark(timed)
    if benchmark.stats is not None:  # None under --benchmark-disable
        kernel_medians[group][impl] = benchmark.stats.stats.median


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("device,impl", BN_IMPLS, ids=[_impl_id(i) for i in BN_IMPLS])
def test_bn_accumulate(benchmark, kernel_medians, device, impl, shape):
    _skip_unless_built(impl)
    forward, _ = _bn_ops(impl)
    acc, z, _, mean, invstd, weight = _bn_inputs(shape, device)
    _run(benchmark, f"bn_accumulate {device} {_shape_id(shape)}", device, impl,
         lambda: forward(acc, z, mean, invstd, weight), kernel_medians)


@pytest.mark.parametrize("compute_dz", [True, False], ids=["dz", "no_dz"])
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("device,impl", BN_IMPLS, ids=[_impl_id(i) for i in BN_IMPLS])
def test_bn_accumulate_backward(benchmark, kernel_medians, device, impl, shape, compute_dz):
    _skip_unless_built(impl)
    _, backward = _bn_ops(impl)
    _, z, dy, mean, invstd, weight = _bn_inputs(shape, device)
    _run(benchmark, f"bn_accumulate_backward(compute_dz={compute_dz}) {device} {_shape_id(shape)}", device, impl,
         lambda: backward(dy, z, mean, invstd, weight, compute_dz), kernel_medians)


@pytest.mark.parametrize("is_max", [True, False], ids=["max", "avg"])
@pytest.mark.parametrize("stride,shape", POOL_CASES, ids=[f"s{s}-{_shape_id(x)}" for s, x in POOL_CASES])
@pytest.mark.parametrize("device,impl", POOL_IMPLS, ids=[_impl_id(i) for i in POOL_IMPLS])
def test_pool3x3(benchmark, kernel_medians, device, impl, stride, shape, is_max):
    _skip_unless_built(impl)
    forward, _ = _pool_ops(impl)
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    kind = "max" if is_max else "avg"
    _run(benchmark, f"pool3x3 {kind} stride {stride} {device} {_shape_id(shape)}", device, impl,
         lambda: forward(x, stride, is_max), kernel_medians)


@pytest.mark.parametrize("is_max", [True, False], ids=["max", "avg"])
@pytest.mark.parametrize("stride,shape", POOL_CASES, ids=[f"s{s}-{_shape_id(x)}" for s, x in POOL_CASES])
@pytest.mark.parametrize("device,impl", POOL_IMPLS, ids=[_impl_id(i) for i in POOL_IMPLS])
def test_pool3x3_backward(benchmark, kernel_medians, device, impl, stride, shape, is_max):
    """``ref`` is ATen's forward (with indices, for max) and backward through
    autograd: what a backward without stored indices has to beat."""
    _skip_unless_built(impl)
    _, backward = _pool_ops(impl)
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    dy = torch.randn(pool3x3_ref(x, stride, is_max).shape, device=device)
    kind = "max" if is_max else "avg"
    _run(benchmark, f"pool3x3_backward {kind} stride {stride} {device} {_shape_id(shape)}", device, impl,
         lambda: backward(dy, x, stride, is_max), kernel_medians)


# (kernel, dilation) of the op set's depthwise convs: sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5.
DEPTHWISE_KERNELS = [(3, 1), (5, 1), (3, 2), (5, 2)]
DEPTHWISE_CASES = [(1, s) for s in EDGE_SHAPES] + [(2, s) for s in REDUCTION_INPUT_SHAPES]


@pytest.mark.parametrize("kernel,dilation", DEPTHWISE_KERNELS, ids=[f"k{k}d{d}" for k, d in DEPTHWISE_KERNELS])
@pytest.mark.parametrize("stride,shape", DEPTHWISE_CASES, ids=[f"s{s}-{_shape_id(x)}" for s, x in DEPTHWISE_CASES])
@pytest.mark.parametrize("impl", ["ref", "formulas"])
def test_depthwise_conv_backward(benchmark, kernel_medians, impl, stride, shape, kernel, dilation):
    torch.manual_seed(0)
    channels = shape[1]
    padding = dilation * (kernel - 1) // 2
    x = torch.randn(shape)
    weight = torch.randn(channels, 1, kernel, kernel)
    dy = torch.randn(torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, channels).shape)
    if impl == "ref":
        def fn():
            return torch.ops.aten.convolution_backward(dy, x, weight, None, [stride] * 2, [padding] * 2,
                                                       [dilation] * 2, False, [0, 0], channels, [True, True, False])
    else:
        def fn():
            return depthwise_conv2d_backward(dy, x, weight, stride, padding, dilation)
    _run(benchmark, f"depthwise_conv_backward k{kernel} d{dilation} stride {stride} cpu {_shape_id(shape)}", "cpu",
         impl, fn, kernel_medians)
