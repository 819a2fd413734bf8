"""DARTS-' auxiliary skip connection (Chu et al., ICLR 2021; SPEC §8).

Every mixed op adds ``β_t·aux(x)``: aux is the identity on stride-1 edges
and a FactorizedReduce (affine=False) on stride-2 edges, created before the
candidate ops as in the authors' code (``Meituan-AutoML/DARTS-``,
``model_search.MixedOp``), so weights copy across positionally. β_t falls
linearly from 1 to 0: ``β_t = 1 − t/D`` in epoch t (0-based), the original's
``DecayScheduler(decay_type='linear')`` stepped at the start of each epoch
(src/utils.py:181-188, src/search/train_search.py:107). D is
``--aux-skip-epochs`` (the original's ``decay_max_epoch``, default 50,
src/search/args.py:82), by default the run's epochs E as the paper's text
states; the ``darts-`` preset takes the original's 50. Past D, β_t stays 0
(the original's formula would turn negative until its ``decay_stop_epoch``;
with its defaults, D = stop = 50 = E, that never happens). The skip carries the gradient the candidate skip
connection would otherwise win with, so the α of ``skip_connect`` no longer
grows unchecked; β_t reaching 0 leaves the supernet DARTS' own.

β_t lives in a device tensor (``SearchNetwork.aux_skip_weight``) that the
loop fills each epoch: no host value is baked into a step.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from ..errors import FastDartsError
from ..fused_mixed_op import fused_single_op
from ..method import Option, SearchMethod, register_method
from ..mixed_op_reference import running_stats_frozen_context
from ..ops import FactorizedReduce, Identity


def aux_skip_weight(epoch: int, decay_epochs: int) -> float:
    """β_t of epoch ``epoch`` (0-based) of a decay over ``decay_epochs`` (0 after it)."""
    return max(0.0, 1.0 - epoch / decay_epochs)


def make_aux_op(C: int, stride: int) -> nn.Module:
    return FactorizedReduce(C, C, affine=False) if stride == 2 else Identity()


def _aux_with_params(aux: nn.Module, names: list[str], x: torch.Tensor, weight: torch.Tensor,
                     *params: torch.Tensor) -> torch.Tensor:
    return weight * functional_call(aux, dict(zip(names, params)), (x,))


def aux_output(aux: nn.Module, backend: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight · aux(x)`` on ``backend``: the reference keeps what autograd
    keeps; ``checkpoint`` recomputes the FactorizedReduce; ``fused`` runs it
    as a one-op fused edge (keeps x and the BN statistics only)."""
    if type(aux) is Identity:
        return weight * x  # keeps x, which the edge keeps anyway
    if backend == "fused":
        return fused_single_op(aux, x, weight.reshape(1), stride=2)
    if backend == "checkpoint" and torch.is_grad_enabled():
        names, params = zip(*aux.named_parameters())
        return checkpoint(_aux_with_params, aux, list(names), x, weight, *params, use_reentrant=False,
                          preserve_rng_state=False, context_fn=lambda: running_stats_frozen_context(aux))
    return weight * aux(x)


@register_method
class AuxiliarySkip(SearchMethod):
    """The auxiliary skip as an edge term, weighted by the network's ``aux_skip_weight`` buffer."""

    name = "aux-skip"
    options = (Option("aux_skip", False, "DARTS-: every mixed op adds an auxiliary skip connection weighted "
                      "1 - t/D in epoch t (FactorizedReduce on stride-2 edges)", kind="flag"),
               Option("aux_skip_epochs", None, "DARTS-: the epochs D over which the auxiliary skip's weight "
                      "decays to 0 (default: the run's epochs; the original's decay_max_epoch is 50)",
                      kind="positive_int", metavar="D"))

    @classmethod
    def active(cls, config) -> bool:
        return bool(config.aux_skip)

    @classmethod
    def check(cls, config, from_preset):
        d = config.aux_skip_epochs
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d <= 0):
            raise FastDartsError(f"aux-skip-epochs must be a positive integer, got {d!r}")
        if d is not None and not config.aux_skip:
            raise FastDartsError("aux-skip-epochs sets the auxiliary skip's decay: it needs --aux-skip")
        return dict(aux_skip=bool(config.aux_skip), aux_skip_epochs=d)

    def decay_epochs(self, epochs: int | None) -> int | None:
        return self.config.aux_skip_epochs or epochs

    def setup_network(self, model) -> list:
        # β_t, filled each epoch (a tensor: nothing baked into a step); not in the
        # state_dict, since the epoch decides it.
        model.register_buffer("aux_skip_weight", torch.ones(()), persistent=False)
        return []

    def attach_to_edge(self, edge, C: int, stride: int) -> None:
        edge.auxiliary_op = make_aux_op(C, stride)  # before the ops, as DARTS-' code registers it

    def add_to_edge(self, edge, x, y, split, scale, extras, params: Sequence[torch.Tensor] | None = None):
        weight = extras.get("aux_skip_weight")
        if weight is None:  # a discrete sub-network (op weights given): no auxiliary skip
            return y
        if scale is not None:
            weight = weight * scale
        if params is not None:  # a recompute: the forward's tensors, the reference's arithmetic
            names = [n for n, _ in edge.auxiliary_op.named_parameters()]
            return y + weight * functional_call(edge.auxiliary_op, dict(zip(names, params)), (x,))
        return y + aux_output(edge.auxiliary_op, edge.backend, x, weight)

    def term_parameters(self, edge) -> list:
        return list(edge.auxiliary_op.named_parameters())

    def forward_extras(self, model) -> dict:
        return {"aux_skip_weight": model.aux_skip_weight}

    def network_epoch(self, model, seed, epoch, epochs, stage_epoch) -> None:
        if epochs is None:
            raise FastDartsError("the auxiliary skip's β_t needs the number of epochs: start_epoch(seed, epoch, epochs)")
        with torch.no_grad():
            model.aux_skip_weight.fill_(aux_skip_weight(epoch if stage_epoch is None else stage_epoch,
                                                        self.decay_epochs(epochs)))

    def epoch_figures(self, run, entry: dict) -> dict:
        stage_epoch = entry.get("stage_epoch", entry["epoch"]) - 1
        return {"aux_skip_weight": aux_skip_weight(stage_epoch, self.decay_epochs(self.config.epochs))}
