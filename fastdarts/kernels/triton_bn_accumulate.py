"""Triton kernels of BatchNorm-normalise-and-accumulate.

The math (forward ``out = acc + w·x̂``, backward ``s1``, ``s2``, ``∂L/∂z``,
``∂L/∂w``) and its executable spec, ``bn_accumulate_ref`` /
``bn_accumulate_backward_ref``, live in ``bn_accumulate.py``; these kernels
compute exactly that. ``z`` is viewed as a contiguous ``[N, C, S]`` tensor
(``S = Π spatial``), so the channel of flat element ``i`` is ``(i // S) % C``.

Kernels (layout after Liger-Kernel):

- ``_bn_accumulate_fwd_kernel``: elementwise ``acc + w·(z - mean)·invstd``.
- ``_bn_accumulate_bwd_reduce_kernel``: grid ``(C, P)``; each program reduces
  one chunk of one channel into partial ``Σdy`` and ``Σdy·x̂``, written to
  ``[C, P]`` buffers that torch sums afterwards, so the result does not depend
  on scheduling (no atomics), as in Liger's rms_norm backward.
- ``_bn_accumulate_bwd_dz_kernel``: elementwise ``∂L/∂z``.

Arithmetic is in the accumulator dtype (fp32, fp64 for fp64 input). Both ops
are registered as ``torch.ops.fastdarts_triton.*`` custom ops, with fake
(meta) kernels and an autograd formula, so they compose with torch.compile.
Without a GPU they run under Triton's interpreter (``TRITON_INTERPRET=1``,
set before triton is imported), which is slow and meant for tests.
"""
# No ``from __future__ import annotations``: torch.library infers the custom
# op schemas from the annotations, and torch 2.4 cannot read string ones.
import math

import contextlib
import os

import torch

from .bn_accumulate import accumulator_dtype, check_args, register_fake_and_autograd

# triton.jit decides at import whether kernels are interpreted; record that
# decision instead of reading the variable again later.
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON: bool = True
    TRITON_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install (e.g. a missing libcuda stub)
    HAS_TRITON = False
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

# Fixed block sizes: a constexpr that followed the shape would recompile the
# kernels for every feature-map size of the network.
ELEMENTWISE_BLOCK = 1024
REDUCE_BLOCK = 1024
# Upper bound on the partial sums per channel: enough programs to fill a GPU
# for the usual C of a DARTS cell, few enough that the torch sum is trivial.
MAX_PARTIALS_PER_CHANNEL = 64


