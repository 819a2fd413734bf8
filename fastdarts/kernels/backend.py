"""Which kernel implementation runs, chosen once, here.

Implementations of the same ops (``bn_accumulate`` and its backward; the 3x3
pools, compiled for the CPU only):

- ``cuda``: the compiled extension's CUDA kernels (``csrc/cuda``);
- ``triton``: Triton kernels (``triton_bn_accumulate.py``), the default on GPUs;
- ``cpp``: the compiled extension's C++ CPU kernels (``csrc``), the default on CPUs;
- ``ref``: the plain-PyTorch twins (``bn_accumulate.py``), always there.

``FASTDARTS_BACKEND=<name>`` forces one (an error names what is usable if it
cannot run); otherwise the fastest usable one for the tensor's device is
taken. A missing build is reported only when someone asks for it.

Importing is not working: a Triton kernel compiles on first use (an old
ptxas or an architecture Triton does not know fails only then), and a CUDA
kernel built for other architectures fails only at launch; and running is not
computing the right thing. So each compiled implementation runs once on tiny
tensors of the device before it is chosen (``_probe``): ``bn_accumulate``, its
backward (both outputs, with and without ``∂L/∂z``), and, where it is compiled,
the 3x3 pool for stride 1 and 2, max and avg, forward and backward (through
autograd), in each dtype the search may give it, on deterministic inputs that
are not symmetric (odd sizes, mean ≠ 0, invstd ≠ 1, weight ≠ 1). Every output
is compared with its ``*_ref`` twin's on the same tensors: same shape and
dtype, and a max error within ``(2·eps(output dtype) + 32·eps(fp32)) · scale``
(one rounding to the output's dtype, twice for margin, so looser for fp16/bf16
outputs, plus the reordering of the arithmetic, done in fp32; ``scale``: the
reference output's largest magnitude, for ``∂L/∂w``, a sum, that of its terms
``Σ|dy·x̂|``). An implementation that fails or disagrees is skipped for the
next usable one with one warning naming the failure, e.g. ``the cpp kernels
fail on cpu (bn_accumulate_backward gives wrong values of dz in float32 (max
error 0.481 against the reference's at tolerance 0.000195))`` (or, when
forced, is an error).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, NamedTuple

import torch

from ..errors import FastDartsError
from . import extension, triton_bn_accumulate
from .bn_accumulate import accumulator_dtype, bn_accumulate_backward_ref, bn_accumulate_ref
from .pool3x3 import pool3x3_backward_ref, pool3x3_ref

ENV_VAR = "FASTDARTS_BACKEND"
KERNEL_BACKENDS = ("cuda", "triton", "cpp", "ref")
# Preference order per device type when nothing is forced.
_DEFAULTS = {"cuda": ("triton", "cuda", "ref"), "cpu": ("cpp", "ref")}


class KernelOps(NamedTuple):
    bn_accumulate: Callable[..., torch.Tensor]
    bn_accumulate_backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # Differentiable 3x3 pool (x, stride, is_max); compiled on the CPU only.
    pool3x3: Callable[..., torch.Tensor]


def _triton_interpreted() -> bool:
    return triton_bn_accumulate.INTERPRETED


def _usable_on(name: str, device_type: str) -> bool:
    if name == "ref":
        return True
    if name == "cpp":
        return extension.HAS_EXTENSION and device_type == "cpu"
    if name == "cuda":
        return extension.HAS_CUDA_KERNELS and device_type == "cuda"
    if name == "triton":
        # The interpreter runs Triton kernels on CPU tensors (tests only: slow).
        return triton_bn_accumulate.HAS_TRITON and (device_type == "cuda" or _triton_interpreted())
    raise FastDartsError(f"unknown kernel backend {name!r}; known: {', '.join(KERNEL_BACKENDS)}")


def available_backends() -> list[str]:
    """The kernel backends usable on this machine, fastest first."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [name for name in KERNEL_BACKENDS if any(_usable_on(name, d) for d in devices)]


def _why_missing(name: str) -> str:
    if name in ("cpp", "cuda") and not extension.HAS_EXTENSION:
        return (f"the compiled extension is not built ({extension.EXTENSION_ERROR}); install with "
                "`pip install --no-build-isolation .` next to the torch you run with")
    if name == "cuda" and not extension.HAS_CUDA_KERNELS:
        return "the extension was built without CUDA kernels (no CUDA torch or nvcc at build time)"
    if name == "triton" and not triton_bn_accumulate.HAS_TRITON:
        return f"triton is not importable ({triton_bn_accumulate.TRITON_ERROR})"
    return "it does not run on this device"


# (backend, device) -> None if its kernels ran there, else why they failed.
_PROBED: dict[tuple[str, torch.device], str | None] = {}
_WARNED: set[tuple[tuple[str, ...], torch.device]] = set()  # each fallback is announced once


