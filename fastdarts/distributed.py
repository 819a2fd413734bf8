"""Runs over several processes, launched by ``torchrun`` (SPEC §10).

``torchrun --standalone --nproc_per_node N --no-python fastdarts-train ...``
starts N copies of a command with RANK, WORLD_SIZE and LOCAL_RANK (and the
rendezvous address) in their environment. ``setup`` turns that environment
into a ``DistContext`` and a process group: NCCL with one GPU per local rank
(``cuda:LOCAL_RANK``) when the device is CUDA, gloo on the CPU. Without
torchrun, or with a single process, it returns the single-process context
and creates no group: every helper here is then a no-op, so a run computes
exactly what it always did. A group that the calling program initialised
itself is used as it is, and left for it to destroy.

Timeout: every collective gives up after FASTDARTS_DIST_TIMEOUT seconds
(default 120). A rank that dies closes its connections, and with gloo the
others fail at their next collective at once; a rank that hangs makes them
fail when the timeout has passed. ``collective_failures`` turns either into
``RankLost``, which the command line prints as one line before it exits with
status 3. (With NCCL, PyTorch's watchdog may end the process itself once the
timeout has passed, with its own message. torchrun also stops the remaining
ranks as soon as one exits with an error.)

Helpers for the loops: ``all_reduce_sum_``, ``all_reduce_mean_`` and
``broadcast_`` work in place on a list of tensors with one collective per
(device, dtype) (the tensors are flattened into one buffer and copied back),
and ``bytes_all_reduced()`` counts what the all-reduces sent;
``per_rank_batch`` splits the global batch, ``shard_bounds`` is the part of
a batch one rank takes, ``data_parallel`` wraps a module in
DistributedDataParallel.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from .errors import FastDartsError
from .run_utils import resolve_device

DEFAULT_TIMEOUT_S = 120.0
TIMEOUT_ENV = "FASTDARTS_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run: its rank among ``world_size``
    processes, the collective backend (None in a single process) and its device."""
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = field(default=False, compare=False, repr=False)  # setup created it: shutdown destroys it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if not self.distributed:
            return "distributed: single process"
        return f"distributed: world size {self.world_size}, backend {self.backend}"


class RankLost(Exception):
    """A collective failed: another rank stopped or hung, so this one cannot go on."""


def timeout_seconds(env: Mapping[str, str] | None = None) -> float:
    """The collective timeout: FASTDARTS_DIST_TIMEOUT seconds, else 120."""
    env = os.environ if env is None else env
    text = env.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise FastDartsError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise FastDartsError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