if HAS_TRITON:

    @triton.jit
    def _bn_accumulate_fwd_kernel(acc_ptr, z_ptr, mean_ptr, invstd_ptr, weight_ptr, out_ptr,
                                  n_elements, C, S, BLOCK_SIZE: tl.constexpr):
        # 64-bit offsets: a search batch of feature maps can exceed 2^31 elements.
        offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        channel = (offsets // S) % C
        compute_dtype = acc_ptr.dtype.element_ty
        acc = tl.load(acc_ptr + offsets, mask=mask, other=0.0)
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
        mean = tl.load(mean_ptr + channel, mask=mask, other=0.0)
        invstd = tl.load(invstd_ptr + channel, mask=mask, other=0.0)
        # The weight stays on the device: reading it on the host would sync.
        weight = tl.load(weight_ptr)
        tl.store(out_ptr + offsets, acc + weight * ((z - mean) * invstd), mask=mask)

    @triton.jit
    def _bn_accumulate_bwd_reduce_kernel(dy_ptr, z_ptr, mean_ptr, invstd_ptr, s1_partial_ptr, s2_partial_ptr,
                                         C, S, M, chunk_size, num_partials, BLOCK_SIZE: tl.constexpr):
        # Program ids index the grid, so the per-channel scalar loads and the
        # partial stores below are in bounds without a mask.
        channel = tl.program_id(0).to(tl.int64)
        partial = tl.program_id(1).to(tl.int64)
        compute_dtype = s1_partial_ptr.dtype.element_ty
        mean = tl.load(mean_ptr + channel)
        invstd = tl.load(invstd_ptr + channel)
        # Per-lane sums, reduced once at the end: shorter addition chains than
        # one running scalar, and a fixed order.
        sum_dy = tl.zeros([BLOCK_SIZE], dtype=compute_dtype)
        sum_dy_xhat = tl.zeros([BLOCK_SIZE], dtype=compute_dtype)
        chunk_start = partial * chunk_size
        for block_start in range(0, chunk_size, BLOCK_SIZE):
            # j: index among the channel's M = N·S elements, n = j // S, s = j % S.
            j = chunk_start + block_start + tl.arange(0, BLOCK_SIZE)
            mask = j < M
            offsets = (j // S) * C * S + channel * S + j % S
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
            z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
            # Masked lanes have dy = 0, so they add nothing to either sum.
            sum_dy += dy
            sum_dy_xhat += dy * ((z - mean) * invstd)
        tl.store(s1_partial_ptr + channel * num_partials + partial, tl.sum(sum_dy, axis=0))
        tl.store(s2_partial_ptr + channel * num_partials + partial, tl.sum(sum_dy_xhat, axis=0))

    @triton.jit
    def _bn_accumulate_bwd_dz_kernel(dy_ptr, z_ptr, mean_ptr, invstd_ptr, weight_ptr, s1_ptr, s2_ptr, dz_ptr,
                                     n_elements, C, S, M, BLOCK_SIZE: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        channel = (offsets // S) % C
        compute_dtype = s1_ptr.dtype.element_ty
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
        mean = tl.load(mean_ptr + channel, mask=mask, other=0.0)
        invstd = tl.load(invstd_ptr + channel, mask=mask, other=0.0)
        s1 = tl.load(s1_ptr + channel, mask=mask, other=0.0)
        s2 = tl.load(s2_ptr + channel, mask=mask, other=0.0)
        weight = tl.load(weight_ptr)
        xhat = (z - mean) * invstd
        dz = weight * invstd * (dy - s1 / M - xhat * (s2 / M))
        tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _channels_and_spatial(z: torch.Tensor) -> tuple[int, int]:
    return z.shape[1], math.prod(z.shape[2:])


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device; make it the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def bn_accumulate_triton(acc: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                         weight: torch.Tensor) -> torch.Tensor:
    """``acc + w · (z - mean) · invstd`` (see ``bn_accumulate_ref``)."""
    check_args("bn_accumulate", z, mean, invstd, weight, acc=acc)
    acc, z, mean, invstd, weight = (t.contiguous() for t in (acc, z, mean, invstd, weight))
    out = torch.empty_like(acc)
    n_elements = z.numel()
    if n_elements == 0:
        return out
    C, S = _channels_and_spatial(z)
    grid = (triton.cdiv(n_elements, ELEMENTWISE_BLOCK),)
    with _on_device_of(z):
        _bn_accumulate_fwd_kernel[grid](acc, z, mean, invstd, weight, out, n_elements, C, S,
                                        BLOCK_SIZE=ELEMENTWISE_BLOCK)
    return out


def bn_accumulate_backward_triton(dy: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                                  weight: torch.Tensor, compute_dz: bool = True
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂L/∂z, ∂L/∂w)``, ``∂L/∂z`` empty unless ``compute_dz`` (see
    ``bn_accumulate_backward_ref``)."""
    check_args("bn_accumulate_backward", z, mean, invstd, weight, dy=dy)
    dy, z, mean, invstd, weight = (t.contiguous() for t in (dy, z, mean, invstd, weight))
    acc_dtype = accumulator_dtype(z.dtype)
    n_elements = z.numel()
    if n_elements == 0:
        dz = torch.empty_like(z) if compute_dz else z.new_empty(0)
        return dz, torch.zeros((), dtype=acc_dtype, device=z.device)
    C, S = _channels_and_spatial(z)
    M = n_elements // C
    blocks_per_channel = triton.cdiv(M, REDUCE_BLOCK)
    blocks_per_chunk = triton.cdiv(blocks_per_channel, MAX_PARTIALS_PER_CHANNEL)
    chunk_size = blocks_per_chunk * REDUCE_BLOCK
    num_partials = triton.cdiv(M, chunk_size)
    s1_partial = torch.empty((C, num_partials), dtype=acc_dtype, device=z.device)
    s2_partial = torch.empty((C, num_partials), dtype=acc_dtype, device=z.device)
    with _on_device_of(z):
        _bn_accumulate_bwd_reduce_kernel[(C, num_partials)](
            dy, z, mean, invstd, s1_partial, s2_partial, C, S, M, chunk_size, num_partials,
            BLOCK_SIZE=REDUCE_BLOCK)
    s1 = s1_partial.sum(1)
    s2 = s2_partial.sum(1)
    dweight = s2.sum()
    if not compute_dz:
        return z.new_empty(0), dweight
    dz = torch.empty_like(z)
    grid = (triton.cdiv(n_elements, ELEMENTWISE_BLOCK),)
    with _on_device_of(z):
        _bn_accumulate_bwd_dz_kernel[grid](dy, z, mean, invstd, weight, s1, s2, dz, n_elements, C, S, M,
                                           BLOCK_SIZE=ELEMENTWISE_BLOCK)
    return dz, dweight


if HAS_TRITON:

    @torch.library.custom_op("fastdarts_triton::bn_accumulate", mutates_args=())
    def _bn_accumulate_op(acc: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                          weight: torch.Tensor) -> torch.Tensor:
        return bn_accumulate_triton(acc, z, mean, invstd, weight)

    @torch.library.custom_op("fastdarts_triton::bn_accumulate_backward", mutates_args=())
    def _bn_accumulate_backward_op(dy: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                                   weight: torch.Tensor, compute_dz: bool = True
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return bn_accumulate_backward_triton(dy, z, mean, invstd, weight, compute_dz)

    register_fake_and_autograd("fastdarts_triton")
