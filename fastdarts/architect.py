"""The architecture step of DARTS' bilevel optimisation (SPEC §2).

First order:  ``∇α L_val(w, α)``.
Second order: with the virtual step ``w' = w − ξ (μ·m + ∇w L_train(w, α) + λ·w)``
(ξ the weights' current learning rate, a float or a device tensor, μ their momentum, m the SGD momentum
buffer, λ their weight decay: exactly the SGD step the weights are about to
take, without clipping),

    ∇α L_val(w', α) − ξ · (∇α L_train(w⁺, α) − ∇α L_train(w⁻, α)) / (2ε),
    w± = w ± ε·∇w' L_val(w', α),   ε = 0.01 / ‖∇w' L_val(w', α)‖.

The original code builds a new network for w' on every step. Here the
weights are swapped in place and restored bit for bit from a saved copy, so
there is no model construction and no drift. The extra forward passes also
leave BatchNorm running statistics as they were: they are evaluated at
weights the network never takes, and only the weight step should move them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Protocol, Sequence

import torch
from torch import nn


class SearchModel(Protocol):
    def arch_parameters(self) -> list[nn.Parameter]: ...
    def weight_parameters(self) -> list[nn.Parameter]: ...
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...
    def buffers(self): ...


@contextlib.contextmanager
def frozen(params: Sequence[torch.nn.Parameter]):
    """No gradient for ``params`` inside: autograd neither keeps nor computes
    what only their gradient needs (every op output of every mixed op for
    ∂L/∂α in the weight passes; the weight gradients in the α-only passes)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients with zeros for parameters the loss does not reach (e.g. the
    reduction α of a network without reduction cells)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class Architect:
    """Adam on α, first or second order.

    Args:
        model: a ``SearchNetwork`` (anything with ``arch_parameters``,
            ``weight_parameters`` and ``loss``).
        weight_optimizer: the SGD optimiser of the weights; the second-order
            step reads its learning rate, momentum, weight decay and momentum
            buffers, so it always unrolls the step the weights really take.
        order: ``"first"`` or ``"second"``.
        grad_clip: clip the architecture gradient's norm to this before Adam
            (a method's preset may; None: no clipping, as DARTS).
        grad_reduce: in a multi-process run, averages a list of gradients
            over the ranks in place (``distributed.all_reduce_mean_``): the
            weights' train gradient before the virtual step, ∇w'L_val before
            ε, and the architecture gradient once; None in one process.
    """

    def __init__(self, model: SearchModel, weight_optimizer: torch.optim.SGD, order: str = "second",
                 lr: float = 3e-4, betas: tuple[float, float] = (0.5, 0.999), weight_decay: float = 1e-3,
                 grad_reduce: Callable[[list[torch.Tensor]], None] | None = None, grad_clip: float | None = None):
        if order not in ("first", "second"):
            raise ValueError(f"order must be 'first' or 'second', got {order!r}")
        groups = weight_optimizer.param_groups
        if len(groups) != 1 or groups[0].get("nesterov") or groups[0].get("dampening", 0) != 0 \
                or groups[0].get("maximize"):
            # The virtual step below is plain SGD with momentum and weight decay on one group.
            raise ValueError("Architect unrolls one param group of plain SGD (no nesterov, dampening or maximize)")
        if order == "second" and not getattr(model, "supports_second_order", True):
            raise ValueError("this model's methods have a first-order architecture step only (order='first')")
        self.model = model
        self.weight_optimizer = weight_optimizer
        self.order = order
        self.grad_reduce = grad_reduce or (lambda tensors: None)
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=lr, betas=betas, weight_decay=weight_decay)

    def step(self, x_train, y_train, x_val, y_val) -> torch.Tensor:
        """One Adam step on α; returns the validation loss (detached): at the
        current weights w for first order, at the virtual weights w' for second."""
        grads, val_loss = self.arch_gradients(x_train, y_train, x_val, y_val)
        for alpha, g in zip(self.model.arch_parameters(), grads):
            alpha.grad = g
        if self.grad_clip is not None:  # after the all-reduce: every rank clips the same gradient
            torch.nn.utils.clip_grad_norm_(self.model.arch_parameters(), self.grad_clip)
        # A method may adjust the update (path sampling: skip edges, rescale α).
        before, after = getattr(self.model, "before_arch_update", None), getattr(self.model, "after_arch_update", None)
        saved = before(self.optimizer) if before is not None else None
        self.optimizer.step()
        if after is not None:
            after(self.optimizer, saved)
        return val_loss

    def arch_gradients(self, x_train, y_train, x_val, y_val) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The architecture gradient of this step and the validation loss,
        leaving weights, α and BN statistics unchanged."""
        buffers = list(self.model.buffers())
        with torch.no_grad():
            saved_buffers = [b.clone() for b in buffers]
        try:
            if self.order == "first":
                with frozen(self.model.weight_parameters()):
                    loss = self.model.loss(x_val, y_val)
                    grads = _grads(self._with_arch_terms(loss), self.model.arch_parameters())
                self.grad_reduce(grads)
                return grads, loss.detach()
            return self._second_order(x_train, y_train, x_val, y_val)
        finally:
            with torch.no_grad():
                if buffers:
                    torch._foreach_copy_(buffers, saved_buffers)  # one launch, not one per buffer

    def _with_arch_terms(self, val_loss: torch.Tensor) -> torch.Tensor:
        """The architecture step's objective: the validation loss plus the
        methods' terms on α (``arch_loss_terms``; none in DARTS). The step
        reports the validation loss alone."""
        terms = getattr(self.model, "arch_loss_terms", None)
        extra = terms() if terms is not None else None
        return val_loss if extra is None else val_loss + extra

    @torch.no_grad()
    def _virtual_step(self, weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """w ← w − ξ (μ·m + g + λ·w), in place."""
        group = self.weight_optimizer.param_groups[0]
        xi, mu, lam = group["lr"], group["momentum"], group["weight_decay"]
        for w, g in zip(weights, grads):
            direction = g + lam * w
            buf = self.weight_optimizer.state.get(w, {}).get("momentum_buffer")
            if buf is not None:
                direction.add_(buf, alpha=mu)
            if isinstance(xi, torch.Tensor):  # held on the device under CUDA graphs: never read on the host
                w.sub_(direction.mul_(xi))
            else:
                w.sub_(direction, alpha=xi)

    def _second_order(self, x_train, y_train, x_val, y_val):
        model = self.model
        alphas, weights = model.arch_parameters(), model.weight_parameters()
        xi = self.weight_optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            saved = [w.clone() for w in weights]
        try:
            # w' = one virtual SGD step on the train batch.
            with frozen(alphas):
                train_loss = model.loss(x_train, y_train)
            train_grads = _grads(train_loss, weights)
            self.grad_reduce(train_grads)  # every rank takes the same virtual step
            self._virtual_step(weights, train_grads)
            del train_grads  # spent: one weight-sized copy less for the rest of the step
            val_loss = model.loss(x_val, y_val)
            grads = _grads(self._with_arch_terms(val_loss), alphas + weights)
            d_alpha, v = grads[: len(alphas)], grads[len(alphas):]
            self.grad_reduce(v)  # so ε and w± are the same on every rank
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in v]))
            # ε = 0.01/‖v‖ on the device (an `if norm == 0` would synchronise). For
            # v = 0 the floor keeps ε finite: w± = w, so the difference term is 0.
            eps = 0.01 / norm.clamp_min(torch.finfo(norm.dtype).tiny)
            # v ← εv in place, once: w± = w ± εv then needs no weight-sized temporary per pass.
            torch._foreach_mul_(v, eps)

            def train_alpha_grad(sign: float) -> list[torch.Tensor]:
                with torch.no_grad():
                    torch._foreach_copy_(weights, saved)
                    torch._foreach_add_(weights, v, alpha=sign)
                # Only ∂L/∂α: with w frozen no backward computes a weight
                # gradient (the fused backend cannot see autograd.grad's pruning).
                with frozen(weights):
                    return _grads(model.loss(x_train, y_train), alphas)

            # w⁺ and w⁻ must see the same random draws (a method's edge term), or the
            # difference measures the masks: the w⁺ pass runs on a fork of the generators.
            # Forked only when there are draws (a fork reads and restores the generator
            # state, which a CUDA graph capture cannot).
            draws = getattr(model, "draws_random_numbers", True)
            devices = [weights[0].device] if weights and weights[0].device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices) if draws else contextlib.nullcontext():
                g_plus = train_alpha_grad(+1.0)
            g_minus = train_alpha_grad(-1.0)
            d_alpha = [d - xi * (gp - gm) / (2 * eps) for d, gp, gm in zip(d_alpha, g_plus, g_minus)]
            self.grad_reduce(d_alpha)  # linear in the per-rank terms: one all-reduce for all of them
            return d_alpha, val_loss.detach()
        finally:
            with torch.no_grad():
                torch._foreach_copy_(weights, saved)