def launch_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` this process was started with, before any group
    exists: those of an initialised group, else torchrun's RANK and WORLD_SIZE,
    else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ if env is None else env
    world, rank = _env_int(env, "WORLD_SIZE", 1), _env_int(env, "RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise FastDartsError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of a run")
    return rank, world


def _rank_device(device: str, local_rank: int) -> torch.device:
    """The device of a rank of a multi-process run: the CPU, or the GPU of its local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        return resolved
    if resolved.index is not None and resolved.index != local_rank:
        raise FastDartsError(f"--device {device}: under torchrun each rank uses the GPU of its local rank "
                             f"(here cuda:{local_rank}); pass --device cuda or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise FastDartsError(f"local rank {local_rank} has no GPU of its own: this machine has {count}; "
                             f"start at most {count} processes per machine (--nproc_per_node)")
    return torch.device("cuda", local_rank)


def setup(device: str = "auto", env: Mapping[str, str] | None = None) -> DistContext:
    """The context of this process, with its process group (see the module docstring).

    ``device`` is the run's ``--device``; in a multi-process run ``auto`` and
    ``cuda`` mean the GPU of the local rank."""
    env = os.environ if env is None else env
    timeout = timeout_seconds(env)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int(env, "LOCAL_RANK", rank)
        if world == 1:
            return DistContext(device=resolve_device(device), timeout_s=timeout)
        rank_device = _rank_device(device, local_rank)
        if rank_device.type == "cuda":  # NCCL's barrier otherwise guesses the device
            torch.cuda.set_device(rank_device)
        return DistContext(world, rank, local_rank, str(dist.get_backend()), rank_device, timeout)
    rank, world = launch_env(env)
    if world == 1:
        return DistContext(device=resolve_device(device), timeout_s=timeout)
    if not dist.is_available():
        raise FastDartsError("this torch was built without torch.distributed: run a single process")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise FastDartsError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: start the run with torchrun")
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    rank_device = _rank_device(device, local_rank)
    backend = "nccl" if rank_device.type == "cuda" else "gloo"
    if rank_device.type == "cuda":
        torch.cuda.set_device(rank_device)
    context = DistContext(world, rank, local_rank, backend, rank_device, timeout, owns_group=True)
    with collective_failures(context):
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
    return context


def shutdown(context: DistContext) -> None:
    """Destroy the process group if ``setup`` created it."""
    if context.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def launch(device: str = "auto") -> Iterator[DistContext]:
    """``setup`` on entry, ``shutdown`` on exit."""
    context = setup(device)
    try:
        yield context
    finally:
        shutdown(context)


# Words of the errors a collective raises when a peer has gone (gloo, NCCL, the store).
_FAILURE_WORDS = re.compile(r"gloo|nccl|processgroup|connection (reset|closed|refused)|timed out|timeout|"
                            r"broken pipe|socket|peer", re.IGNORECASE)


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective (or the rendezvous) failing, not a bug of this rank."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and bool(_FAILURE_WORDS.search(str(error)))


def _short(error: BaseException) -> str:
    """The gist of a backend's error: its first sentence, without the source location it starts with."""
    lines = str(error).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else type(error).__name__)
    return text.split(". ")[0].rstrip(".")


@contextlib.contextmanager
def collective_failures(context: DistContext) -> Iterator[None]:
    """Inside: a failed collective of a multi-process run is raised as ``RankLost``."""
    try:
        yield
    except RuntimeError as e:
        if not context.distributed or not is_collective_failure(e):
            raise
        raise RankLost(f"rank {context.rank} of {context.world_size} lost contact with the others: one of them "
                       f"stopped or hung ({_short(e)}; a collective gives up after {context.timeout_s:g} s, "
                       f"{TIMEOUT_ENV})") from e


def barrier(context: DistContext) -> None:
    """Wait until every rank gets here (nothing in a single process)."""
    if context.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_rank_first(context: DistContext) -> Iterator[None]:
    """Rank 0 runs the block before the others (a download into a shared folder, say)."""
    if not context.is_main:
        barrier(context)
    yield
    if context.is_main:
        barrier(context)


# ---------------------------------------------------------------- batches

def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Each rank's part of the global ``--batch-size``, which must split evenly."""
    if global_batch % world_size:
        lower = global_batch // world_size * world_size
        multiples = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
        raise FastDartsError(f"batch-size {global_batch} does not split evenly among {world_size} ranks: "
                             f"--batch-size is the global batch, so pass a multiple of {world_size} (e.g. {multiples})")
    return global_batch // world_size


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank's contiguous part of ``n`` items: equal parts,
    the first ``n % world_size`` ranks one item more (a short last batch)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def data_parallel(module: torch.nn.Module, context: DistContext) -> torch.nn.Module:
    """``module`` in DistributedDataParallel, or itself in a single process.

    Buffers (BatchNorm running statistics) are not synchronised at every
    forward: each rank's follow its own batches, and the training loop
    broadcasts rank 0's before it tests (what its checkpoint holds)."""
    if not context.distributed:
        return module
    ddp = torch.nn.parallel.DistributedDataParallel
    kwargs = dict(device_ids=[context.device.index] if context.device.type == "cuda" else None)
    # torch >= 2.13 renamed broadcast_buffers. Older versions with broadcast_buffers=False also leave
    # the buffers out of the initial sync: harmless here, every rank builds or loads the same ones.
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return ddp(module, **kwargs)


# ---------------------------------------------------------------- collectives

_all_reduced = {"bytes": 0}


def bytes_all_reduced() -> int:
    """Bytes passed to all-reduces by this module's helpers (per rank) since the last reset."""
    return _all_reduced["bytes"]


def reset_bytes_all_reduced() -> None:
    _all_reduced["bytes"] = 0


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()  # parameters may be among the tensors
def _coalesced(tensors: Sequence[torch.Tensor | None], collective) -> None:
    """Run ``collective(flat)`` once per (device, dtype) on the tensors
    flattened into one buffer, then copy the results back (None skipped)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        if len(group) == 1 and group[0].is_contiguous():
            collective(group[0])
            continue
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_sum_(tensors: Sequence[torch.Tensor | None], group=None) -> None:
    """Sum each tensor over the ranks, in place (exact for integer counts)."""
    if _world(group) == 1:
        return

    def reduce(flat: torch.Tensor) -> None:
        _all_reduced["bytes"] += flat.numel() * flat.element_size()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)

    _coalesced(tensors, reduce)


def all_reduce_mean_(tensors: Sequence[torch.Tensor | None], group=None) -> None:
    """Average each (floating-point) tensor over the ranks, in place: the sum,
    then one division, so every rank ends with the same bits."""
    world = _world(group)
    if world == 1:
        return
    bad = [t.dtype for t in tensors if t is not None and not t.is_floating_point()]
    if bad:
        raise TypeError(f"all_reduce_mean_ averages floating-point tensors, got {bad[0]}")
    all_reduce_sum_(tensors, group)
    with torch.no_grad():
        for t in tensors:
            if t is not None:
                t.div_(world)


def broadcast_(tensors: Sequence[torch.Tensor | None], src: int = 0, group=None) -> None:
    """Overwrite each tensor with rank ``src``'s, in place (initial weights, buffers)."""
    if _world(group) == 1:
        return
    _coalesced(tensors, lambda flat: dist.broadcast(flat, src=src, group=group))
