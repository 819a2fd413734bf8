"""The Triton kernels of bn_accumulate against their plain-PyTorch twins
(``bn_accumulate_ref``, ``bn_accumulate_backward_ref``): the launchers, the
``torch.ops.fastdarts_triton.*`` custom ops, and the ops' autograd formula.

Without a GPU the kernels run under Triton's interpreter (conftest sets
TRITON_INTERPRET=1), which is slow: shapes stay small, and the tests that need
many tiles, partials or grid-stride iterations shrink the module's block sizes
and grid limits instead of growing the tensors.
"""
import json
import os
import subprocess
import sys

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
EPS = 1e-5
# [N, C, *spatial], S = Π spatial. With the default 1024-element tiles:
SHAPES = [
    (3, 5, 7, 9),      # S = 63: tile 4 rows × 64, odd C, N·C = 15 rows (a masked last row block)
    (1, 1, 1, 1),      # one element
    (6, 7),            # no spatial dims: S = 1, 42 rows, tile 4 × 16
    (2, 3, 10),        # S = 10, below the narrowest tile (16)
    (2, 4, 16, 16),    # S = 256, a power of two: tile 4 × 256, no spatial mask
    (2, 3, 2, 3, 4),   # 3 spatial dims, S = 24
    (2, 3, 1025),      # S = 1025: two spatial blocks per row, the second holds one element
    (2, 3, 33, 40),    # S = 1320: two spatial blocks; the reduce splits along N and S (4 partials)
]

pytestmark = pytest.mark.skipif(not tbn.HAS_TRITON, reason=f"triton unusable: {tbn.TRITON_ERROR}")


def per_channel(t, like):
    return t.view((1, -1) + (1,) * (like.dim() - 2))


def batch_stats(z, eps=EPS):
    """BatchNorm's batch mean and 1/sqrt(biased var + eps) in the accumulator
    dtype: differentiable functions of z when z requires grad and grad mode is
    on (the reference autograd path), constants otherwise."""
    zf = z.to(accumulator_dtype(z.dtype))
    dims = [0] + list(range(2, z.dim()))
    return zf.mean(dims), (zf.var(dims, unbiased=False) + eps).rsqrt()


