"""SDARTS: the weight step on perturbed op weights (Chen & Hsieh, ICML 2020).

SmoothDARTS trains the supernet's weights at op weights near softmax(α)
rather than at softmax(α) itself, which smooths the validation loss around α
(it implicitly regularises its Hessian). In every step, after the
architecture step (which sees the clean softmax(α)), the op weights
``ᾱ = softmax(α)`` of both cell types are perturbed and only the weight
step's forward uses the perturbed ``ᾱ + δ``:

- SDARTS-RS (``--perturb-alpha random``): ``ᾱ + U``, ``U ~ uniform[−ε, ε]``
  elementwise, then ``clip``;
- SDARTS-ADV (``--perturb-alpha pgd``): an L∞ PGD attack on the weight
  step's training loss: random start as RS, then ``steps`` (7) steps
  ``a ← a + (2ε/steps)·sign(∂L/∂a)``, each projected back to
  ``ᾱ + clamp(a − ᾱ, −ε, ε)`` and clipped; if the attacked loss ends below
  the clean loss, the clean ``ᾱ`` is used. The attack runs with the network
  in eval mode (BatchNorm on its running statistics, which it leaves
  unchanged), the weights frozen.

``clip`` (``model_search.Network.clip``) puts each edge's row back on the
simplex: clamp to [0, 1]; a row left all zero gets 1 at its argmax before
the clamp; divide by the row's sum. ε grows linearly over the search,
``ε_t = 0.03 + (ε_max − 0.03)·t/E`` in epoch t (0-based) of E (per stage for
a staged run), ε_max = ``--perturb-epsilon`` (0.3).

Source: xiangning-chen/SmoothDARTS, ``sota/cnn/train_search.py`` (train():
``architect.step`` l.213, then ``softmax_arch_parameters`` l.218, the
perturbation l.222-223 and the weight step l.228-233, restored l.234; ε_t
l.169-170), ``attacker/perturb.py`` (``Linf_PGD_alpha`` l.11-44, eval mode
l.12-14, step size 2ε/steps l.16, acceptance test l.40-42; ``Random_alpha``
l.47-50), ``attacker/linf_sgd.py`` (the sign step, l.72 and 89),
``sota/cnn/model_search.py`` (``softmax_arch_parameters``,
``restore_arch_parameters`` and ``clip``, l.160-177).

How it plugs in: ``network_epoch`` sets ε_t (a host float computed from the
epoch numbers: the draws and the clamps take it as the original does, and
nothing is read from the device); ``before_weight_step`` computes the
perturbed op weights of the batch; ``adjust_op_weights`` hands them to the
weight step's forward only (the architecture step, the evaluation and the
derivation see softmax(α)). The attack's forwards are the supernet's own,
with the attacked op weights handed in through ``adjust_op_weights``: they
see whatever the other methods add (PC-DARTS' partial channels and edge
weights β, DARTS-' auxiliary skip), so the attack targets the function the
weight step trains.

What differs from the original, and why:

- The random draws (RS noise, PGD's random start) come from torch's default
  generator of the network's device, as the original's, but it is reseeded
  at the start of every epoch from (seed, epoch, rank), as P-DARTS' skip
  dropout is: a resumed run then draws what an uninterrupted one does.
- The original perturbs α in place (softmax'ed, then restored after the
  step); here α is never touched: the perturbed op weights are a separate
  tensor. The weight step's gradient into α, which the original computes
  and discards, is not computed (α is frozen there).
- The acceptance test and ``clip``'s all-zero-row rule are evaluated on the
  device (``torch.where``), without the original's host reads.
- Under torchrun every rank perturbs for its shard of the batch (its own
  noise, its own attack on its shard); the original runs on one GPU.
- The preset keeps DARTS' op set; the original's scripts search RobustDARTS'
  spaces s1-s4 by default (``--search_space s1``) and the DARTS space as s5.
- Methods that compute the op weights another way (a ``op_weights`` hook:
  ProxylessNAS-style path sampling) are refused: SDARTS perturbs softmax(α).
- Time: the attack differentiates with respect to the op weights in eval
  mode; the ``fused`` kernels' backward covers batch statistics only, so on
  ``fused`` those passes run the reference ops under a recompute (nothing
  kept inside an edge, as the ``checkpoint`` backend): the memory stays
  the fused backend's, each attack step costs a forward more.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..architect import frozen
from ..data.loader import mix_seed
from ..errors import FastDartsError
from ..method import Option, SearchMethod, register_method, register_preset, registered_methods
from ..search_config import DARTS_PRESET

EPSILON_START = 0.03    # train_search.py l.170: ε of the first epoch
DEFAULT_EPSILON = 0.3   # train_search.py l.57: --epsilon_alpha
DEFAULT_STEPS = 7       # perturb.py l.11: Linf_PGD_alpha(steps=7)
MODES = {"random": "random", "pgd": "pgd", "pgd_linf": "pgd", "pgd-linf": "pgd"}  # the original spells it pgd_linf
PERTURB_PASS = 1 << 23  # mix_seed pass of the epoch's reseed (the loader's are 0, 1, ...; others 1 << 20..22)


def perturbation_epsilon(epoch: int, epochs: int, epsilon_max: float) -> float:
    """ε of epoch ``epoch`` (0-based) of ``epochs``: linear from 0.03 towards ``epsilon_max``."""
    return EPSILON_START + (epsilon_max - EPSILON_START) * epoch / epochs


def clip_op_weights(w: torch.Tensor) -> torch.Tensor:
    """The original's ``clip`` of every row (an edge's op weights): clamp to
    [0, 1]; a row left all zero gets 1 at its argmax before the clamp; divide
    by the row's sum."""
    top = w.argmax(dim=-1, keepdim=True)
    c = w.clamp(0, 1)
    empty = c.sum(dim=-1, keepdim=True) == 0
    c = torch.where(empty, c.scatter(-1, top, 1.0), c)
    return c / c.sum(dim=-1, keepdim=True)


