"""The ``checkpoint`` mixed-op backend: the reference under ``torch.utils.checkpoint``.

The memory saver a user would try first: nothing inside the edge is kept,
everything is recomputed in backward. The recompute runs the ops again, so
BatchNorm would update its running statistics twice; tracking is frozen for
the recompute (fairscale's ``patch_batchnorm`` idea), keeping the statistics
identical to ``reference``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import FastDartsError
from .mixed_op_reference import mixed_op_reference, reference_with_params, running_stats_frozen_context

# A subset of ops (paths) would change what is recomputed between passes.
PATHS_UNSUPPORTED = ("the checkpoint backend computes every op of an edge; sampled paths need --backend fused or "
                     "reference")


def mixed_op_checkpoint(mixed: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                        paths: tuple[int, ...] | None = None) -> torch.Tensor:
    """``reference`` under ``torch.utils.checkpoint``: nothing inside the edge is
    kept, everything is recomputed in backward."""
    if paths is not None:
        raise FastDartsError(PATHS_UNSUPPORTED)
    if not torch.is_grad_enabled():
        return mixed_op_reference(mixed, x, weights)
    # The parameters are arguments, so the recompute uses the forward's tensors:
    # by backward time a functional_call or a reload may have swapped them.
    named = [list(op.named_parameters()) for op in mixed.ops]
    return checkpoint(
        reference_with_params, mixed, [[n for n, _ in ps] for ps in named], x, weights,
        *(p for ps in named for _, p in ps),
        use_reentrant=False,
        # Nothing inside draws random numbers (an edge term that does draws outside, in
        # MixedOp.mixed), so saving RNG state is waste.
        preserve_rng_state=False,
        context_fn=lambda: running_stats_frozen_context(mixed),
    )