def _ops_of(name: str) -> KernelOps:
    if name == "ref":
        return KernelOps(bn_accumulate_ref, bn_accumulate_backward_ref, pool3x3_ref)
    if name == "triton":
        return KernelOps(torch.ops.fastdarts_triton.bn_accumulate, torch.ops.fastdarts_triton.bn_accumulate_backward,
                         pool3x3_ref)
    # cpp and cuda are the same dispatcher ops; the tensor's device picks the kernel.
    pool = torch.ops.fastdarts.pool3x3 if name == "cpp" and extension.HAS_POOL_KERNELS else pool3x3_ref
    return KernelOps(torch.ops.fastdarts.bn_accumulate, torch.ops.fastdarts.bn_accumulate_backward, pool)


class _WrongValues(Exception):
    """A probed kernel's output that disagrees with its reference's."""


# The probe's tolerance, relative to the scale of the reference's output: one
# rounding to the output's dtype (twice, for margin; the looser term for fp16
# and bf16 outputs) plus the reordering of the arithmetic in the accumulator
# dtype (fp32), a few dozen operations and sums of at most 210 terms.
_OUTPUT_ROUNDINGS = 2
_ACCUMULATOR_ULPS = 32


def _tolerance(out_dtype: torch.dtype, dtype: torch.dtype, scale: float) -> float:
    return (_OUTPUT_ROUNDINGS * torch.finfo(out_dtype).eps
            + _ACCUMULATOR_ULPS * torch.finfo(accumulator_dtype(dtype)).eps) * scale