def random_perturbation(clean: list[torch.Tensor], epsilon: float) -> list[torch.Tensor]:
    """SDARTS-RS: ``clip(w + U)``, U uniform in [−ε, ε], drawn per tensor in order (normal, then reduce)."""
    noisy = [w + torch.empty_like(w).uniform_(-epsilon, epsilon) for w in clean]
    return [clip_op_weights(w) for w in noisy]


def pgd_perturbation(loss_of, clean: list[torch.Tensor], epsilon: float, steps: int
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """SDARTS-ADV: the L∞ PGD attack on ``loss_of(op weights)`` around ``clean``
    (random start, ``steps`` sign steps of 2ε/steps, each projected to the ε-box
    around ``clean`` and clipped). Returns the attacked op weights, or ``clean``
    where the attack ended below the clean loss, and that test's outcome (a
    device bool: True when the clean weights were kept)."""
    with torch.no_grad():
        before = loss_of(clean)
    size = 2 * epsilon / steps
    attacked = random_perturbation(clean, epsilon)
    for _ in range(steps):
        leaves = [a.detach().requires_grad_(True) for a in attacked]
        # Linf_SGD descends on −L: a ← a − size·sign(∂(−L)/∂a); an unused tensor (no gradient) stays.
        grads = torch.autograd.grad(-loss_of(leaves), leaves, allow_unused=True)
        attacked = []
        for a, g, w in zip(leaves, grads, clean):
            a = a.detach()
            if g is not None:
                a = a.add(torch.sign(g), alpha=-size)
            attacked.append(clip_op_weights((a - w).clamp(-epsilon, epsilon) + w))
    with torch.no_grad():
        after = loss_of(attacked)
    rejected = before > after
    return [torch.where(rejected, w, a) for w, a in zip(clean, attacked)], rejected


def _settings(alpha, epsilon, steps, steps_from_preset: bool = False) -> tuple[str | None, float | None, int | None]:
    """The canonical (mode, ε_max, PGD steps), or a one-line error."""
    if alpha is None:
        given = [name for name, v in (("perturb-epsilon", epsilon), ("perturb-steps", steps)) if v is not None]
        if given:
            verb = "shapes" if len(given) == 1 else "shape"
            raise FastDartsError(f"{' and '.join(given)} only {verb} SDARTS' perturbation, which needs "
                                 f"--perturb-alpha random or pgd")
        return None, None, None
    mode = MODES.get(str(alpha).strip().lower())
    if mode is None:
        raise FastDartsError(f"perturb-alpha must be random (SDARTS-RS) or pgd (SDARTS-ADV), got {alpha!r}")
    if epsilon is None:
        epsilon = DEFAULT_EPSILON
    try:
        value = float(epsilon) if not isinstance(epsilon, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= 1:  # op weights lie in [0, 1]: a larger box is all of it
        raise FastDartsError(f"perturb-epsilon must be a number in (0, 1], got {epsilon!r}")
    if mode == "random":
        if steps is not None and not steps_from_preset:
            raise FastDartsError("perturb-steps is the PGD attack's (--perturb-alpha pgd); random perturbation "
                                 "takes none")
        return mode, value, None
    steps = DEFAULT_STEPS if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise FastDartsError(f"perturb-steps must be a positive integer, got {steps!r}")
    return mode, value, steps


def _computes_own_op_weights(cls) -> bool:
    return cls is not SmoothDARTS and cls.op_weights is not SearchMethod.op_weights


@register_method
class SmoothDARTS(SearchMethod):
    """The weight step's op weights perturbed around softmax(α): random (RS) or adversarial (ADV)."""

    name = "sdarts"
    options = (
        Option("perturb_alpha", None, "SDARTS: the weight step sees softmax(α) perturbed within ±ε: random "
               "(SDARTS-RS, uniform noise) or pgd (SDARTS-ADV, a 7-step L∞ attack on the training loss)",
               metavar="random|pgd"),
        Option("perturb_epsilon", None, "SDARTS: the largest ε, reached linearly from 0.03 over the epochs "
               "(0.3 when unset)", metavar="EPS"),
        Option("perturb_steps", None, "SDARTS-ADV: steps of the PGD attack (7 when unset)", kind="positive_int",
               metavar="N"),
    )

    @classmethod
    def check(cls, config, from_preset):
        mode, epsilon, steps = _settings(config.perturb_alpha, config.perturb_epsilon, config.perturb_steps,
                                         steps_from_preset="perturb_steps" in from_preset)
        return dict(perturb_alpha=mode, perturb_epsilon=epsilon, perturb_steps=steps)

    @classmethod
    def incompatible(cls, config) -> str | None:
        if config.cuda_graph:
            return ("--cuda-graph cannot capture SDARTS' perturbation (fresh random draws every step, and the PGD "
                    "attack's passes in eval mode); run without --cuda-graph")
        own = [other.name for other in registered_methods() if _computes_own_op_weights(other) and other.active(config)]
        if own:
            return (f"SDARTS perturbs softmax(α), but {', '.join(own)} computes the op weights another way; "
                    f"use one or the other")
        return None

    def __init__(self, config):
        super().__init__(config)
        # A network built directly takes the options as given: the same canonical form as a checked config.
        self.mode, self.epsilon_max, self.steps = _settings(config.perturb_alpha, config.perturb_epsilon,
                                                            config.perturb_steps)

    def __repr__(self) -> str:
        return f"SmoothDARTS({self.mode}, epsilon_max={self.epsilon_max}" + (
            f", steps={self.steps})" if self.mode == "pgd" else ")")

    # -- the supernet --------------------------------------------------------------
    def check_network(self, model, C, backend) -> None:
        own = [type(m).name for m in model.methods if _computes_own_op_weights(type(m))]
        if own:
            raise FastDartsError(f"SDARTS perturbs softmax(α), but {', '.join(own)} computes the op weights "
                                 f"another way; use one or the other")

    def setup_network(self, model) -> list:
        model.sdarts_epsilon = EPSILON_START  # ε of epoch 0 until the loop sets the epoch's
        model._sdarts_weights = None  # the next weight step's op weights (before_weight_step)
        model._sdarts_attack = None   # the op weights of the attack's current forward
        # Attacks of the epoch that ended below the clean loss (clean weights used); not checkpointed.
        model.register_buffer("sdarts_rejected", torch.zeros((), dtype=torch.long), persistent=False)
        return []

    def adjust_op_weights(self, model, weights, weight_step):
        if model._sdarts_attack is not None:  # a forward of the attack
            return list(model._sdarts_attack)
        if weight_step and model._sdarts_weights is not None:
            perturbed, model._sdarts_weights = model._sdarts_weights, None  # for this one forward
            return perturbed
        return weights

    def network_epoch(self, model, seed, epoch, epochs, stage_epoch) -> None:
        if epochs is None:
            raise FastDartsError("SDARTS' ε schedule needs the number of epochs: start_epoch(seed, epoch, epochs)")
        model.sdarts_epsilon = perturbation_epsilon(epoch if stage_epoch is None else stage_epoch, epochs,
                                                    self.epsilon_max)
        model.sdarts_rejected.zero_()

    def before_weight_step(self, model, x, y) -> None:
        clean = [F.softmax(a.detach(), dim=-1) for a in (model.alpha_normal, model.alpha_reduce)]
        epsilon = model.sdarts_epsilon
        if self.mode == "random":
            model._sdarts_weights = random_perturbation(clean, epsilon)
            return

        def loss_of(weights):
            model._sdarts_attack = weights
            return F.cross_entropy(model(x), y)

        training = model.training
        model.eval()  # as the original's attack: BatchNorm on (and leaving) its running statistics
        try:
            with frozen(list(model.parameters())):  # only the attacked op weights get gradients
                perturbed, rejected = pgd_perturbation(loss_of, clean, epsilon, self.steps)
        finally:
            model._sdarts_attack = None
            if training:
                model.train()
        model.sdarts_rejected.add_(rejected.to(torch.long))
        model._sdarts_weights = perturbed

    # -- the loop ------------------------------------------------------------------
    def start_epoch(self, run, epoch: int, stage_epoch: int) -> dict:
        # The epoch's draws from the default generator, seeded by (seed, epoch, rank): a resumed run draws the same.
        torch.manual_seed(mix_seed(self.config.seed, epoch, PERTURB_PASS + run.dist.rank))
        return {"epsilon_alpha": run.model.sdarts_epsilon}

    def epoch_figures(self, run, entry: dict) -> dict:
        return {"pgd_rejected": int(run.model.sdarts_rejected)} if self.mode == "pgd" else {}

    def epoch_log(self, run, entry: dict) -> str:
        what = "SDARTS-RS, uniform noise" if self.mode == "random" else f"SDARTS-ADV, {self.steps}-step PGD"
        line = f"perturbation ({what}): ε {entry['epsilon_alpha']:.4f}"
        if self.mode == "pgd":
            line += f", attack below the clean loss in {entry['pgd_rejected']} step(s) (clean weights used)"
        return line


# Chen & Hsieh, ICML 2020 (xiangning-chen/SmoothDARTS, sota/cnn/train_search.py): DARTS' CIFAR-10 settings
# (batch 64 l.34, lr 0.025 cosine to 0.001 l.35-36 and l.153-154, momentum 0.9 and weight decay 3e-4 l.37-38,
# 50 epochs l.41, gradient clip 5 l.50, Adam lr 3e-4 and weight decay 1e-3 l.53-54 with β1 0.5 in
# optimizers/darts/architect.py l.17-18), first order (--unrolled off by default, l.52; README.MD's commands
# do not pass it), ε_max 0.3 (--epsilon_alpha, l.57); README.MD's commands: --perturb_alpha random (RS) and
# pgd_linf (ADV); 7 PGD steps (attacker/perturb.py l.11).
register_preset("sdarts-rs", dict(DARTS_PRESET, order="first", perturb_alpha="random", perturb_epsilon=0.3))
register_preset("sdarts-adv", dict(DARTS_PRESET, order="first", perturb_alpha="pgd", perturb_epsilon=0.3,
                                   perturb_steps=7))
