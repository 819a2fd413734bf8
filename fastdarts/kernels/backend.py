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
kernel built for other architectures fails only at launch. So each compiled
implementation runs once on tiny tensors of the device before it is chosen;
one that fails is skipped for the next usable one with one warning naming the
failure (or, when forced, is an error).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, NamedTuple

import torch

from ..errors import FastDartsError
from . import extension, triton_bn_accumulate
from .bn_accumulate import bn_accumulate_backward_ref, bn_accumulate_ref
from .pool3x3 import pool3x3_ref

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


def _probe(name: str, device: torch.device) -> str | None:
    """Run every kernel of ``name`` once on tiny tensors (compiling it if it
    must be), in each dtype the search may give it; the failure as one line,
    or None."""
    ops = _ops_of(name)
    # Triton compiles per dtype (bf16 fails on GPUs without it); the interpreter has no bf16.
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    try:
        for dtype in dtypes:
            z = torch.linspace(-1.0, 1.0, 2 * 3 * 5 * 5, device=device).reshape(2, 3, 5, 5).to(dtype)
            mean, invstd, weight = (torch.full(shape, value, device=device) for shape, value in
                                    (((3,), 0.0), ((3,), 1.0), ((), 1.0)))
            ops.bn_accumulate(torch.zeros(z.shape, device=device), z, mean, invstd, weight)
            ops.bn_accumulate_backward(z, z, mean, invstd, weight, True)
            for stride in (1, 2):
                ops.pool3x3(z, stride, True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a launch failure shows here at the latest
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


def _probed(name: str, device: torch.device) -> str | None:
    key = (name, device)
    if key not in _PROBED:
        if name == "ref" or not _can_probe(device):
            return None  # ref always runs; otherwise decided (and cached) at the first real call
        _PROBED[key] = _probe(name, device)
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
