"""Refuse a network that cannot fit the device, before anything real is built.

``--channels 100000000`` used to die in the allocator after a minute, and
``--layers 100000`` to sit silent for minutes building the supernet. The
checks here estimate the memory a run's step needs (measured on a busy
2-core machine: under a second for the paper's supernet, most of it
building its modules on meta; a tenth of a second for its training network;
2 to 4 seconds for an absurd one, "what fits" included) and raise one
``FastDartsError`` line, naming the estimate, the device's memory and what
fits, when the estimate exceeds what the device has:

- ``check_search_size(config, dataset, device)``: the supernet of a search
  (``search_loop.build_supernet``) and its step (SGD on the weights, Adam on
  α, first or second order);
- ``check_train_size(config, dataset, device)``: the ``NetworkCIFAR`` (or,
  ``kind="imagenet"``, ``NetworkImageNet``) of a training run and its SGD
  step (auxiliary head and drop path included);
- ``check_eval_size(spec, device, batch=...)``: the network a weights file
  describes (``spec()``, of either kind) and a no-grad forward at the batch;
  ``batch=None``: its weights only (what building it takes);
- ``check_fits(what, build, ...)``: the same for any model builder.

How the estimate is made
------------------------
The network is built on the ``meta`` device (shapes, no storage, no random
draws: the global generators are left exactly as they were) and run forward
on a meta batch of ``PROFILE_BATCH`` images:

- weights: parameter values × 4 bytes (fp32) and buffer bytes; the parameters
  count ``1 + extra_copies`` times (gradients, SGD momentum, the second-order
  step's saved weights and unrolled gradient; see ``_COPIES``), buffers once;
- activations: the bytes of every tensor autograd saves for backward during
  one forward (``torch.autograd.graph.saved_tensors_hooks``), each storage
  once (meta tensors all have ``data_ptr() == 0``, so storages are told apart
  by their ``StorageImpl`` address, ``untyped_storage()._cdata``; views of one
  storage count once; parameters and buffers are not counted again), scaled
  linearly from ``PROFILE_BATCH`` to the batch. A no-grad evaluation keeps
  nothing for backward: there it is the peak of the bytes alive at once
  during the forward (tracked per storage), plus the input batch. A search
  forward is measured with both α and the weights requiring grad (the
  second-order step's validation pass, the largest of a step's passes).

Depth: a run of N normal cells has the same cell from its third one on (same
channels in, same channels out, same resolution), so the network is built
with every run cut to 3 cells and that third cell counted ``N - 2`` times:
100000 layers cost what 11 do. Width: parameter counts are exactly quadratic
and activations affine in C (every channel count is linear in C), so "what
fits" is solved on a fit through three small widths (exact integer
arithmetic) and then confirmed by an estimate at the suggested width. A width
whose parameters alone surely exceed the memory (a closed-form lower bound,
``cells × C² / 2`` values, which each cell's 1x1 ``preprocess1`` conv alone
reaches) is never built, even on meta: its estimate comes from the fit.

Safety margin, on the side of letting runs start: the estimate leaves out
what comes and goes within a step (backward's gradient buffers, kernel
workspaces, allocator fragmentation, the CUDA context, the data set on the
device), so it is close to a lower bound of the real peak, and a run is
refused only when this estimate alone exceeds the device's memory. A refused
run cannot fit; a run close to the limit may pass and still run out. (On the
CPU, real steps peaked at 1.06x the estimate for a reference-backend search,
1.1x for training and 1.8x for a fused-backend search, whose backward
rebuilds each op's output.) A check that cannot estimate a network at all
warns and lets the run start. Estimates of the paper's settings: its search
(C=16, 8 cells, batch 64, second order) 7.5 GiB with the reference backend,
0.24 GiB with the fused one; its training (C=36, 20 cells, batch 96, fp32)
6.5 GiB; its evaluation at batch 256 0.7 GiB.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
import weakref
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .edge_ops import full_edge_ops
from .errors import FastDartsError
from .eval_network import NETWORKS, build_network
from .genotype import Genotype, num_edges
from .layout import layout_string, reduction_layout
from .ops import OPS
from .supernet import build_supernet

PROFILE_BATCH = 2          # images in the meta forward (BatchNorm in training needs 2 on 1x1 maps)
BYTES_PER_VALUE = 4        # fp32 weights and activations
# Weight-sized copies of the parameters beside the parameters themselves, per step:
# search, first order: the gradients and SGD's momentum;
# search, second order: those, the weights saved across the virtual step and the
#   unrolled gradient (train_grads, then v = ∇w' L_val; Architect._second_order);
# training: the gradients and SGD's momentum; evaluation: none.
_COPIES = {"first": 2, "second": 4, "train": 2, "eval": 0}
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")


# ------------------------------------------------------------------ device memory

def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


# Where the host's memory is read (module attributes, so that tests can point them elsewhere).
_MEMINFO = "/proc/meminfo"
_CGROUP_LIMITS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _host_available_bytes() -> int:
    """MemAvailable (what the kernel can hand out without swapping), else
    the physical memory; a smaller cgroup limit, less the cgroup's usage, wins."""
    available = None
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            available = 1 << 62  # unknown: do not refuse
    for limit_path, usage_path in _CGROUP_LIMITS:
        limit = _read_int(limit_path)
        if limit is not None and limit < available:
            available = max(0, limit - (_read_int(usage_path) or 0))
    return available


