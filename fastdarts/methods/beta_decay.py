"""β-DARTS' Beta-Decay regularisation (Ye et al., CVPR 2022; SPEC §8).

The architecture step minimises ``L_val + λ_t · mean_e logsumexp(α_e)``:
for every edge e of both cell types, the log-sum-exp of its (raw) α row,
averaged over all edges (normal and reduction rows alike). Its gradient
on α_e is λ_t·softmax(α_e)/|edges|, so every step pulls the α of an edge
down in proportion to the op weights: large α and large differences
between the ops of an edge decay, which keeps softmax(α) from collapsing
early onto one op (the paper's "Beta-Decay").

λ_t grows linearly with the epoch: ``λ_t = λ · t / R`` in epoch t
(0-based; of its stage in a staged run), so the first epoch runs without the
term. λ and R are ``--beta-decay`` and ``--beta-decay-epochs`` (R by default
the run's ``--epochs``). λ_t lives in a device buffer
(``SearchNetwork.beta_decay_weight``) that the loop fills each epoch:
nothing host-side is baked into a step (CUDA graphs capture it).

Source: ``Sunshine-Ye/Beta-DARTS`` (commit f307704),
``optimizers/darts/architect.py``: the regulariser ``mlc_loss`` (lines
55-59: ``mean(logsumexp(arch_param, dim=-1))`` of the raw α) and its weight
(line 81: ``weights = 0 + 50*epoch/100``), added to the validation loss in
``_backward_step`` (lines 80-85), the first-order step.

What differs, and why:

- the original adds the term only in its first-order step (its unrolled
  step, lines 87-107, leaves it out). Here the architect adds it to the
  validation loss in either order; the preset is first order, as the
  authors' scripts (``--unrolled`` off: ``sota/cnn/train_search.py:52``,
  ``nasbench201/train_search.py:51``), so the preset computes the original's;
- the original's weight is the literal ``50*epoch/100`` whatever the run's
  length (its NAS-Bench-201 script runs 100 epochs, so λ reaches 49.5; a
  50-epoch DARTS-space search reaches 24.5). The preset reproduces that
  literally (λ = 50, R = 100); ``--beta-decay-epochs`` unset ramps over the
  run's own epochs instead. λ_t is not capped at λ, as the original's;
- the original's DARTS-space code passes a list ``[α_normal, α_reduce]`` to
  ``torch.logsumexp``, which does not run; the mean here is over the edges
  of both cell types together, which is the NAS-Bench-201 form (one α
  matrix) applied to the stacked matrices (both cell types have the same
  number of edges, so it is also the mean of the two per-cell means).
"""
from __future__ import annotations

import math

import torch

from ..errors import FastDartsError
from ..method import Option, SearchMethod, register_method, register_preset
from ..search_config import DARTS_PRESET


def beta_decay_weight(lam: float, epoch: int, ramp_epochs: int) -> float:
    """λ_t of epoch ``epoch`` (0-based): ``λ·t/R``, growing linearly from 0, not capped."""
    return lam * epoch / ramp_epochs


def beta_decay_loss(alphas) -> torch.Tensor:
    """The regulariser: the mean over every edge (rows of each α) of logsumexp of its α row."""
    return torch.cat([torch.logsumexp(a, dim=-1) for a in alphas]).mean()


def check_beta_decay(value) -> float:
    """λ as a finite non-negative float (the CLI gives text)."""
    try:
        lam = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        lam = math.nan
    if not math.isfinite(lam) or lam < 0:
        raise FastDartsError(f"beta-decay must be a finite non-negative number (λ, the regulariser's weight), "
                             f"got {value!r}")
    return lam


def check_beta_decay_epochs(value) -> int | None:
    if value is None:
        return None
    try:
        epochs = int(value) if not isinstance(value, (bool, float)) else 0
    except (TypeError, ValueError):
        epochs = 0
    if epochs <= 0:
        raise FastDartsError(f"beta-decay-epochs must be a positive integer (the epochs over which λ_t grows "
                             f"to λ), got {value!r}")
    return epochs