def make_inputs(shape, dtype, weight_shape=(1,)):
    """Every channel gets its own mean and spread, so a kernel that reads
    another channel's statistics (a wrong channel index) is off by O(1)."""
    acc_dtype = accumulator_dtype(dtype)
    c = torch.arange(shape[1], dtype=torch.float64).view((1, -1) + (1,) * (len(shape) - 2))
    z = (torch.randn(shape, dtype=torch.float64) * (0.5 + 0.4 * c) + 1.5 * c - 2).to(device=DEVICE, dtype=dtype)
    acc = torch.randn(shape, dtype=acc_dtype, device=DEVICE)
    dy = torch.randn(shape, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        mean, invstd = batch_stats(z)
    weight = torch.full(weight_shape, 0.7, dtype=acc_dtype, device=DEVICE)
    return acc, z, dy, mean, invstd, weight


def unit_roundoff(dtype):
    """u: the relative error of one rounding to dtype (2^-24 fp32, 2^-53 fp64, 2^-11 fp16, 2^-8 bf16)."""
    return torch.finfo(dtype).eps / 2


def tolerances(z, dy, mean, invstd, weight):
    """(rtol, atol) of out, dz and dweight against the ref. u is the unit
    roundoff of the arithmetic (accumulator) dtype, u_z that of z's dtype.

    - out: the ref's elementwise ops in the same order; a GPU may contract
      ``acc + w·x̂`` into an FMA: a few u of the largest term.
    - dz: elementwise too, but through s1/M and s2/M, means of M terms that the
      kernel sums in another order than torch: for these random terms the
      difference is ~ sqrt(M)·u·max|term| (a random walk; 4× margin), and dz
      multiplies it by |w|·invstd·(1 + max|x̂|). Then one rounding to z's
      dtype, which may round the two results either way: 2·u_z relative.
    - dweight: a sum of M·C terms dy·x̂ in another order: ~ sqrt(M·C)·u·max|term|
      (4× margin); it is itself ~ sqrt(M·C) in size and may be near 0, so no rtol.

    A wrong channel index is off by O(1) (make_inputs), many orders above these.
    """
    u, u_z = unit_roundoff(accumulator_dtype(z.dtype)), unit_roundoff(z.dtype)
    n, M = z.numel(), z.numel() // z.shape[1]
    with torch.no_grad():
        xhat_max = ((z.double() - per_channel(mean.double(), z)) * per_channel(invstd.double(), z)).abs().max().item()
        dy_max = dy.double().abs().max().item()
        w = weight.double().abs().max().item()
        dz_scale = w * invstd.double().max().item() * dy_max * (1 + xhat_max)
    return {
        "out": dict(rtol=4 * u, atol=4 * u * (1 + w * xhat_max)),
        "dz": dict(rtol=2 * u_z + 8 * u, atol=4 * M ** 0.5 * u * dz_scale),
        "dweight": dict(rtol=0.0, atol=4 * n ** 0.5 * u * dy_max * xhat_max),
    }


def forward_and_backward(impl, acc, z, dy, mean, invstd, weight):
    if impl == "launcher":
        return (tbn.bn_accumulate_triton(acc, z, mean, invstd, weight),
                *tbn.bn_accumulate_backward_triton(dy, z, mean, invstd, weight, True))
    return (torch.ops.fastdarts_triton.bn_accumulate(acc, z, mean, invstd, weight),
            *torch.ops.fastdarts_triton.bn_accumulate_backward(dy, z, mean, invstd, weight, True))


def assert_matches_reference(acc, z, dy, mean, invstd, weight, impl="launcher"):
    """Forward, ∂L/∂z and ∂L/∂w of the Triton path against the refs."""
    out, dz, dweight = forward_and_backward(impl, acc, z, dy, mean, invstd, weight)
    out_ref = bn_accumulate_ref(acc, z, mean, invstd, weight)
    dz_ref, dweight_ref = bn_accumulate_backward_ref(dy, z, mean, invstd, weight, True)
    assert out.dtype == out_ref.dtype and out.shape == z.shape
    assert dz.dtype == z.dtype and dz.shape == z.shape
    assert dweight.dtype == dweight_ref.dtype and dweight.shape == ()
    tol = tolerances(z, dy, mean, invstd, weight)
    torch.testing.assert_close(out, out_ref, **tol["out"], msg=lambda m: f"out: {m}")
    torch.testing.assert_close(dz, dz_ref, **tol["dz"], msg=lambda m: f"dz: {m}")
    torch.testing.assert_close(dweight, dweight_ref, **tol["dweight"], msg=lambda m: f"dweight: {m}")

    # compute_dz=False: the same ∂L/∂w, no ∂L/∂z.
    if impl == "launcher":
        dz_none, dweight_only = tbn.bn_accumulate_backward_triton(dy, z, mean, invstd, weight, False)
    else:
        dz_none, dweight_only = torch.ops.fastdarts_triton.bn_accumulate_backward(dy, z, mean, invstd, weight,
                                                                                  False)
    assert dz_none.numel() == 0
    torch.testing.assert_close(dweight_only, dweight_ref, **tol["dweight"])


def test_runs_on_gpu_or_under_interpreter():
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("impl", ["launcher", "op"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, impl):
    assert_matches_reference(*make_inputs(shape, dtype), impl=impl)


@pytest.mark.parametrize("impl", ["launcher", "op"])
def test_zero_dim_weight(impl):
    """The weight may be a 0-d tensor (the backend probe passes one)."""
    assert_matches_reference(*make_inputs((2, 3, 4, 5), torch.float32, weight_shape=()), impl=impl)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 3, 1025), (6, 7)], ids=str)
