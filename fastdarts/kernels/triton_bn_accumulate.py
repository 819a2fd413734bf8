"""Triton kernels of BatchNorm-normalise-and-accumulate.

The math (forward ``out = acc + w·x̂``, backward ``s1``, ``s2``, ``∂L/∂z``,
``∂L/∂w``) and its executable spec, ``bn_accumulate_ref`` /
``bn_accumulate_backward_ref``, live in ``bn_accumulate.py``; these kernels
compute exactly that.

Indexing. ``z`` is viewed as a contiguous ``[N·C, S]`` matrix of rows
(``S = Π spatial``): row ``r`` is the plane of sample ``r // C``, channel
``r % C``, and starts at ``r·S``. No element needs an integer division:

- the elementwise kernels work on 2-D tiles of ``ROWS × BLOCK_S`` elements
  (``ROWS`` consecutive rows, ``BLOCK_S`` consecutive positions of each). The
  channels of a tile starting at row ``r0`` are one scalar ``r0 % C`` plus
  ``0..ROWS-1``, wrapped once at ``C`` (``ROWS ≤ C``); offsets are
  ``r·S + s``, a multiply-add; the spatial tail is a mask ``s < S``; and
  ``mean``/``invstd`` (``s1``/``s2``) are loaded once per row;
- the reduction takes its channel and its ranges of samples and spatial
  blocks from the grid, and addresses ``n·C·S + c·S + s``.

The flat indexing this replaces, ``channel = (i // S) % C`` per element, cost
a 64-bit division and remainder per element, which NVIDIA GPUs emulate.

A tile holds at most ``ELEMENTWISE_BLOCK`` / ``REDUCE_BLOCK`` elements:
``BLOCK_S`` is the power of two covering ``S``, clamped to
``[MIN_SPATIAL_BLOCK, block]``, and ``ROWS = block // BLOCK_S``, for the
elementwise kernels at most ``C`` (rounded down to a power of two). Small
feature maps (8×8 in a DARTS search) thus fill a tile with several rows
instead of masking most of it off, and the kernels compile once per tile
shape, a function of S's power of two (and of C's when C is small): a handful
per network, not one per feature-map size.

Kernels (layout after Liger-Kernel):

- ``_bn_accumulate_fwd_kernel``: grid ``(row blocks, spatial blocks)``,
  elementwise ``acc + w·(z - mean)·invstd`` on a tile.
- ``_bn_accumulate_bwd_reduce_kernel``: grid ``(C, Pn, Ps)``; program
  ``(c, pn, ps)`` loops over its share of channel ``c``'s samples ``n`` (chunk
  ``pn``) and spatial blocks (chunk ``ps``), offsets ``n·C·S + c·S + s``, and
  writes partial ``Σdy`` and ``Σdy·x̂`` to ``[C, Pn·Ps]`` buffers that torch
  sums afterwards, so the result does not depend on scheduling (no atomics),
  as in Liger's rms_norm backward. ``Pn·Ps ≤ MAX_PARTIALS_PER_CHANNEL``.
- ``_bn_accumulate_bwd_dz_kernel``: the forward's grid, elementwise ``∂L/∂z``.

Offsets are 64-bit (a search batch of feature maps can exceed 2^31 elements).
Grids respect CUDA's limits, axis 0 ≤ 2^31 - 1 and axes 1, 2 ≤ 65535
(``MAX_GRID``): rows and channels, the large counts, are on axis 0, and every
kernel loops with a grid stride over the blocks of an axis the grid does not
cover (one iteration at the usual sizes).

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

# Elements per tile (powers of two). Fixed: a constexpr that followed the
# shape would recompile the kernels for every feature-map size of the network.
# The launchers read these (and the limits below) at call time, so tests can
# make them small.
ELEMENTWISE_BLOCK = 1024
REDUCE_BLOCK = 1024
# Narrowest tile: rows shorter than this share a tile with masked tails.
MIN_SPATIAL_BLOCK = 16
# Upper bound on the partial sums per channel: enough programs to fill a GPU
# for the usual C of a DARTS cell, few enough that the torch sum is trivial.
MAX_PARTIALS_PER_CHANNEL = 64
# CUDA's grid limits: programs along axis 0, and along axes 1 and 2.
MAX_GRID = (2**31 - 1, 65535, 65535)


if HAS_TRITON:

    @triton.jit
    def _tile_rows(row_block, R, C, ROWS: tl.constexpr):
        """Rows of a tile (64-bit), their mask, and their channels: one scalar
        % per tile; ROWS <= C, so the tile's channels wrap at most once."""
        first_row = row_block * ROWS
        rows = first_row + tl.arange(0, ROWS).to(tl.int64)
        channel = first_row % C + tl.arange(0, ROWS)
        channel = tl.where(channel >= C, channel - C, channel)
        return rows, rows < R, channel

    @triton.jit
    def _tile_offsets(rows, row_mask, s_block, S, BLOCK_S: tl.constexpr):
        """Element offsets ``row·S + s`` of one spatial block of a tile, and their mask."""
        s = s_block * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
        return rows[:, None] * S + s[None, :], row_mask[:, None] & (s < S)[None, :]

    @triton.jit
    def _bn_accumulate_fwd_kernel(acc_ptr, z_ptr, mean_ptr, invstd_ptr, weight_ptr, out_ptr,
                                  R, C, S, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
        compute_dtype = acc_ptr.dtype.element_ty
        # The weight stays on the device: reading it on the host would sync.
        weight = tl.load(weight_ptr)
        # 64-bit loop bounds make the row index int64 when compiled (the
        # interpreter iterates over Python ints): row·S can exceed 2^31.
        for row_block in range(tl.program_id(0).to(tl.int64), tl.cdiv(R, ROWS), tl.num_programs(0)):
            rows, row_mask, channel = _tile_rows(row_block, R, C, ROWS)
            mean = tl.load(mean_ptr + channel, mask=row_mask, other=0.0)[:, None]
            invstd = tl.load(invstd_ptr + channel, mask=row_mask, other=0.0)[:, None]
            for s_block in range(tl.program_id(1).to(tl.int64), tl.cdiv(S, BLOCK_S), tl.num_programs(1)):
                offsets, mask = _tile_offsets(rows, row_mask, s_block, S, BLOCK_S)
                acc = tl.load(acc_ptr + offsets, mask=mask, other=0.0)
                z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
                tl.store(out_ptr + offsets, acc + weight * ((z - mean) * invstd), mask=mask)

    @triton.jit
    def _bn_accumulate_bwd_reduce_kernel(dy_ptr, z_ptr, mean_ptr, invstd_ptr, s1_partial_ptr, s2_partial_ptr,
                                         N, C, S, CS, n_blocks_per_partial, s_blocks_per_partial,
                                         ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
        # Partial (pn, ps) of a channel: samples [pn·n_blocks_per_partial·ROWS, ...)
        # times spatial blocks [ps·s_blocks_per_partial, ...), clipped to N and S.
        pn = tl.program_id(1).to(tl.int64)
        ps = tl.program_id(2).to(tl.int64)
        num_ps = tl.num_programs(2)
        num_partials = tl.num_programs(1) * num_ps
        partial = pn * num_ps + ps
        n_block_begin = pn * n_blocks_per_partial
        n_block_end = tl.minimum(n_block_begin + n_blocks_per_partial, tl.cdiv(N, ROWS))
        s_block_begin = ps * s_blocks_per_partial
        s_block_end = tl.minimum(s_block_begin + s_blocks_per_partial, tl.cdiv(S, BLOCK_S))
        compute_dtype = s1_partial_ptr.dtype.element_ty
        for channel in range(tl.program_id(0).to(tl.int64), C, tl.num_programs(0)):
            mean = tl.load(mean_ptr + channel)
            invstd = tl.load(invstd_ptr + channel)
            # Per-lane sums, reduced once at the end: shorter addition chains
            # than one running scalar, and a fixed order.
            sum_dy = tl.zeros([ROWS, BLOCK_S], dtype=compute_dtype)
            sum_dy_xhat = tl.zeros([ROWS, BLOCK_S], dtype=compute_dtype)
            for n_block in range(n_block_begin, n_block_end):
                n = n_block * ROWS + tl.arange(0, ROWS).to(tl.int64)
                # Row n·C + channel of the [N·C, S] view.
                row_start = n * CS + channel * S
                n_mask = n < N
                for s_block in range(s_block_begin, s_block_end):
                    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
                    offsets = row_start[:, None] + s[None, :]
                    mask = n_mask[:, None] & (s < S)[None, :]
                    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
                    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
                    # Masked lanes have dy = 0, so they add nothing to either sum.
                    sum_dy += dy
                    sum_dy_xhat += dy * ((z - mean) * invstd)
            tl.store(s1_partial_ptr + channel * num_partials + partial, tl.sum(tl.sum(sum_dy, axis=1), axis=0))
            tl.store(s2_partial_ptr + channel * num_partials + partial,
                     tl.sum(tl.sum(sum_dy_xhat, axis=1), axis=0))

    @triton.jit
    def _bn_accumulate_bwd_dz_kernel(dy_ptr, z_ptr, mean_ptr, invstd_ptr, weight_ptr, s1_ptr, s2_ptr, dz_ptr,
                                     R, C, S, M, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
        compute_dtype = s1_ptr.dtype.element_ty
        weight = tl.load(weight_ptr)
        for row_block in range(tl.program_id(0).to(tl.int64), tl.cdiv(R, ROWS), tl.num_programs(0)):
            rows, row_mask, channel = _tile_rows(row_block, R, C, ROWS)
            mean = tl.load(mean_ptr + channel, mask=row_mask, other=0.0)[:, None]
            invstd = tl.load(invstd_ptr + channel, mask=row_mask, other=0.0)[:, None]
            mean_dy = (tl.load(s1_ptr + channel, mask=row_mask, other=0.0) / M)[:, None]
            mean_dy_xhat = (tl.load(s2_ptr + channel, mask=row_mask, other=0.0) / M)[:, None]
            for s_block in range(tl.program_id(1).to(tl.int64), tl.cdiv(S, BLOCK_S), tl.num_programs(1)):
                offsets, mask = _tile_offsets(rows, row_mask, s_block, S, BLOCK_S)
                dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
                z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
                xhat = (z - mean) * invstd
                dz = weight * invstd * (dy - mean_dy - xhat * mean_dy_xhat)
                tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _channels_and_spatial(z: torch.Tensor) -> tuple[int, int]:
    return z.shape[1], math.prod(z.shape[2:])


def _tile(S: int, block: int, max_rows: int | None = None) -> tuple[int, int]:
    """``(ROWS, BLOCK_S)`` of a tile of at most ``block`` elements for rows of
    length S: BLOCK_S is the power of two covering S, within
    [MIN_SPATIAL_BLOCK, block]; ROWS fills the rest, at most ``max_rows``
    (rounded down to a power of two)."""
    block_s = min(block, max(MIN_SPATIAL_BLOCK, triton.next_power_of_2(S)))
    rows = block // block_s
    if max_rows is not None:
        rows = min(rows, 1 << (max_rows.bit_length() - 1))
    return rows, block_s


def _elementwise_launch(R: int, C: int, S: int) -> tuple[tuple[int, int], int, int]:
    """Grid and tile of the forward and dz kernels over the ``[R, S]`` rows.
    At most C rows per tile: the kernels wrap the channel index only once."""
    rows, block_s = _tile(S, ELEMENTWISE_BLOCK, max_rows=C)
    grid = (min(triton.cdiv(R, rows), MAX_GRID[0]), min(triton.cdiv(S, block_s), MAX_GRID[1]))
    return grid, rows, block_s


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device; make it the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def bn_accumulate_triton(acc: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                         weight: torch.Tensor) -> torch.Tensor:
    """``acc + w · (z - mean) · invstd`` (see ``bn_accumulate_ref``)."""
    check_args("bn_accumulate", z, mean, invstd, weight, acc=acc)
    acc, z, mean, invstd, weight = (t.contiguous() for t in (acc, z, mean, invstd, weight))
    out = torch.empty_like(acc)
    if z.numel() == 0:
        return out
    C, S = _channels_and_spatial(z)
    R = z.shape[0] * C
    grid, rows, block_s = _elementwise_launch(R, C, S)
    with _on_device_of(z):
        _bn_accumulate_fwd_kernel[grid](acc, z, mean, invstd, weight, out, R, C, S, ROWS=rows, BLOCK_S=block_s)
    return out


def bn_accumulate_backward_triton(dy: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                                  weight: torch.Tensor, compute_dz: bool = True
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂L/∂z, ∂L/∂w)``, ``∂L/∂z`` empty unless ``compute_dz`` (see
    ``bn_accumulate_backward_ref``)."""
    check_args("bn_accumulate_backward", z, mean, invstd, weight, dy=dy)
    dy, z, mean, invstd, weight = (t.contiguous() for t in (dy, z, mean, invstd, weight))
    acc_dtype = accumulator_dtype(z.dtype)
    if z.numel() == 0:
        dz = torch.empty_like(z) if compute_dz else z.new_empty(0)
        return dz, torch.zeros((), dtype=acc_dtype, device=z.device)
    N = z.shape[0]
    C, S = _channels_and_spatial(z)
    # Each channel's N × S elements, in tiles of rows × block_s, split among
    # num_n × num_s partials: along the samples first, then along S.
    rows, block_s = _tile(S, REDUCE_BLOCK)
    n_blocks, s_blocks = triton.cdiv(N, rows), triton.cdiv(S, block_s)
    num_n = min(n_blocks, MAX_PARTIALS_PER_CHANNEL, MAX_GRID[1])
    num_s = min(s_blocks, max(1, MAX_PARTIALS_PER_CHANNEL // num_n), MAX_GRID[2])
    n_blocks_per_partial, s_blocks_per_partial = triton.cdiv(n_blocks, num_n), triton.cdiv(s_blocks, num_s)
    # No empty partials: e.g. 5 blocks in chunks of 2 is 3 partials, not 4.
    num_n, num_s = triton.cdiv(n_blocks, n_blocks_per_partial), triton.cdiv(s_blocks, s_blocks_per_partial)
    s1_partial = torch.empty((C, num_n * num_s), dtype=acc_dtype, device=z.device)
    s2_partial = torch.empty((C, num_n * num_s), dtype=acc_dtype, device=z.device)
    with _on_device_of(z):
        _bn_accumulate_bwd_reduce_kernel[(min(C, MAX_GRID[0]), num_n, num_s)](
            dy, z, mean, invstd, s1_partial, s2_partial, N, C, S, C * S, n_blocks_per_partial,
            s_blocks_per_partial, ROWS=rows, BLOCK_S=block_s)
    s1 = s1_partial.sum(1)
    s2 = s2_partial.sum(1)
    dweight = s2.sum()
    if not compute_dz:
        return z.new_empty(0), dweight
    dz = torch.empty_like(z)
    R = N * C
    grid, rows, block_s = _elementwise_launch(R, C, S)
    with _on_device_of(z):
        _bn_accumulate_bwd_dz_kernel[grid](dy, z, mean, invstd, weight, s1, s2, dz, R, C, S, N * S,
                                           ROWS=rows, BLOCK_S=block_s)
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