@register_method
class BetaDecay(SearchMethod):
    """λ_t · mean over edges of logsumexp(α) added to the architecture step's loss."""

    name = "beta-decay"
    options = (
        Option("beta_decay", 0.0, "β-DARTS: add λ_t·mean over edges of logsumexp(α) to the architecture loss, "
               "λ_t = λ·t/R in epoch t (0-based); this is λ", metavar="LAMBDA"),
        Option("beta_decay_epochs", None, "β-DARTS: R, the epochs over which λ_t grows to λ (default: --epochs)",
               kind="positive_int", metavar="R"),
    )

    @classmethod
    def check(cls, config, from_preset):
        lam = check_beta_decay(config.beta_decay)
        epochs = check_beta_decay_epochs(config.beta_decay_epochs)
        if lam == 0 and "beta_decay_epochs" in from_preset:
            epochs = None  # --beta-decay 0 switches the preset's term off, its ramp with it
        if epochs is not None and lam == 0:
            raise FastDartsError("beta-decay-epochs sets how fast the Beta-Decay weight grows; it needs "
                                 "--beta-decay (λ > 0)")
        return dict(beta_decay=lam, beta_decay_epochs=epochs)

    def _ramp(self, epochs: int | None) -> int:
        ramp = getattr(self.config, "beta_decay_epochs", None)
        if ramp is not None:
            return check_beta_decay_epochs(ramp)
        if epochs is None:
            raise FastDartsError("the Beta-Decay weight λ_t needs the number of epochs: start_epoch(seed, epoch, "
                                 "epochs), or give beta_decay_epochs")
        return epochs

    def setup_network(self, model) -> list:
        # λ_t, filled each epoch (a tensor: nothing baked into a step); not in the
        # state_dict, since the epoch decides it. 0 until the first epoch starts.
        model.register_buffer("beta_decay_weight", torch.zeros(()), persistent=False)
        return []

    def network_epoch(self, model, seed, epoch, epochs, stage_epoch) -> None:
        t = epoch if stage_epoch is None else stage_epoch
        lam = beta_decay_weight(check_beta_decay(self.config.beta_decay), t, self._ramp(epochs))
        with torch.no_grad():
            model.beta_decay_weight.fill_(lam)

    def arch_loss_term(self, model) -> torch.Tensor:
        # Only α (the original's ``_arch_parameters``), not other methods' architecture parameters.
        weight = model.beta_decay_weight.to(model.alpha_normal.dtype)
        return weight * beta_decay_loss([model.alpha_normal, model.alpha_reduce])

    def epoch_figures(self, run, entry: dict) -> dict:
        t = entry.get("stage_epoch", entry["epoch"]) - 1
        lam = beta_decay_weight(self.config.beta_decay, t, self._ramp(self.config.epochs))
        with torch.no_grad():
            value = float(beta_decay_loss([a.detach().double() for a in (run.model.alpha_normal,
                                                                          run.model.alpha_reduce)]))
        return {"beta_decay_weight": lam, "beta_decay_loss": value}

    def epoch_log(self, run, entry: dict) -> str:
        return (f"beta-decay λ_t {entry['beta_decay_weight']:.4g}, mean logsumexp(α) "
                f"{entry['beta_decay_loss']:.4f}")


# Ye et al., CVPR 2022 (Sunshine-Ye/Beta-DARTS): DARTS' CIFAR-10 settings (sota/cnn/train_search.py:34-54:
# batch 64, SGD lr 0.025 cosine to 0.001, momentum 0.9, weight decay 3e-4, 50 epochs, grad clip 5, Adam lr
# 3e-4 with weight decay 1e-3; optimizers/darts/architect.py:18-20: betas (0.5, 0.999)); first order
# (--unrolled off: sota/cnn/train_search.py:52, and the term is added in the first-order step only:
# optimizers/darts/architect.py:40-46, 80-85); λ_t = 50·t/100 (optimizers/darts/architect.py:81).
register_preset("beta-darts", dict(DARTS_PRESET, order="first", beta_decay=50.0, beta_decay_epochs=100))