def test_autograd_matches_reference_autograd(shape, dtype):
    """torch.autograd.grad through the custom op (statistics as constants, the
    formula folds their dependence on z into s1, s2) against autograd through
    bn_accumulate_ref with the statistics differentiated as functions of z:
    the same BatchNorm derivative, computed two ways."""
    acc, z, _, _, _, weight = make_inputs(shape, dtype)
    # The upstream gradient is representable in z's dtype: the formula rounds
    # it to that dtype (the backward op's dy), which is then exact, so this
    # compares the kernels, not that rounding.
    g = torch.randn(shape, device=DEVICE).to(dtype).to(acc.dtype)
    inputs = [t.detach().clone().requires_grad_() for t in (acc, z, weight)]
    ref_inputs = [t.detach().clone().requires_grad_() for t in (acc, z, weight)]

    with torch.no_grad():
        mean, invstd = batch_stats(inputs[1])
    out = torch.ops.fastdarts_triton.bn_accumulate(inputs[0], inputs[1], mean, invstd, inputs[2])
    d_acc, d_z, d_w = torch.autograd.grad(out, inputs, g)

    # z converted to the accumulator dtype once: both uses of it then sum their
    # gradients in that dtype, rounded to z's dtype once, as the op's dz is.
    # (Two conversions would round two large, cancelling terms to fp16 apart.)
    z_acc = ref_inputs[1].to(acc.dtype)
    ref_out = bn_accumulate_ref(ref_inputs[0], z_acc, *batch_stats(z_acc), ref_inputs[2])
    d_acc_ref, d_z_ref, d_w_ref = torch.autograd.grad(ref_out, ref_inputs, g)

    tol = tolerances(z, g.to(dtype), mean, invstd, weight)
    torch.testing.assert_close(out, ref_out, **tol["out"])
    assert torch.equal(d_acc, d_acc_ref)  # ∂L/∂acc = g in both
    assert d_z.dtype == z.dtype and d_w.shape == weight.shape
    torch.testing.assert_close(d_z, d_z_ref, **tol["dz"], msg=lambda m: f"dz: {m}")
    torch.testing.assert_close(d_w, d_w_ref, **tol["dweight"], msg=lambda m: f"dweight: {m}")


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d in (torch.float16, torch.bfloat16)], ids=str)
def test_low_precision_error_at_most_twice_the_reference_error(dtype):
    """The flash-attention criterion: against an fp64 ground truth, the
    kernel's error is at most twice that of the PyTorch ref in the same dtype."""
    acc, z, dy, mean, invstd, weight = make_inputs((3, 5, 7, 9), dtype)
    acc64, z64, dy64, mean64, invstd64, weight64 = (t.to(torch.float64) for t in (acc, z, dy, mean, invstd, weight))
    truth_out = bn_accumulate_ref(acc64, z64, mean64, invstd64, weight64)
    truth_dz, truth_dweight = bn_accumulate_backward_ref(dy64, z64, mean64, invstd64, weight64, True)
    ref_out = bn_accumulate_ref(acc, z, mean, invstd, weight)
    ref_dz, ref_dweight = bn_accumulate_backward_ref(dy, z, mean, invstd, weight, True)
    out = tbn.bn_accumulate_triton(acc, z, mean, invstd, weight)
    dz, dweight = tbn.bn_accumulate_backward_triton(dy, z, mean, invstd, weight, True)

    for name, kernel, ref, truth in (("out", out, ref_out, truth_out), ("dz", dz, ref_dz, truth_dz),
                                     ("dweight", dweight, ref_dweight, truth_dweight)):
        kernel_error = (kernel.double() - truth).abs().max().item()
        ref_error = (ref.double() - truth).abs().max().item()
        # Slack for the fp32 arithmetic both share: a few fp32 ulps of the values.
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
    assert_matches_reference(acc, z, dy, mean, invstd, weight)


@pytest.mark.parametrize("shape", [
    (3, 5, 7, 9),   # S = 63: reduce tile 1 × 32, 3 × 2 tiles per channel → 3 partials of 2 spatial blocks
    (9, 5, 2, 3),   # S = 6: tiles of 4 rows × 8, masked in both directions; 3 row blocks → 3 partials
    (1, 3, 200),    # N = 1: 7 spatial blocks split along S → 3 partials of 3, 3, 1 blocks
    (2, 3, 130),    # 2 rows × 5 spatial blocks per channel → 2 partials (one per n) of 5 blocks
], ids=str)
def test_many_tiles_and_partials(monkeypatch, shape):
    """Small blocks make a tiny tensor exercise what large ones do on a GPU:
    several tiles per row and rows per tile, several partials per channel,
    several blocks per partial, masked tails."""
    monkeypatch.setattr(tbn, "ELEMENTWISE_BLOCK", 64)
    monkeypatch.setattr(tbn, "REDUCE_BLOCK", 32)
    monkeypatch.setattr(tbn, "MIN_SPATIAL_BLOCK", 4)
    monkeypatch.setattr(tbn, "MAX_PARTIALS_PER_CHANNEL", 3)
    launches = record_launches(monkeypatch)
    for dtype in (torch.float64, torch.float32):
        assert_matches_reference(*make_inputs(shape, dtype))
    reduce = [grid for name, grid in launches if name == "reduce"]
    assert all(grid[1] * grid[2] > 1 for grid in reduce), reduce  # several partials per channel


def test_grid_stride_loops(monkeypatch):
    """Grids capped far below the work (as CUDA's 65535 caps axes 1 and 2):
    every kernel loops over the row blocks, spatial blocks and channels its
    grid does not cover, and the partials respect the caps."""
    monkeypatch.setattr(tbn, "ELEMENTWISE_BLOCK", 16)
    monkeypatch.setattr(tbn, "REDUCE_BLOCK", 16)
    monkeypatch.setattr(tbn, "MIN_SPATIAL_BLOCK", 4)
    monkeypatch.setattr(tbn, "MAX_GRID", (2, 3, 2))
    launches = record_launches(monkeypatch)
    # 35 rows and 4 spatial blocks (S = 51, tiles 1 × 16) on a 2 × 3 grid; the reduce
    # runs 7 channels on 2 programs, 5 × 4 blocks per channel in 3 × 2 partials.
    assert_matches_reference(*make_inputs((5, 7, 3, 17), torch.float64))
    for name, grid in launches:
        assert all(g <= cap for g, cap in zip(grid, tbn.MAX_GRID)), (name, grid)


