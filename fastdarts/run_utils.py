"""Helpers shared by the long-running loops (search and training from scratch).

Both loops pick a device the same way, anneal the learning rate the same way,
seed the global generators the same way and write their checkpoints and logs
atomically; keeping these in one place keeps the two loops' behaviour (and
their error messages) identical.
"""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .errors import FastDartsError


def cosine_lr(epoch: int, epochs: int, lr: float, lr_min: float) -> float:
    """The weights' learning rate in ``epoch`` (0-based): cosine from ``lr`` to
    ``lr_min``, as CosineAnnealingLR stepped at the start of each epoch."""
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise FastDartsError(f"unknown device {name!r} ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise FastDartsError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastDartsError(f"device {name!r} asked for, but this torch sees no CUDA device")
    return device


def steps_per_epoch(batches: int, max_steps: int | None) -> int:
    """The batches an epoch runs: all of them, or ``--max-steps`` if fewer."""
    return batches if max_steps is None else min(max_steps, batches)


class EpochProgress:
    """Running loss and accuracy of an epoch's training batches, summed on the
    device, and the progress bar that shows them. Nothing is read on the host
    before the epoch ends: on a GPU the bar shows the sums of an earlier step,
    copied to pinned memory without waiting (shown once the copy has landed),
    so the steps never wait for the device; on the CPU there is nothing to wait for."""

    def __init__(self, device: torch.device, total: int, desc: str, show: bool):
        from tqdm.auto import tqdm

        self.device = torch.device(device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0
        self.bar = tqdm(total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True)
        self._snapshot = None  # (pinned host copy of the sums, its CUDA event, images it covers)

    def update(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        self.loss_sum += loss * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)
        if not self.bar.disable:
            self._show()
            self.bar.update()

    def _show(self) -> None:
        if self.device.type != "cuda":
            if self.device.type == "cpu":
                self._postfix(self.loss_sum.item(), self.correct.item(), self.seen)
            return
        if self._snapshot is not None:
            host, event, seen = self._snapshot
            if not event.query():  # the earlier copy has not landed: keep showing what is there
                return
            self._postfix(host[0].item(), host[1].item(), seen)
        host = torch.empty(2, dtype=torch.float64, pin_memory=True)
        host.copy_(torch.stack([self.loss_sum.double(), self.correct.double()]), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._snapshot = (host, event, self.seen)

    def _postfix(self, loss_sum: float, correct: float, seen: int) -> None:
        self.bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}", refresh=False)

    def close(self) -> None:
        self.bar.close()

    def sum_over_ranks(self, all_reduce_sum: Callable[[list[torch.Tensor]], None], *extra: torch.Tensor) -> None:
        """In a multi-process run, this rank's sums (and ``extra`` sums) become
        every rank's, added in place by ``all_reduce_sum`` (one collective; the
        function is passed in, as ``distributed`` builds on this module)."""
        seen = torch.tensor(self.seen, device=self.device)
        all_reduce_sum([self.loss_sum, self.correct, seen, *extra])
        self.seen = int(seen.item())

    def summary(self) -> dict:
        """``train_loss`` and ``train_acc`` (percent) over the epoch's batches."""
        return dict(train_loss=self.loss_sum.item() / self.seen, train_acc=100 * self.correct.item() / self.seen)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every group's learning rate; one held in a device tensor
    (``cuda_graph.hold_lr_on_device``) is filled in place, so a captured graph sees it."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_fast_options(device: torch.device, bf16: bool | None, channels_last: bool | None, *,
                         bf16_default: bool = True) -> tuple[bool, bool]:
    """``(bf16, channels_last)`` with None resolved to the default for ``device``:
    channels-last on for CUDA, off on the CPU; bf16 likewise (where the GPU
    supports it) when ``bf16_default``, else off unless asked for."""
    cuda = device.type == "cuda"
    if bf16 is None:
        bf16 = bf16_default and cuda and torch.cuda.is_bf16_supported()
    return bool(bf16), (cuda if channels_last is None else bool(channels_last))


def check_finite_settings(config) -> None:
    """Every float field of a configuration dataclass is finite: ``--lr inf``
    passes ``> 0`` and would run a whole epoch of NaN before anyone noticed."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise FastDartsError(f"{f.name.replace('_', '-')} must be a finite number, got {value!r}")


def check_finite_epoch(entry: dict, keys: Iterable[str], checkpoint: Path, hint: str) -> None:
    """Ends a run whose epoch ``entry`` holds a non-finite loss, before that
    epoch is written: the checkpoint keeps the last finite epoch (``hint``
    names the settings to lower)."""
    bad = [f"{key} {entry[key]}" for key in keys if entry.get(key) is not None and not math.isfinite(entry[key])]
    if bad:
        done = entry["epoch"] - 1
        kept = f"{checkpoint} keeps epoch {done}" if done else "no checkpoint was written"
        raise FastDartsError(f"epoch {entry['epoch']} diverged ({', '.join(bad)}): the run stops here and {kept}; "
                             f"{hint}")
