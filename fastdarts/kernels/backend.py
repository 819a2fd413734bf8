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
"""
from __future__ import annotations

import os
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


def kernel_backend(device: torch.device) -> str:
    """The backend that runs kernels for tensors on ``device``."""
    device_type = torch.device(device).type
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        if forced not in KERNEL_BACKENDS:
            raise FastDartsError(f"{ENV_VAR}={forced!r} is not a kernel backend; known: "
                                 f"{', '.join(KERNEL_BACKENDS)}")
        if not _usable_on(forced, device_type):
            raise FastDartsError(f"{ENV_VAR}={forced} cannot run on {device_type}: {_why_missing(forced)}; "
                                 f"usable here: {', '.join(available_backends())}")
        return forced
    return next(name for name in _DEFAULTS.get(device_type, ("ref",)) if _usable_on(name, device_type))


def kernel_ops(device: torch.device) -> KernelOps:
    """The two kernel functions of the backend chosen for ``device``."""
    name = kernel_backend(device)
    if name == "ref":
        return KernelOps(bn_accumulate_ref, bn_accumulate_backward_ref, pool3x3_ref)
    if name == "triton":
        return KernelOps(torch.ops.fastdarts_triton.bn_accumulate, torch.ops.fastdarts_triton.bn_accumulate_backward,
                         pool3x3_ref)
    # cpp and cuda are the same dispatcher ops; the tensor's device picks the kernel.
    pool = torch.ops.fastdarts.pool3x3 if name == "cpp" and extension.HAS_POOL_KERNELS else pool3x3_ref
    return KernelOps(torch.ops.fastdarts.bn_accumulate, torch.ops.fastdarts.bn_accumulate_backward, pool)