def _compare(op: str, setting: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
             scale: float | None = None) -> None:
    """Raise ``_WrongValues`` unless ``out`` is ``ref`` (same shape and dtype,
    values within the tolerance; a NaN is never within it). ``setting`` says
    which output and which call, for the message; ``scale`` defaults to
    ``max |ref|``."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        raise _WrongValues(f"{op} gives a {tuple(out.shape)} {str(out.dtype).removeprefix('torch.')} tensor"
                           f"{setting} where the reference gives {tuple(ref.shape)} "
                           f"{str(ref.dtype).removeprefix('torch.')}")
    if ref.numel() == 0:
        return
    error = (out.double() - ref.double()).abs().max().item()
    if scale is None:
        scale = ref.abs().max().item()
    tolerance = _tolerance(ref.dtype, dtype, scale)
    if not error <= tolerance:
        raise _WrongValues(f"{op} gives wrong values{setting} (max error {error:.3g} against the reference's "
                           f"at tolerance {tolerance:.3g})")


# The probe's tensors: odd, unequal sizes (a mixed-up H and W, N and C, or a
# tail shows), and per-channel statistics and a weight that are not 0 and 1.
_PROBE_SHAPE = (2, 3, 5, 7)
_PROBE_MEAN = (0.37, -0.81, 1.23)
_PROBE_INVSTD = (1.7, 0.55, 2.3)
_PROBE_WEIGHT = 0.83


def _probe_values(ops: KernelOps, device: torch.device, dtype: torch.dtype) -> None:
    """Compare every kernel of ``ops`` with its reference on tiny
    deterministic tensors of ``device`` and ``dtype``; raise ``_WrongValues``
    on the first that disagrees (any other exception: it fails)."""
    g = torch.Generator().manual_seed(1234)  # on the CPU, then moved: the same values on every device

    def randn(shape, scale=1.0, shift=0.0, to=dtype):
        return (torch.randn(shape, generator=g) * scale + shift).to(device=device, dtype=to)

    acc_dtype = accumulator_dtype(dtype)
    z = randn(_PROBE_SHAPE, 1.5, 0.4)
    # dy correlated with z: ∂L/∂w = Σ dy·x̂ is then not a sum that cancels to
    # near 0, so a relative error of it is caught at a tolerance relative to Σ|dy·x̂|.
    dy = (randn(_PROBE_SHAPE, to=acc_dtype) + z.to(acc_dtype)).to(dtype)
    acc = randn(_PROBE_SHAPE, to=acc_dtype)
    mean, invstd = (torch.tensor(v, dtype=acc_dtype, device=device) for v in (_PROBE_MEAN, _PROBE_INVSTD))
    weight = torch.tensor(_PROBE_WEIGHT, dtype=acc_dtype, device=device)
    in_dtype = f" in {str(dtype).removeprefix('torch.')}"

    _compare("bn_accumulate", in_dtype, ops.bn_accumulate(acc, z, mean, invstd, weight),
             bn_accumulate_ref(acc, z, mean, invstd, weight), dtype)
    xhat = (z.double() - mean.double().view(1, -1, 1, 1)) * invstd.double().view(1, -1, 1, 1)
    dweight_scale = (dy.double() * xhat).abs().sum().item()  # ∂L/∂w is a sum: the scale of its terms
    for compute_dz in (True, False):
        call = "" if compute_dz else " (compute_dz=False)"
        dz, dweight = ops.bn_accumulate_backward(dy, z, mean, invstd, weight, compute_dz)
        dz_ref, dweight_ref = bn_accumulate_backward_ref(dy, z, mean, invstd, weight, compute_dz)
        _compare("bn_accumulate_backward", f" of dz{call}{in_dtype}", dz, dz_ref, dtype)
        _compare("bn_accumulate_backward", f" of dweight{call}{in_dtype}", dweight, dweight_ref, dtype,
                 dweight_scale)
    if ops.pool3x3 is pool3x3_ref:
        return  # ATen's pools (no compiled kernel on this device): nothing to compare
    for is_max in (True, False):
        for stride in (1, 2):
            setting = f" for {'max' if is_max else 'avg'}, stride {stride}{in_dtype}"
            x = z.detach().requires_grad_(True)
            y = ops.pool3x3(x, stride, is_max)
            y_ref = pool3x3_ref(z, stride, is_max)
            _compare("pool3x3", setting, y.detach(), y_ref, dtype)
            dy_pool = randn(y_ref.shape)
            (dx,) = torch.autograd.grad(y, x, dy_pool)
            _compare("pool3x3_backward", f" of dx{setting}", dx, pool3x3_backward_ref(dy_pool, z, stride, is_max),
                     dtype)


def _probe(name: str, device: torch.device) -> str | None:
    """Run every kernel of ``name`` once on tiny tensors (compiling it if it
    must be), in each dtype the search may give it, and compare its outputs
    with the references'; why it fails or which output is wrong, as one line,
    or None."""
    ops = _ops_of(name)
    # Triton compiles per dtype (bf16 fails on GPUs without it); the interpreter has no bf16.
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    try:
        # Whatever mode the first caller is in: real tensors, and autograd for the pool's backward.
        with torch.inference_mode(False), torch.enable_grad():
            for dtype in dtypes:
                _probe_values(ops, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a launch failure shows here at the latest
    except _WrongValues as wrong:
        return str(wrong)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use these kernels
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first_line}"
    return None


def _can_probe(device: torch.device) -> bool:
    """Whether tiny real kernels can run now: not on meta tensors, not under
    a fake-tensor mode (torch.compile tracing: nothing would run), not while a
    CUDA graph is being captured (the probe's synchronisation would break it)."""
    if device.type == "meta" or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _probe_in_own_thread(name: str, device: torch.device) -> str | None:
    """``_probe`` in a thread of its own. Autograd's saved-tensor hooks,
    checkpoint frames and grad modes are thread-local, so what the first
    caller is inside cannot change what the probe runs: a first fused call
    inside a checkpoint's recompute (``--recompute cell``) saw the probe's
    tensors recorded by the recompute and its early stop swallowed as a
    kernel failure."""
    result: list[str | None] = []

    def run() -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        result.append(_probe(name, device))

    thread = threading.Thread(target=run, name="fastdarts-kernel-probe")
    thread.start()
    thread.join()
    return result[0] if result else "the kernel probe's thread died"


def _probed(name: str, device: torch.device) -> str | None:
    key = (name, device)
    if key not in _PROBED:
        if name == "ref" or not _can_probe(device):
            return None  # ref always runs; otherwise decided (and cached) at the first real call
        _PROBED[key] = _probe_in_own_thread(name, device)
    return _PROBED[key]


def _normalised(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def kernel_backend(device: torch.device | str) -> str:
    """The backend that runs kernels for tensors on ``device``."""
    device = _normalised(device)
    device_type = device.type
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        if forced not in KERNEL_BACKENDS:
            raise FastDartsError(f"{ENV_VAR}={forced!r} is not a kernel backend; known: "
                                 f"{', '.join(KERNEL_BACKENDS)}")
        if not _usable_on(forced, device_type):
            raise FastDartsError(f"{ENV_VAR}={forced} cannot run on {device_type}: {_why_missing(forced)}; "
                                 f"usable here: {', '.join(available_backends())}")
        failure = _probed(forced, device)
        if failure is not None:
            raise FastDartsError(f"{ENV_VAR}={forced}: its kernels fail on {device} ({failure})")
        return forced
    failed = []
    for name in _DEFAULTS.get(device_type, ("ref",)):
        if not _usable_on(name, device_type):
            continue
        failure = _probed(name, device)
        if failure is None:
            if failed and (tuple(failed), device) not in _WARNED:
                _WARNED.add((tuple(failed), device))
                warnings.warn(f"fastdarts: {'; '.join(failed)}; using the {name} kernels on {device} instead",
                              RuntimeWarning, stacklevel=2)
            return name
        failed.append(f"the {name} kernels fail on {device} ({failure})")
    raise AssertionError("unreachable: the ref kernels always run")


def kernel_ops(device: torch.device) -> KernelOps:
    """The kernel functions of the backend chosen for ``device``."""
    return _ops_of(kernel_backend(device))
