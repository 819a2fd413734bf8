"""Meta (shape-only) kernels for the ATen ops the fused backend uses that
ship without one, so that whole search steps run on the ``meta`` device: a
step that reads a tensor value on the host fails there, which is how the
tests prove a step free of host synchronisation.

Registered only where ATen has no Meta kernel of its own.
"""
from __future__ import annotations

import torch

_LIBRARY: torch.library.Library | None = None


def _batch_norm_update_stats_meta(input, running_mean, running_var, momentum):
    channels = input.shape[1]
    return input.new_empty((channels,)), input.new_empty((channels,))


def register() -> None:
    global _LIBRARY
    if _LIBRARY is not None or torch._C._dispatch_has_kernel_for_dispatch_key(
            "aten::batch_norm_update_stats", "Meta"):
        return
    _LIBRARY = torch.library.Library("aten", "IMPL")
    _LIBRARY.impl("batch_norm_update_stats", _batch_norm_update_stats_meta, "Meta")


register()