def record_launches(monkeypatch):
    """Wraps the kernels' launches to record (kernel, grid)."""
    launches = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append((self.name, tuple(grid)))
            return self.kernel[grid]

    for name, attr in (("fwd", "_bn_accumulate_fwd_kernel"), ("reduce", "_bn_accumulate_bwd_reduce_kernel"),
                       ("dz", "_bn_accumulate_bwd_dz_kernel")):
        monkeypatch.setattr(tbn, attr, Recorder(name, getattr(tbn, attr)))
    return launches


@pytest.mark.parametrize("C", [1, 2, 3, 5, 7, 16, 96, 1000])
@pytest.mark.parametrize("S", [1, 2, 15, 16, 17, 49, 63, 64, 196, 1023, 1024, 1025, 3136, 10**7])
def test_tile_choice(S, C):
    """Tiles are powers of two of at most the block's elements (a few shapes,
    not one per feature-map size); they cover S or are a full block; and the
    elementwise ones hold at most C rows, which the kernels' one-wrap channel
    index relies on."""
    for block in (tbn.ELEMENTWISE_BLOCK, tbn.REDUCE_BLOCK):
        rows, block_s = tbn._tile(S, block)
        assert rows * block_s == block and block_s >= min(S, block) and block_s >= min(tbn.MIN_SPATIAL_BLOCK, block)
        assert rows & (rows - 1) == 0 and block_s & (block_s - 1) == 0
    grid, rows, block_s = tbn._elementwise_launch(4 * C, C, S)
    assert rows <= C and rows * block_s <= tbn.ELEMENTWISE_BLOCK and rows & (rows - 1) == 0
    assert grid[0] * rows >= 4 * C and grid[1] * block_s >= S


_DIVISION_PROBE = r"""
import json, re
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as exc:
    print(json.dumps({"skip": f"no offline Triton compiler for CUDA: {exc!r}"}))
    raise SystemExit
from fastdarts.kernels import triton_bn_accumulate as tbn

KERNELS = {
    "fwd": (tbn._bn_accumulate_fwd_kernel,
            ["acc_ptr", "z_ptr", "mean_ptr", "invstd_ptr", "weight_ptr", "out_ptr"], ["R", "C", "S"]),
    "dz": (tbn._bn_accumulate_bwd_dz_kernel,
           ["dy_ptr", "z_ptr", "mean_ptr", "invstd_ptr", "weight_ptr", "s1_ptr", "s2_ptr", "dz_ptr"],
           ["R", "C", "S", "M"]),
    "reduce": (tbn._bn_accumulate_bwd_reduce_kernel,
               ["dy_ptr", "z_ptr", "mean_ptr", "invstd_ptr", "s1_partial_ptr", "s2_partial_ptr"],
               ["N", "C", "S", "CS", "n_blocks_per_partial", "s_blocks_per_partial"]),
}
counts = {}
for name, (kernel, pointers, scalars) in KERNELS.items():
    signature = {**{p: "*fp32" for p in pointers}, **{s: "i32" for s in scalars},
                 "ROWS": "constexpr", "BLOCK_S": "constexpr"}
    for num_warps in (4, 1):
        src = ASTSource(kernel, signature, {"ROWS": 1, "BLOCK_S": 1024})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]
        counts[f"{name}/{num_warps}"] = len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx))
print(json.dumps(counts))
"""


@pytest.mark.slow
def test_no_integer_division_per_element():
    """The mechanism: compiled for sm_90 (offline, no GPU needed), the reduce
    kernel has no 64-bit division or remainder at all, and the elementwise
    kernels' count does not grow with the elements per thread (1024-element
    tile on 4 warps: 8 per thread; on 1 warp: 32), i.e. the channel is one
    `% C` per tile, not per element. A flat index with ``(i // S) % C`` has
    ~2 per element. Runs in a subprocess: the interpreter, which conftest
    enables, replaces the language functions the compiler needs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The fastdarts this process tests, wherever it was imported from.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(tbn.__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _DIVISION_PROBE], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in counts:
        pytest.skip(counts["skip"])
    assert counts["reduce/4"] == counts["reduce/1"] == 0, counts
    for name in ("fwd", "dz"):
        assert counts[f"{name}/4"] == counts[f"{name}/1"] <= 2, counts


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
        with torch.no_grad():
            mean, invstd = batch_stats(z)
        return torch.ops.fastdarts_triton.bn_accumulate(acc, z, mean, invstd, weight)

    acc, z, _, _, _, weight = make_inputs((2, 3, 4), torch.float64)
    torch.autograd.gradcheck(f, (acc.requires_grad_(), z.requires_grad_(), weight.requires_grad_()))


@pytest.mark.parametrize("weight_shape", [(1,), ()], ids=str)
def test_autograd_honours_needs_input_grad(weight_shape):
    acc, z, _, mean, invstd, weight = make_inputs((2, 3, 4), torch.float64, weight_shape)
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
