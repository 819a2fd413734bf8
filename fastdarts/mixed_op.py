"""The mixed operation of a supernet edge and its interchangeable backends.

``MixedOp`` owns one module per candidate op; *how* ``Σ_k w_k·op_k(x)`` is
evaluated is a backend, chosen by name:

- ``reference`` (``mixed_op_reference.py``): exactly the original DARTS
  code, every op's activations kept for backward. The executable spec every
  other backend is tested against.
- ``checkpoint`` (``mixed_op_checkpoint.py``): the reference under
  ``torch.utils.checkpoint``, the memory saver a user would try first.
- ``fused`` (``fused_mixed_op.py``): one autograd Function per edge that
  keeps no op activations and recomputes the ops one at a time in backward,
  with the fused BN kernels (``kernels/``). The default.

A backend is a function ``(mixed_op, x, weights, paths) -> y`` in
``MIXED_OP_BACKENDS``. ``paths`` (None: every op) is a tuple of op indices
(a method's ``op_weights`` chooses them): only those ops are computed,
``weights`` holding one weight per path; the first path is the active one,
the others contribute their gate gradient only.

An edge may carry a ``scale`` (a method's ``edge_scales``): ``reference``
multiplies the edge output by it, as the original code; the others fold it
into the op weights (``Σ_k (s·w_k)·o_k``), so nothing more is kept for its
gradient. Methods add terms to an edge's output (``method.SearchMethod``:
``attach_to_edge``, ``split_edge``, ``add_to_edge``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .errors import FastDartsError
from .fused_mixed_op import mixed_op_fused
from .mixed_op_checkpoint import mixed_op_checkpoint
from .mixed_op_reference import (mixed_op_reference, reference_with_params,  # noqa: F401  (re-exported)
                                 running_stats_frozen_context)
from .ops import OPS

DEFAULT_BACKEND = "fused"


class MixedOp(nn.Module):
    """One supernet edge: every candidate op, mixed by the op weights.

    ``terms``: the methods that add a term to the edge's output (each
    registers its modules here, before the ops, as the original codes do)."""

    def __init__(self, C: int, stride: int, op_names: Sequence[str], backend: str = DEFAULT_BACKEND,
                 terms: Sequence = ()):
        super().__init__()
        self.op_names = tuple(op_names)
        self.stride = stride
        self.terms = tuple(terms)
        for term in self.terms:
            term.attach_to_edge(self, C, stride)
        self.ops = nn.ModuleList()
        for name in self.op_names:
            op = OPS[name](C, stride, False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self.ops.append(op)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, paths: tuple[int, ...] | None = None,
                scale: torch.Tensor | None = None, extras: dict | None = None) -> torch.Tensor:
        """``scale``: the edge's weight; ``extras``: tensors the edge terms read (``forward_extras``)."""
        if scale is not None:
            if self.backend == "reference":
                return scale * self.mixed(x, weights, paths, None, extras)
            weights = weights * scale
        return self.mixed(x, weights, paths, scale, extras)

    def mixed(self, x: torch.Tensor, weights: torch.Tensor, paths: tuple[int, ...] | None = None,
              scale: torch.Tensor | None = None, extras: dict | None = None) -> torch.Tensor:
        """The ops' weighted sum on this edge's backend, plus the methods' terms
        (``scale``: folded into the terms, None when applied outside)."""
        if not self.terms:
            return MIXED_OP_BACKENDS[self.backend](self, x, weights, paths)
        weights, splits = self.split_terms(x, weights, paths)
        y = MIXED_OP_BACKENDS[self.backend](self, x, weights, paths)
        return self.add_terms(x, y, splits, scale, extras)

    def split_terms(self, x: torch.Tensor, weights: torch.Tensor, paths: tuple[int, ...] | None):
        """Each term's ``split_edge``, in order: (the op weights the backend sees, what each term keeps)."""
        splits = []
        for term in self.terms:
            weights, kept = term.split_edge(self, x, weights, paths)
            splits.append(kept)
        return weights, splits

    def add_terms(self, x: torch.Tensor, y: torch.Tensor, splits, scale: torch.Tensor | None,
                  extras: dict | None, params: Sequence | None = None) -> torch.Tensor:
        """``y`` plus each term's ``add_to_edge`` (``params``: per term, its parameter tensors to use)."""
        for i, (term, kept) in enumerate(zip(self.terms, splits)):
            y = term.add_to_edge(self, x, y, kept, scale, extras or {}, None if params is None else params[i])
        return y

    def term_parameters(self) -> list[list[tuple[str, torch.Tensor]]]:
        """Per term, the (name, tensor) of the parameters it uses on this edge."""
        return [term.term_parameters(self) for term in self.terms]

    @property
    def draws_random_numbers(self) -> bool:
        """Whether a training forward of this edge draws random numbers (a recompute must replay them)."""
        return self.training and any(term.edge_draws_random_numbers(self) for term in self.terms)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, backend={self.backend!r}"


MixedOpBackend = Callable[[MixedOp, torch.Tensor, torch.Tensor, "tuple[int, ...] | None"], torch.Tensor]

MIXED_OP_BACKENDS: dict[str, MixedOpBackend] = {
    "reference": mixed_op_reference,
    "checkpoint": mixed_op_checkpoint,
    "fused": mixed_op_fused,
}


def check_backend(name: str) -> str:
    if name not in MIXED_OP_BACKENDS:
        raise FastDartsError(f"unknown backend {name!r}; known backends: {', '.join(MIXED_OP_BACKENDS)}")
    return name
