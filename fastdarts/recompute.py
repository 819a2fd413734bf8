"""Recompute granularity of the supernet (``SearchNetwork(recompute=...)``).

- ``edge``: what the mixed-op backend keeps for backward (``fused``: each
  edge's input and two numbers per channel and op; the node states, sums of
  edge outputs, stay alive as the next edges' inputs).
- ``cell``: each cell keeps only its two inputs (the previous cells'
  outputs) and rebuilds its node states in backward, one cell at a time
  (``torch.utils.checkpoint`` around the cell, with any backend inside);
  the stem keeps only the images (its conv output, kept for its BatchNorm,
  is as large as a cell's input). The FactorizedReduce of a cell after a
  reduction cell runs before that reduction cell, which puts its backward
  after the reduction cell's (``SearchNetwork.forward``).
  Same loss, gradients and BatchNorm statistics: the recompute freezes the
  running statistics (the forward moved them), and runs from the parameter
  tensors the forward used, passed as arguments, not read from the modules
  again (a ``functional_call`` or a reload may have swapped them by then),
  and with the forward's random state (a method's edge term that draws).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from .errors import FastDartsError
from .mixed_op_reference import running_stats_frozen_context

RECOMPUTE_MODES = ("edge", "cell")


def check_recompute(mode: str) -> str:
    if mode not in RECOMPUTE_MODES:
        raise FastDartsError(f"unknown recompute mode {mode!r}; known: {', '.join(RECOMPUTE_MODES)}")
    return mode


def _module_with_params(module: nn.Module, names: list[str], inputs: tuple, options: dict,
                        *params: torch.Tensor) -> torch.Tensor:
    return functional_call(module, dict(zip(names, params)), inputs, options)


def recompute_module(module: nn.Module, *inputs, **options) -> torch.Tensor:
    """``module(*inputs, **options)`` that keeps only ``inputs`` for backward
    and runs again, from the same parameter tensors, in backward
    (``options``: keyword arguments that are not tensors)."""
    names, params = zip(*module.named_parameters()) if any(True for _ in module.parameters()) else ((), ())
    return checkpoint(
        _module_with_params, module, list(names), inputs, options, *params,
        use_reentrant=False,
        # Random numbers are drawn only by an edge term (a method's): the
        # recompute must then draw the forward's masks.
        preserve_rng_state=module.training and any(getattr(m, "draws_random_numbers", False) is True
                                                   for m in module.modules()),
        context_fn=lambda: running_stats_frozen_context(module),
    )


def recompute_cell(cell: nn.Module, s0: torch.Tensor, s1: torch.Tensor, *arguments,
                   s0_preprocessed: bool = False) -> torch.Tensor:
    """``cell(s0, s1, *arguments)`` that keeps only its inputs for backward
    (``arguments``: the op weights, edge scales, paths and extras of the cell;
    ``s0_preprocessed``: s0 is the output of ``cell.preprocess_ahead``)."""
    return recompute_module(cell, s0, s1, *arguments, s0_preprocessed=s0_preprocessed)