def device_memory_bytes(device: torch.device | str) -> int:
    """Bytes a new allocation on ``device`` can still get.

    CUDA: the driver's free memory (``torch.cuda.mem_get_info``, which already
    leaves out other processes and the CUDA context) plus what this process's
    caching allocator holds reserved but unallocated (free to us, though not
    to the driver). Deliberately not ``total - reserved``: another process's
    tensors on the same GPU are as unavailable as our own. CPU (and any other
    device, e.g. MPS's unified memory): the host's available memory
    (``/proc/meminfo`` MemAvailable, else page size × physical pages),
    limited by a cgroup's ``memory.max`` less its usage when that is smaller.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return int(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))
    return _host_available_bytes()


def format_bytes(n: float) -> str:
    """``5.2 TiB``, ``23.4 GiB``, ``512 B`` (``10^400 B`` past a float's range)."""
    if n >= 1024 ** len(_UNITS):  # past YiB (and maybe past a float's range): a power of ten
        return f"10^{len(str(int(n))) - 1} B"
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _where(device: torch.device) -> str:
    if device.type == "cuda":
        return f"free on {device}"
    if device.type == "cpu":
        return "available on this CPU"
    return f"available to {device} (host memory)"


# ------------------------------------------------------------------ meta profiling

class _MetaShapes(TorchDispatchMode):
    """Speeds up a meta build and forward and, optionally, tracks the bytes alive.

    Many meta kernels are Python decompositions (BatchNorm's alone takes
    ~3 ms a call), and a supernet repeats the same op on the same shapes on
    every edge: the output shapes of ops that return fresh tensors (no
    mutation, no alias) are computed once per argument signature and then
    made with ``empty_strided``. An in-place op that leaves its tensor's
    shape alone (``uniform_``, ``add_``, ...) does nothing on a meta tensor:
    it returns the tensor at once. ``track_live``: the peak of the bytes of
    the storages the ops' outputs keep alive (for a no-grad forward)."""

    _kinds: dict[Any, int] = {}
    _FRESH, _INPLACE, _OTHER = 0, 1, 2
    # In-place ops that change their tensor's shape or strides: always run.
    _RESHAPING = {"resize_", "resize_as_", "as_strided_", "set_", "squeeze_", "unsqueeze_", "transpose_", "t_",
                  "swapdims_", "swapaxes_", "detach_", "unsafe_split", "_coalesced_", "sparse_resize_"}

    def __init__(self, track_live: bool = False):
        super().__init__()
        self.cache: dict[tuple, Any] = {}
        self.track_live = track_live
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    @classmethod
    def _kind(cls, func) -> int:
        kind = cls._kinds.get(func)
        if kind is None:
            schema = func._schema
            returns, arguments = schema.returns, schema.arguments
            if not schema.is_mutable and returns and all(
                    r.alias_info is None and str(r.type) == "Tensor" for r in returns):
                kind = cls._FRESH
            elif (len(returns) == 1 and returns[0].alias_info is not None and returns[0].alias_info.is_write
                  and arguments and arguments[0].name == "self" and str(arguments[0].type) == "Tensor"
                  and arguments[0].alias_info is not None and arguments[0].alias_info.is_write
                  and not any(a.alias_info is not None and a.alias_info.is_write for a in arguments[1:])
                  and func._schema.name.split("::")[-1] not in cls._RESHAPING
                  and "resize" not in func._schema.name):
                kind = cls._INPLACE
            else:
                kind = cls._OTHER
            cls._kinds[func] = kind
        return kind

    @staticmethod
    def _key(values, out: list) -> None:
        for v in values:
            if isinstance(v, torch.Tensor):
                out.append((v.shape, v.stride(), v.dtype, v.device.type))
            elif isinstance(v, (list, tuple)):
                out.append("[")
                _MetaShapes._key(v, out)
                out.append("]")
            else:
                hash(v)  # TypeError: not cacheable
                out.append(v)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind(func)
        if kind == self._INPLACE and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            return args[0]
        if kind == self._FRESH:
            key: list | tuple | None = [func]
            try:
                self._key(args, key)
                if kwargs:
                    self._key(sorted(kwargs.items()), key)
                key = tuple(key)
            except TypeError:
                key = None
            shapes = self.cache.get(key) if key is not None else None
            if shapes is not None:
                made = tuple(torch.empty_strided(size, stride, dtype=dtype, device="meta")
                             for size, stride, dtype in shapes[1])
                out = made if shapes[0] else made[0]
            else:
                out = func(*args, **kwargs)
                outs = _tensors(out)
                if key is not None and all(t.device.type == "meta" for t in outs):
                    self.cache[key] = (isinstance(out, tuple), [(t.shape, t.stride(), t.dtype) for t in outs])
        else:
            out = func(*args, **kwargs)
        if self.track_live:
            for t in _tensors(out):
                self._hold(t)
        return out

    def _hold(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                self.current -= entry[0]
                del self.live[key]


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


@dataclass(frozen=True)
class _Profile:
    """Counts of one meta network at ``PROFILE_BATCH`` images: per cell of
    ``model.cells`` (in order) and for the rest (stem, heads, loss)."""
    cell_params: tuple[int, ...]        # parameter values (fp32)
    cell_buffers: tuple[int, ...]       # buffer bytes (BatchNorm statistics and counters)
    cell_activations: tuple[int, ...]   # saved-for-backward bytes attributed to each cell
    other_params: int
    other_buffers: int
    other_activations: int
    grad: bool                          # a training forward (saved bytes), else a no-grad one
    peak_activations: int               # no-grad: the peak of the bytes alive at once, input included

    def totals(self, weights: Sequence[int]) -> tuple[int, int, int]:
        """(parameters, buffer bytes, activation bytes) with cell i counted ``weights[i]`` times
        (a no-grad forward's peak is one cell's, however many cells there are)."""
        def total(cells, other):
            return other + sum(w * v for w, v in zip(weights, cells))
        activations = (total(self.cell_activations, self.other_activations) if self.grad
                       else self.peak_activations)
        return (total(self.cell_params, self.other_params), total(self.cell_buffers, self.other_buffers),
                activations)


def _default_loss(out, y):
    if isinstance(out, tuple):  # the eval networks: (logits, logits_aux or None)
        loss = F.cross_entropy(out[0], y)
        return loss if len(out) < 2 or out[1] is None else loss + 0.4 * F.cross_entropy(out[1], y)
    return F.cross_entropy(out, y)


class _Saved:
    """What the pack hook hands autograd: the saved tensor and the cell it was
    saved in. It lives as long as autograd keeps the tensor for backward."""
    __slots__ = ("tensor", "cell", "__weakref__")

    def __init__(self, tensor: torch.Tensor, cell: int):
        self.tensor, self.cell = tensor, cell


def _profile(build: Callable[[], nn.Module], input_shape: Sequence[int], *, grad: bool,
             prepare: Callable[[nn.Module], None] | None = None) -> _Profile:
    """Build on meta and run one forward of ``PROFILE_BATCH`` images: with
    ``grad``, in training mode with every parameter requiring grad, counting
    the bytes autograd still holds for backward at the end of the forward
    (each storage once; a branch whose graph is dropped, e.g. a detached
    path, holds nothing); without, in eval mode under no_grad, the peak of
    the bytes alive. Leaves the global random generators as they were."""
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"), _MetaShapes():
            model = build()
            if prepare is not None:
                prepare(model)
        cells = list(getattr(model, "cells", ()))
        n = len(cells)
        cell_params = tuple(sum(p.numel() for p in c.parameters()) for c in cells)
        cell_buffers = tuple(sum(b.numel() * b.element_size() for b in c.buffers()) for c in cells)
        other_params = sum(p.numel() for p in model.parameters()) - sum(cell_params)
        other_buffers = sum(b.numel() * b.element_size() for b in model.buffers()) - sum(cell_buffers)
        x = torch.empty(PROFILE_BATCH, *input_shape, device="meta")
        y = torch.zeros(PROFILE_BATCH, dtype=torch.long, device="meta")
        current = [n]                    # the cell running; n: outside the cells
        hooks = []

        def enter(index):
            def hook(module, args):
                current[0] = index
            return hook

        for i, cell in enumerate(cells):
            hooks.append(cell.register_forward_pre_hook(enter(i)))
        for name in ("auxiliary_head", "global_pooling", "classifier"):
            module = getattr(model, name, None)
            if isinstance(module, nn.Module):
                hooks.append(module.register_forward_pre_hook(enter(n)))
        boxes: list[weakref.ref] = []

        def pack(t: torch.Tensor) -> _Saved:
            box = _Saved(t, current[0])
            boxes.append(weakref.ref(box))
            return box

        def forward(mode: _MetaShapes):
            if not grad:
                with mode, torch.no_grad():
                    model(x)
                return None
            with mode, torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
                return _default_loss(model(x), y)

        try:
            model.train(grad)
            for p in model.parameters():
                p.requires_grad_(grad)
            mode = _MetaShapes(track_live=not grad)
            try:
                # Outside the device context, which costs a Python call per torch call;
                loss = forward(mode)
            except (RuntimeError, TypeError, NotImplementedError):
                # inside it if the model makes tensors without saying where.
                boxes.clear()
                current[0] = n
                mode = _MetaShapes(track_live=not grad)
                with torch.device("meta"):
                    loss = forward(mode)
        finally:
            for h in hooks:
                h.remove()
        saved = [0] * (n + 1)
        if grad:
            # Storages autograd still holds (alive boxes keep theirs alive: no address is reused among them).
            owned = {t.untyped_storage()._cdata for t in chain(model.parameters(), model.buffers())}
            counted: set[int] = set()
            for ref in boxes:
                box = ref()
                if box is None:
                    continue
                storage = box.tensor.untyped_storage()
                key = storage._cdata
                if key not in owned and key not in counted:
                    counted.add(key)
                    saved[box.cell] += storage.nbytes()
            del loss
            peak = 0
        else:
            peak = mode.peak + x.numel() * x.element_size()
    return _Profile(cell_params, cell_buffers, tuple(saved[:n]), other_params, other_buffers, saved[n], grad, peak)


# ------------------------------------------------------------------ depth

def _compress(reductions: Sequence[bool]) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """The layout with every run of normal cells cut to 3, and how many
    cells of the full layout each cell of the cut one stands for (the third
    cell of a run stands for the rest of the run: from the third cell of a
    run on, every cell has the same inputs, widths and resolution)."""
    cells: list[bool] = []
    weights: list[int] = []
    run = 0
    for reduction in reductions:
        run = 0 if reduction else run + 1
        if not reduction and run > 3:
            weights[-1] += 1
            continue
        cells.append(bool(reduction))
        weights.append(1)
    return tuple(cells), tuple(weights)


def _standard_layout(layers: int) -> tuple[bool, ...]:
    return reduction_layout(layers)


def _standard_cut(layers: int) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """``_compress(reduction_layout(layers))`` without building the layout:
    from 11 cells on it is always the 11-cell layout (3 normal cells, R, 3,
    R, 3), the third cell of each run standing for the rest of its run."""
    if layers < 11:
        return _compress(_standard_layout(layers))
    runs = (layers // 3, 2 * layers // 3 - layers // 3 - 1, layers - 2 * layers // 3 - 1)
    weights = [1] * 11
    weights[2], weights[6], weights[10] = (run - 2 for run in runs)
    return _standard_layout(11), tuple(weights)



def _cells(layout) -> int:
    return layout if isinstance(layout, int) else len(layout)


# ------------------------------------------------------------------ estimates

@dataclass(frozen=True)
class SizeEstimate:
    """What one step of a network needs (bytes), as the checks estimate it."""
    parameters: int          # parameter values (buffers not included)
    weight_bytes: int        # fp32 parameters × (1 + extra copies) + buffers
    activation_bytes: int    # a step's activations at the batch
    memory_bytes: int        # what the device has (device_memory_bytes)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.memory_bytes


def _bytes(params: int, buffer_bytes: int, activations_b0: int, *, batch: int, copies: int, factor: float,
           extra_activation_bytes: int = 0) -> tuple[int, int]:
    """(weight bytes, activation bytes) from profile counts."""
    weight = params * (1 + copies) * BYTES_PER_VALUE + buffer_bytes
    # Exact (integers, Fractions): an absurd size must not overflow a float on its way to the message.
    activation = math.ceil(Fraction(activations_b0 * batch, PROFILE_BATCH) * Fraction(factor)) + extra_activation_bytes
    return weight, activation


def _quadratic(points: Sequence[tuple[int, int]]) -> Callable[[int], Fraction]:
    """The polynomial of degree ≤ 2 through three (x, y) points (exact)."""
    (x0, y0), (x1, y1), (x2, y2) = points

    def value(x: int) -> Fraction:
        return (Fraction(y0 * (x - x1) * (x - x2), (x0 - x1) * (x0 - x2))
                + Fraction(y1 * (x - x0) * (x - x2), (x1 - x0) * (x1 - x2))
                + Fraction(y2 * (x - x0) * (x - x1), (x2 - x0) * (x2 - x1)))
    return value


def _largest(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """The largest n in [lo, hi] with ``fits(n)`` (fits monotone: true, then false), or None."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Sizer:
    """Estimates for one family of networks: ``make(C, layout)`` gives a
    builder of the network of width C and cell layout ``layout`` (a tuple of
    reduction flags), or None where the family cannot take that layout. The
    methods take a network's layout as such a tuple or as an int: a depth
    with reductions at L//3 and 2L//3 (cut in closed form, however deep)."""

    def __init__(self, make: Callable[[int, tuple[bool, ...]], Callable[[], nn.Module] | None],
                 input_shape: Sequence[int], *, grad: bool, copies: int, factor: float = 1.0,
                 extra_activation_bytes_per_param: float = 0.0, channel_step: int = 1,
                 prepare: Callable[[nn.Module], None] | None = None):
        self.make, self.input_shape, self.grad, self.copies = make, tuple(input_shape), grad, copies
        self.factor, self.per_param = factor, extra_activation_bytes_per_param
        self.step, self.prepare = channel_step, prepare
        self.count_weights = True   # False: the weights are already resident (their bytes not counted)
        self._profiles: dict[tuple, _Profile] = {}
        self._fits: dict[tuple, tuple] = {}

    def _layout_for(self, layout) -> tuple[tuple[bool, ...], tuple[int, ...]]:
        """The cut layout to build and how many cells each of its cells stands for."""
        if isinstance(layout, int):
            return _standard_cut(layout)
        compressed, weights = _compress(layout)
        if self.make(self.step, compressed) is None:  # the family cannot build the cut layout
            return tuple(layout), (1,) * len(layout)
        return compressed, weights

    def profile(self, C: int, layout: tuple[bool, ...]) -> _Profile:
        key = (C, layout)
        if key not in self._profiles:
            self._profiles[key] = _profile(self.make(C, layout), self.input_shape, grad=self.grad,
                                           prepare=self.prepare)
        return self._profiles[key]

    def counts(self, C: int, layout, memory: int) -> tuple[int, int, int]:
        """(parameters, buffer bytes, activation bytes at PROFILE_BATCH) of the full network at width C."""
        lower_bound = _cells(layout) * C * C // 2 * BYTES_PER_VALUE
        layout, weights = self._layout_for(layout)
        if lower_bound <= memory or C <= 3 * self.step:
            return self.profile(C, layout).totals(weights)
        # Surely too big (and maybe too big for meta tensors' int64 sizes): from the fit in C.
        fit = self._fit(layout, weights)
        return tuple(math.ceil(f(C)) for f in fit)

    def _fit(self, layout, weights):
        key = (layout, weights)
        if key not in self._fits:
            widths = [self.step, 2 * self.step, 3 * self.step]
            samples = [self.profile(c, layout).totals(weights) for c in widths]
            self._fits[key] = tuple(_quadratic([(c, s[i]) for c, s in zip(widths, samples)]) for i in range(3))
        return self._fits[key]

    def split(self, counts: tuple[int, int, int], batch: int) -> tuple[int, int]:
        """(weight bytes, activation bytes) of profile counts at ``batch`` images."""
        params, buffers, activations = counts
        weight, activation = _bytes(params, buffers, activations, batch=batch, copies=self.copies,
                                    factor=self.factor,
                                    extra_activation_bytes=math.ceil(params * Fraction(self.per_param)))
        return (weight if self.count_weights else 0), activation

    def estimate(self, C: int, layout, batch: int, memory: int) -> SizeEstimate:
        counts = self.counts(C, layout, memory)
        return SizeEstimate(counts[0], *self.split(counts, batch), memory)

    # -- what fits ------------------------------------------------------------
    def largest_batch(self, C, layout, batch, memory) -> int | None:
        counts = self.counts(C, layout, memory)
        return _largest(1, batch - 1, lambda b: sum(self.split(counts, b)) <= memory)

    def largest_channels(self, C, layout, batch, memory) -> int | None:
        if C <= self.step or not self.estimate(self.step, layout, batch, memory).fits:
            return None  # not even the narrowest network fits: no fit needed
        fit = self._fit(*self._layout_for(layout))

        def fits_fit(m):
            return sum(self.split(tuple(math.ceil(f(m * self.step)) for f in fit), batch)) <= memory

        m = _largest(1, (C - 1) // self.step, fits_fit)
        # Confirmed by the estimate itself (a step down if the fit was off).
        for _ in range(4):
            if m is None or self.estimate(m * self.step, layout, batch, memory).fits:
                break
            m = m - max(1, m // 10) if m > 1 else None
        return None if m is None else m * self.step

    def largest_layers(self, C, layers: int, batch, memory) -> int | None:
        """The most cells (reductions at L//3 and 2L//3) at width C, searched
        from 11 on, where one profile of the 11-cell cut serves every depth."""
        if layers <= 11 or 11 * C * C // 2 * BYTES_PER_VALUE > memory:  # (the lower bound of ``counts``)
            return None
        profile = self.profile(C, _standard_layout(11))
        return _largest(11, layers - 1,
                        lambda L: sum(self.split(profile.totals(_standard_cut(L)[1]), batch)) <= memory)


def _refusal(what: str, estimate: SizeEstimate, device: torch.device, advice: Sequence[str], *,
             weights: str = "weights, gradients and optimiser state") -> FastDartsError:
    """The one line: what needs how much (weights / activations), what the device has, and ``advice``."""
    if estimate.activation_bytes:
        needs = (f"about {format_bytes(estimate.total_bytes)} ({format_bytes(estimate.weight_bytes)} of {weights}, "
                 f"{format_bytes(estimate.activation_bytes)} of activations)")
    else:
        needs = f"about {format_bytes(estimate.weight_bytes)} for its {weights}"
    line = f"{what} needs {needs}, more than the {format_bytes(estimate.memory_bytes)} {_where(device)}"
    return FastDartsError(f"{line}; {', or '.join(advice)}" if advice else line)


def _per_rank(batch: int, world_size: int) -> int:
    return max(1, -(-batch // max(1, world_size)))


def _suggest(sizer: _Sizer, C: int, layout, per_rank: int, memory: int, *, world_size: int,
             min_batch: int = 1) -> list[str]:
    """What fits instead: fewer channels, fewer cells (a standard depth only), a smaller batch."""
    out = []
    channels = sizer.largest_channels(C, layout, per_rank, memory)
    if channels is not None:
        out.append(f"at most --channels {channels} fits at this depth and batch")
    if isinstance(layout, int):
        layers = sizer.largest_layers(C, layout, per_rank, memory)
        if layers is not None:
            out.append(f"at most --layers {layers} fits at these channels and batch")
    batch = sizer.largest_batch(C, layout, per_rank, memory)
    if batch is not None and batch * world_size >= min_batch:
        out.append(f"at most --batch-size {batch * world_size} fits at these channels and depth")
    return out or ["no smaller --channels, --layers or --batch-size fits either"]


# ------------------------------------------------------------------ public checks

def _fail_open(check):
    """A check that cannot estimate a network (a model the meta device cannot
    run, say) warns and lets the run start rather than stopping it: only a
    refusal (``FastDartsError``) stops a run."""
    @functools.wraps(check)
    def checked(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except FastDartsError:
            raise
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"fastdarts: the memory check could not estimate this network "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); not checked",
                          RuntimeWarning, stacklevel=2)
            return None
    return checked


@_fail_open
def check_fits(what: str, build: Callable[[], nn.Module], *, batch: int, input_shape: Sequence[int],
               device: torch.device | str, extra_copies: int = 0, activation_factor: float = 1.0,
               training: bool = True, hint: str | Callable[[SizeEstimate], str | None] | None = None
               ) -> SizeEstimate | None:
    """Refuse ``build()``'s model if one step at ``batch`` cannot fit ``device``.

    ``build`` is called under ``torch.device("meta")`` (so it must create its
    tensors on the default device); the model's forward takes a batch of
    ``[batch, *input_shape]`` and returns logits (or a tuple, the first its
    logits). ``training``: estimate a training step (activations saved for
    backward, parameters × (1 + ``extra_copies``)); else a no-grad forward.
    ``activation_factor`` scales the activations (0.5: bf16). Raises a
    one-line ``FastDartsError`` naming ``what``, the estimate, the device's
    memory and ``hint`` (a string, or a function of the estimate giving one);
    returns the estimate when it fits (None, with a warning, when the model
    cannot be estimated: the checks never stop a run for their own failure)."""
    device = torch.device(device)
    memory = device_memory_bytes(device)
    profile = _profile(build, input_shape, grad=training)
    params, buffers, activations = profile.totals((1,) * len(profile.cell_params))
    weight, activation = _bytes(params, buffers, activations, batch=batch, copies=extra_copies,
                                factor=activation_factor)
    estimate = SizeEstimate(params, weight, activation, memory)
    if not estimate.fits:
        text = hint(estimate) if callable(hint) else hint
        raise _refusal(what, estimate, device, [text] if text else [],
                       weights="weights, gradients and optimiser state" if extra_copies else "weights")
    return estimate


@functools.lru_cache(maxsize=None)
def _op_size(name: str) -> int:
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return sum(p.numel() for p in OPS[name](8, 1, False).parameters())


def heaviest_ops(op_names: Sequence[str], n: int) -> tuple[str, ...]:
    """The ``n`` ops with the most parameters (ties: the later), in op-set order."""
    op_names = tuple(op_names)
    sizes = {name: _op_size(name) for name in op_names}
    ranked = sorted(range(len(op_names)), key=lambda i: (sizes[op_names[i]], i), reverse=True)[:n]
    chosen = tuple(op_names[i] for i in sorted(ranked))
    return chosen


def _search_sizer(config, dataset, edge_ops, copies: int) -> _Sizer:
    def make(C, layout):
        cfg = dataclasses.replace(config, channels=C)
        return lambda: build_supernet(cfg, dataset, "meta", layout=layout_string(layout), edge_ops=edge_ops)

    def prepare(model):
        for m in model.methods:  # e.g. paths that would be drawn on the host from α's values
            m.prepare_size_estimate(model)

    step = config.channel_step()
    if getattr(config, "stem", None) == "imagenet":  # an even C (and its stem's 3C//2 linear in C)
        step = math.lcm(step, 2)
    return _Sizer(make, (dataset.in_channels, dataset.image_size, dataset.image_size), grad=True, copies=copies,
                  channel_step=step, prepare=prepare)


@_fail_open
def check_search_size(config, dataset, device: torch.device | str, *, world_size: int = 1,
                      layout: str | None = None, edge_ops: dict | None = None,
                      stage: int | None = None) -> SizeEstimate | None:
    """Refuse a search whose supernet and step cannot fit ``device``.

    ``config``: a ``SearchConfig`` (checked here if it is not yet);
    ``dataset``: anything with ``num_classes``, ``in_channels`` and
    ``image_size`` (a ``Dataset``); ``world_size``: ranks sharing each global
    batch (each holds ``batch_size / world_size`` images). ``layout`` and
    ``edge_ops``: one stage's cells and edges, as ``build_supernet``
    takes them (``stage``: its 0-based index, for the message). Without them
    every stage of the run is checked; a later stage's edges, not known
    before the stage before it ends, are taken to keep their heaviest ops.
    Returns the estimate of the largest stage."""
    config = config.checked()
    device = torch.device(device)
    memory = device_memory_bytes(device)
    per_rank = _per_rank(config.batch_size, world_size)
    ops = config.ops.split(",")
    if layout is not None:
        stages = [(layout, edge_ops, stage)]
    else:
        stages = []
        for index, (stage_layout, n_ops) in enumerate(config.stage_layouts()):
            chosen = (full_edge_ops(ops, num_edges(config.steps)) if n_ops >= len(ops) else
                      {cell: (heaviest_ops(ops, n_ops),) * num_edges(config.steps) for cell in ("normal", "reduce")})
            stages.append((stage_layout, None if index == 0 else chosen,
                           index if config.stage_plan() is not None else None))
    copies = _COPIES[config.order]
    largest = None
    for stage_layout, stage_edges, index in stages:
        reductions = reduction_layout(None, stage_layout)
        cells = len(reductions)
        # A layout --layers would give is searched as that depth (so --layers can be suggested).
        standard = index is None and stage_layout == layout_string(reduction_layout(cells))
        sizer = _search_sizer(config, dataset, stage_edges, copies)
        layout_arg = cells if standard else reductions
        estimate = sizer.estimate(config.channels, layout_arg, per_rank, memory)
        if not estimate.fits:
            whose = "the supernet" if index is None else f"stage {index + 1}'s supernet"
            what = (f"{whose} (C={config.channels}, {cells} cells, batch {config.batch_size}"
                    f"{f' over {world_size} ranks' if world_size > 1 else ''}, {config.backend} backend, "
                    f"{config.order} order)")
            raise _refusal(what, estimate, device, _suggest(sizer, config.channels, layout_arg, per_rank, memory,
                                                            world_size=world_size))
        if largest is None or estimate.total_bytes > largest.total_bytes:
            largest = estimate
    return largest


def _network_sizer(genotype, *, num_classes: int, auxiliary: bool, in_channels: int, image_size: int,
                   grad: bool, copies: int, bf16: bool, drop_path_prob: float = 0.0, kind: str = "cifar") -> _Sizer:
    def make(C, layout):
        for layers in range(1, len(layout) + 1):  # the networks take a depth, not a layout
            if _standard_layout(layers) == layout:
                return lambda: build_network(kind, genotype, C=C, num_classes=num_classes, layers=layers,
                                             auxiliary=auxiliary, in_channels=in_channels, image_size=image_size)
        return None

    def prepare(model):
        model.drop_path_prob = drop_path_prob

    # bf16 autocast: activations in half the bytes, plus each forward's bf16 copy of the weights.
    # NetworkImageNet takes an even C only (and its stem's C//2 is then linear in C).
    return _Sizer(make, (in_channels, image_size, image_size), grad=grad, copies=copies,
                  factor=0.5 if bf16 else 1.0, extra_activation_bytes_per_param=2.0 if bf16 and grad else 0.0,
                  channel_step=2 if kind == "imagenet" else 1, prepare=prepare)


@_fail_open
def check_train_size(config, dataset, device: torch.device | str, *, world_size: int = 1,
                     kind: str | None = None) -> SizeEstimate | None:
    """Refuse a training run whose network and SGD step cannot fit ``device``.

    ``config``: a ``TrainConfig`` (checked here if it is not yet; its
    ``bf16`` None counts as off); ``dataset``: anything with
    ``num_classes``, ``in_channels`` and ``image_size``; ``kind``: the
    network's (``eval_network.build_network``; None: the config's
    ``network``, else "cifar"). The drop-path probability is taken at its
    final (largest) value."""
    config = config.checked()
    kind = (getattr(config, "network", None) or "cifar") if kind is None else kind
    device = torch.device(device)
    memory = device_memory_bytes(device)
    per_rank = _per_rank(config.batch_size, world_size)
    sizer = _network_sizer(config.genotype, num_classes=dataset.num_classes, auxiliary=config.auxiliary,
                           in_channels=dataset.in_channels, image_size=dataset.image_size, grad=True,
                           copies=_COPIES["train"], bf16=bool(config.bf16), drop_path_prob=config.drop_path_prob,
                           kind=kind)
    estimate = sizer.estimate(config.channels, config.layers, per_rank, memory)
    if not estimate.fits:
        what = (f"the network (C={config.channels}, {config.layers} cells, batch {config.batch_size}"
                f"{f' over {world_size} ranks' if world_size > 1 else ''})")
        raise _refusal(what, estimate, device, _suggest(sizer, config.channels, config.layers, per_rank, memory,
                                                        world_size=world_size,
                                                        min_batch=2 if config.auxiliary else 1))
    return estimate


@_fail_open
def check_eval_size(spec: Mapping[str, Any], device: torch.device | str, *, batch: int | None = None,
                    world_size: int = 1, bf16: bool = False, include_weights: bool = True,
                    source: str | None = None) -> SizeEstimate | None:
    """Refuse to build or evaluate the network a weights file describes.

    ``spec``: a network's ``spec()`` dict (as stored in the file; a
    malformed one is left for ``eval_network.network_from_spec`` to report).
    ``batch=None``: its weights only (before building it on ``device``);
    else also a no-grad forward of ``batch`` images (``world_size`` ranks
    sharing it; ``bf16``: under bf16 autocast). ``include_weights=False``:
    the network is already on ``device``, its weights already out of the
    free memory: count the forward's activations only. ``source``: the
    file, for the message."""
    device = torch.device(device)
    memory = device_memory_bytes(device)
    try:
        genotype = Genotype.from_dict(spec["genotype"])
        kind = spec.get("kind", "cifar")  # none: a file from before there were two kinds
        if kind not in NETWORKS or (kind == "imagenet" and int(spec["channels"]) % 2):
            raise ValueError(kind)
        C, layers = int(spec["channels"]), int(spec["layers"])
        shape = dict(num_classes=int(spec["num_classes"]), auxiliary=bool(spec["auxiliary"]),
                     in_channels=int(spec["in_channels"]), image_size=int(spec["image_size"]))
    except Exception:  # noqa: BLE001 - network_from_spec reports a malformed spec
        return SizeEstimate(0, 0, 0, memory)
    if min(C, layers, *(v for k, v in shape.items() if k != "auxiliary")) <= 0:
        return SizeEstimate(0, 0, 0, memory)
    sizer = _network_sizer(genotype, **shape, grad=False, copies=_COPIES["eval"], bf16=bf16, kind=kind)
    sizer.count_weights = include_weights
    per_rank = _per_rank(batch, world_size) if batch else 0
    estimate = sizer.estimate(C, layers, per_rank, memory)
    if not estimate.fits:
        where = f" in {source}" if source else ""
        what = f"the network{where} (C={C}, {layers} cells{f', batch {batch}' if batch else ''})"
        if not batch or estimate.weight_bytes > memory or not estimate.activation_bytes:
            advice = [("its weights alone do not fit: " if batch else "") + "evaluate it on a device with more memory"]
        else:
            largest = sizer.largest_batch(C, layers, per_rank, memory)
            advice = [f"at most --batch-size {largest * world_size} fits" if largest else
                      "not even one image fits: evaluate it on a device with more memory"]
        raise _refusal(what, estimate, device, advice, weights="weights")
    return estimate
